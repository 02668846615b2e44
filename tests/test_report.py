"""Tests for retdmctl.report.html.render_report."""

from __future__ import annotations

import html
import math
import re

import pytest

from retdmctl.metrics import METRIC_NAMES
from retdmctl.report.html import render_report

EVIL = "<script>alert(1)</script>"
QUOTED = 'a"b & c'


def _render(**overrides: object) -> str:
    kwargs: dict[str, object] = {
        "title": "RETDM <eval> report",
        "metrics": {name: 0.123456 + i / 100 for i, name in enumerate(METRIC_NAMES)},
        "class_names": ["cat", EVIL, QUOTED, "dog"],
        "per_class_ap": [0.5, 0.9, float("nan"), 0.25],
        "class_support": [10, 3, 0, 7],
        "history": {
            "classifier": [
                {"epoch": 1, "train_loss": 0.9, "val_loss": 1.0, "val_mAP": 0.4},
                {"epoch": 2, "train_loss": 0.7, "val_loss": None, "val_mAP": 0.5},
                {"epoch": 3, "train_loss": 0.5, "val_mAP": 0.6},
            ],
            "metric": [{"epoch": 1, "triplet<loss>": 0.3}],
            "joint": [],
        },
        "meta": {"dataset": "coco<2014>", "checkpoint": 'ckpt "best".pt', "version": "0.1.0"},
    }
    kwargs.update(overrides)
    return render_report(**kwargs)  # type: ignore[arg-type]


def test_data_strings_are_escaped() -> None:
    page = _render()
    assert EVIL not in page
    assert html.escape(EVIL, quote=True) in page
    assert QUOTED not in page
    assert html.escape(QUOTED, quote=True) in page
    assert "<eval>" not in page and "RETDM &lt;eval&gt; report" in page
    assert "coco&lt;2014&gt;" in page
    assert html.escape('ckpt "best".pt', quote=True) in page
    assert "triplet&lt;loss&gt;" in page and "triplet<loss>" not in page


def test_all_class_names_present() -> None:
    page = _render()
    for name in ["cat", EVIL, QUOTED, "dog"]:
        assert html.escape(name, quote=True) in page


def test_self_contained() -> None:
    page = _render()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "<style>" in page


def test_metric_values_formatted() -> None:
    metrics = {name: 0.123456 + i / 100 for i, name in enumerate(METRIC_NAMES)}
    page = _render(metrics=metrics)
    for name, value in metrics.items():
        assert html.escape(name) in page
        assert f"{value:.4f}" in page
    assert "higher is better" in page and "lower is better" in page


def test_nan_metric_shown_as_na() -> None:
    page = _render(metrics={"mAP": float("nan")})
    assert "n/a" in page and ">nan<" not in page.lower()


def test_per_class_sorted_by_ap_with_nan_last() -> None:
    page = _render()
    positions = [page.index(html.escape(n, quote=True)) for n in [EVIL, "cat", "dog", QUOTED]]
    assert positions == sorted(positions)
    assert "n/a" in page
    assert 'style="width:90.0%"' in page


def test_one_svg_per_stage() -> None:
    page = _render()
    assert page.count("<svg") == 3
    assert page.count("</svg>") == 3
    for stage in ("classifier", "metric", "joint"):
        assert f"<h3>{stage}</h3>" in page
    # classifier: 3 series (val_loss split by its gap) + metric: 1 series.
    assert page.count("<polyline") >= 3
    assert "val_mAP" in page and "train_loss" in page


def test_empty_history_and_nan_aps() -> None:
    page = _render(history={}, per_class_ap=[float("nan")] * 4)
    assert "<svg" not in page
    assert "No training history recorded." in page
    assert page.count("n/a") >= 4


def test_empty_everything() -> None:
    page = render_report(
        title="t", metrics={}, class_names=[], per_class_ap=[], class_support=[], history={}, meta={}
    )
    assert "<html" in page and "</html>" in page


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        _render(class_support=[1, 2])


def test_svg_coordinates_are_finite() -> None:
    page = _render(history={"s": [{"epoch": 5, "loss": 2.0}, {"epoch": 5, "loss": 2.0}]})
    numbers = re.findall(r'\s(?:x|y|x1|x2|y1|y2|cx|cy)="([^"]+)"', page)
    assert numbers and all(math.isfinite(float(v)) for v in numbers)
