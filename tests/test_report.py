"""Tests for the report page (retdmctl.report.page) and the data it is built from
(retdmctl.report.build)."""

from __future__ import annotations

import base64
import html
import io as _io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.metrics import METRIC_NAMES
from retdmctl.report import calibration, paper
from retdmctl.report.build import gather, per_class_table, pca_2d, pr_curves, worst_first
from retdmctl.report.page import render_page

EVIL = "<script>alert(1)</script>"
NAMES = ["sea", EVIL, '"&\'', "sun<set>", "empty"]


def _jpeg_uri(seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).resize((96, 72)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_data(source: str = "scene") -> dict:
    """A report data dict with hostile strings everywhere a name can appear."""
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 5)) < 0.35).astype(np.uint8)
    labels[:, 4] = 0  # a class without positives
    scores = np.clip(labels * 0.6 + rng.random((60, 5)) * 0.5, 0, 1)
    thr = np.full(5, 0.5)
    pts, _ = pca_2d(rng.normal(size=(60, 16)))
    metrics = {name: 0.5 + i / 100 for i, name in enumerate(METRIC_NAMES)}
    return {
        "title": f"report <{EVIL}>",
        "subtitle": "",
        "dataset": {"name": source, "source": "/data/<x>", "fingerprint": "sha256:abc", "images": 100, "classes": 5,
                    "splits": {"train": 70, "val": 10, "test": 20}},
        "model": {"backbone": "efficientnet_lite0 (frozen)", "image size": 128, "threshold": 0.5},
        "config": {"model": {"backbone": "efficientnet_lite0", "image_size": 128, "lr_note": EVIL},
                   "joint": {"epochs": 10, "lr": 0.001, "way2": "bank"}, "ingest": {"classes": ""}},
        "metrics": {"classifier (ours)": metrics, "joint (ours)": {k: v + 0.01 for k, v in metrics.items()}},
        "paper": paper.columns(source),
        "paper_note": paper.note(source),
        "threshold_note": "at 0.5",
        "class_names": NAMES,
        "per_class": per_class_table(labels, scores, thr),
        "per_class_note": "",
        "pr_curves": pr_curves(labels, scores),
        "calibration": calibration.summary(labels, scores),
        "calibration_note": f"classifier model <{EVIL}>",
        "cooccurrence": (labels.T.astype(int) @ labels.astype(int)).tolist(),
        "cooccurrence_note": "Training split",
        "history": {"classifier": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_mAP": 0.5 + e / 50, "lr": 0.1}
                                   for e in range(1, 6)],
                    "metric": [{"epoch": 1, "metric<loss>": 0.3}], "joint": []},
        "thumbnails": [{"id": f"img{i}<{EVIL}>", "uri": _jpeg_uri(i), "true": [NAMES[c] for c in np.flatnonzero(labels[i])],
                        "pred": [(NAMES[c], float(scores[i, c])) for c in np.flatnonzero(scores[i] >= 0.5)]}
                       for i in worst_first(labels, scores, thr)[:12]],
        "projection": {"points": pts.tolist(), "labels": [np.flatnonzero(r).tolist() for r in labels], "note": "PCA"},
        "footer": {"retdmctl": "0.1.0", "workdir": "/w/<x>"},
    }


def test_page_escapes_every_label_and_id():
    page = render_page(sample_data())
    for raw in (EVIL, '"&\'', "sun<set>", "metric<loss>", "/data/<x>"):
        assert raw not in page, raw
        assert html.escape(raw, quote=True) in page, raw
    # the only script is ours
    assert page.count("<script>") == 1 and "alert(1)</script>" not in page


def test_page_is_self_contained():
    page = render_page(sample_data())
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert 'src="data:image/jpeg;base64,' in page
    assert "<link" not in page and "@import" not in page


def test_page_sections():
    page = render_page(sample_data())
    for heading in ("Metrics", "Per-class results", "Precision-recall curves", "Calibration", "Training curves",
                    "Test images, worst mistakes first", "Image embeddings (2-D projection)", "Label co-occurrence",
                    "Configuration"):
        assert f"<h2>{heading}</h2>" in page, heading
    # paper figures beside ours on scene; classifier vs joint side by side
    assert "RETDM (paper)" in page and "0.8850" in page and "0.8840" in page
    assert "classifier (ours)" in page and "joint (ours)" in page
    # column names say which AP is which
    assert "AP (class)" in page and "avg. precision (label ranking)" in page
    # no-positive note, n/a AP
    assert "have no positive image in this split: empty" in page
    assert "left out of mAP, C-P, C-R and C-F1 alike" in page
    # loss and mAP on separate axes; lr left out
    assert "classifier: loss" in page and "classifier: mAP" in page and ">lr</text>" not in page
    # every hyperparameter
    assert "way2" in page and "bank" in page


def test_page_charts_have_finite_coordinates_and_nan_shows_as_na():
    """A history without spread (one epoch twice, the same values) and a NaN metric: the
    charts' ticks are padded around the single value, the metric reads n/a."""
    data = sample_data()
    data["history"] = {"classifier": [{"epoch": 5, "train_loss": 2.0}, {"epoch": 5, "train_loss": 2.0}]}
    data["metrics"] = {"classifier (ours)": {**data["metrics"]["classifier (ours)"], "mAP": float("nan")}}
    page = render_page(data)
    numbers = re.findall(r'\s(?:x|y|x1|x2|y1|y2|cx|cy)="([^"]+)"', page)
    assert numbers and all(math.isfinite(float(v)) for v in numbers)
    assert "n/a" in page and ">nan<" not in page.lower()


def test_no_paper_column_for_other_datasets():
    page = render_page(sample_data("demo"))
    assert "RETDM (paper)" not in page


def test_report_shows_only_checked_paper_figures():
    shown = {source: {col: set(figures) for col, figures in paper.columns(source).items()} for source in paper.TABLES}
    f1_block = {"C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1"}
    assert shown == {
        "scene": {"RETDM (paper)": f1_block | {"coverage", "one_error", "average_precision"},
                  "BCE (paper)": f1_block - {"O-F1"} | {"coverage", "one_error", "average_precision"}},
        "mirflickr": dict.fromkeys(["RETDM (paper)", "BCE (paper)"], f1_block | {"average_precision"}),
        "coco": dict.fromkeys(["RETDM (paper)", "BCE (paper)"], f1_block),
    }
    for source, table in paper.TABLES.items():
        for column, figures in paper.columns(source).items():
            method = column.removesuffix(" (paper)")
            for metric, value in figures.items():  # each one is the paper's figure, for our metric
                assert metric in METRIC_NAMES and value == table["rows"][method][metric], (source, column, metric)
            for metric in set(table["rows"][method]) - set(figures):  # each figure left out says why
                assert paper.excluded(source, method, metric) is not None, (source, method, metric)
    for source in ("voc", "nuswide", "csv", "demo", ""):  # the paper has no table for them
        assert paper.columns(source) is None and paper.note(source) == ""


def _hamming_from(row: dict, density: float, classes: int) -> float:
    """The per-entry hamming loss that O-P, O-R and the labels per image imply: missed
    positives (1 - O-R) and false positives (O-R (1 - O-P) / O-P) per image, over the classes."""
    recall, precision = row["O-R"], row["O-P"]
    return density * ((1 - recall) + recall * (1 - precision) / precision) / classes


def test_paper_figures_shown_are_plausible():
    hamming_checked = 0
    for source, table in paper.TABLES.items():
        for method, row in table["rows"].items():
            figures = paper.columns(source)[f"{method} (paper)"]
            implied = _hamming_from(row, table["density"], table["classes"])
            if "hamming_loss" in figures:
                assert figures["hamming_loss"] == pytest.approx(implied, abs=0.005)
                hamming_checked += 1
            else:  # left out because it is far from what O-P, O-R and the density imply
                assert abs(row["hamming_loss"] - implied) > 0.05, (source, method)
            for f1, p, r in (("C-F1", "C-P", "C-R"), ("O-F1", "O-P", "O-R")):  # F1 of the rounded P and R
                harmonic = 2 * row[p] * row[r] / (row[p] + row[r])
                assert (f1 in figures) == (abs(row[f1] - harmonic) <= 0.0011), (source, method, f1)
            if "coverage" in figures:  # 0-based beyond doubt: a 1-based coverage is at least 1
                assert table["density"] - 1 <= figures["coverage"] < 1
            assert all(0 <= figures[m] <= 1 for m in ("one_error", "average_precision") if m in figures)
    assert hamming_checked == 0  # no table's hamming loss is per entry
    assert _hamming_from(paper.TABLES["scene"]["rows"]["RETDM"], 1.24, 5) == pytest.approx(0.0568, abs=1e-4)


def test_scene_paper_columns_leave_out_hamming_and_name_their_source():
    page = render_page(sample_data("scene"))
    assert "0.1217" not in page and "0.1331" not in page  # the paper's hamming loss
    assert '<td class="num paper">0.5850</td>' in page and '<td class="num paper">0.9285</td>' in page
    note = paper.note("scene")
    assert note.startswith("Paper columns: RETDM paper, Table I (scene): VGG-16 fine-tuned, random 80/20 split")
    assert "Not shown: hamming loss (not per entry" in note and "BCE's O-F1 (0.883 does not follow" in note
    assert f'<p class="sub paper">{html.escape(note, quote=True)}</p>' in page
    assert paper.note("coco").startswith("Paper columns: RETDM paper, Table III (coco):")


def test_per_class_table_counts():
    y = np.array([[1, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.6], [0.2, 0.1], [0.7, 0.0]])
    pc = per_class_table(y, s, np.array([0.5, 0.5]))
    assert pc[0]["precision"] == 0.5 and pc[0]["recall"] == 0.5 and pc[0]["support"] == 2
    assert pc[1]["recall"] is None and pc[1]["ap"] is None and pc[1]["precision"] == 0.0


def test_worst_mistakes_first():
    y = np.array([[1, 0], [1, 0], [0, 1]])
    s = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6]])
    assert worst_first(y, s, np.array([0.5, 0.5])).tolist() == [1, 2, 0]


def test_gather_on_a_trained_workspace(tmp_path):
    """The data the eval stage hands over, end to end on a tiny trained workspace."""
    from test_predict import make_workspace

    from retdmctl.data.dataset import read_dataset
    from retdmctl.metrics import compute_metrics
    from retdmctl.inputs import image_source
    from retdmctl.model_io.checkpoint import build_model, load_state
    from retdmctl.model_io.scoring import predict_scores
    from retdmctl.runtime import load_checkpoint

    ws, cfg = make_workspace(tmp_path / "w")
    cfg.eval.checkpoint = "classifier"
    info = read_dataset(ws.dataset)
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    load_state(model, load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["model"], "ckpt")
    rows = info.split("test")
    scores, labels = predict_scores(model, image_source(ws, cfg, info, spec), rows, torch.device("cpu"))
    result = {"metrics": compute_metrics(labels, scores), "split": "test",
              "thresholds": {"rule": "fixed", "values": dict.fromkeys(info.class_names, 0.5)},
              "checkpoint": "classifier/checkpoint.pt"}
    cfg.ingest.source = "scene"  # the paper's columns: checked figures only, with their source
    d = gather(ws, cfg, info, result, scores=scores, labels=labels, rows=rows, model=model, device=torch.device("cpu"))
    assert d["paper"]["RETDM (paper)"]["coverage"] == 0.585 and "hamming_loss" not in d["paper"]["RETDM (paper)"]
    assert "O-F1" not in d["paper"]["BCE (paper)"] and d["paper_note"].startswith("Paper columns: RETDM paper, Table I")
    assert d["dataset"]["splits"]["test"] == len(rows) and d["dataset"]["fingerprint"]
    assert len(d["thumbnails"]) == min(36, len(rows)) and d["thumbnails"][0]["uri"].startswith("data:image/jpeg")
    assert len(d["projection"]["points"]) == len(rows)
    assert "classifier" in d["history"] and d["subtitle"] == ""  # only the joint model gets the classifier beside it
    assert d["config"]["classifier"]["epochs"] == 2
    page = render_page(d)
    assert "http://" not in page and "https://" not in page
