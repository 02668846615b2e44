"""The report's Calibration section (retdmctl.report.calibration and its section on the
page): figures against a hand computation, unknown entries left out, edge cases, and the
section in a real eval report."""

from __future__ import annotations

import html

import h5py
import numpy as np
import pytest

from retdmctl.report import calibration
from retdmctl.report.page import render_page

from conftest import run_stages, tiny_config, trained_workspace
from test_report import sample_data

# 8 entries; the last image's two are unknown (and would land in bins 3 and 5).
LABELS = np.array([[0, 0], [1, 1], [1, 0], [1, 1]], dtype=np.uint8)
SCORES = np.array([[0.04, 0.16], [0.12, 0.97], [0.87, 0.91], [0.55, 0.35]], dtype=np.float32)
KNOWN = np.array([[True, True], [True, True], [True, True], [False, False]])


def test_reliability_bins_and_ece_by_hand():
    """Counted: (0.04, neg) (0.16, neg) (0.12, pos) | (0.87, pos) | (0.97, pos) (0.91, neg).
    Bin 0: mean 0.04, fraction 0; bin 1: mean 0.14, fraction 1/2; bin 8: 0.87, 1; bin 9:
    0.94, 1/2. ECE = (1 * 0.04 + 2 * 0.36 + 1 * 0.13 + 2 * 0.44) / 6 = 1.77 / 6 = 0.295."""
    rel = calibration.reliability(LABELS, SCORES, KNOWN)
    assert rel["entries"] == 6 and rel["bins"] == 10
    assert rel["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 1, 2]
    assert rel["mean_score"][:2] == pytest.approx([0.04, 0.14])
    assert rel["mean_score"][8:] == pytest.approx([0.87, 0.94])
    assert rel["mean_score"][2:8] == [None] * 6 and rel["positive_fraction"][2:8] == [None] * 6
    assert [rel["positive_fraction"][i] for i in (0, 1, 8, 9)] == [0.0, 0.5, 1.0, 0.5]
    assert rel["ece"] == pytest.approx(0.295)
    assert calibration.ece(LABELS, SCORES, KNOWN) == pytest.approx(0.295)


def test_unknown_entries_are_left_out():
    """Without the mask the two unknown entries count (as positives): bins 3 and 5 fill and
    the ECE becomes (1.77 + |0.35 - 1| + |0.55 - 1|) / 8 = 2.87 / 8."""
    rel = calibration.reliability(LABELS, SCORES)
    assert rel["entries"] == 8 and rel["count"][3] == 1 and rel["count"][5] == 1
    assert rel["ece"] == pytest.approx(2.87 / 8)
    hist = calibration.histogram(LABELS, SCORES, KNOWN)
    assert sum(hist["positives"]) + sum(hist["negatives"]) == 6
    assert calibration.distinct_values(SCORES, KNOWN) == 6 and calibration.distinct_values(SCORES) == 8


def test_histogram_by_hand():
    hist = calibration.histogram(LABELS, SCORES, KNOWN, bins=20)
    assert len(hist["edges"]) == 21 and hist["edges"][0] == 0.0 and hist["edges"][-1] == 1.0
    assert np.flatnonzero(hist["positives"]).tolist() == [2, 17, 19]  # 0.12, 0.87, 0.97
    assert np.flatnonzero(hist["negatives"]).tolist() == [0, 3, 18]  # 0.04, 0.16, 0.91


def test_edges_and_degenerate_inputs():
    # 1.0 falls in the last bin, 0.0 in the first; distinct values are counted after rounding
    y = np.array([[1], [0], [0]])
    s = np.array([[1.0], [0.0], [0.0004]])
    rel = calibration.reliability(y, s)
    assert rel["count"][0] == 2 and rel["count"][9] == 1
    assert rel["ece"] == pytest.approx((0.0002 * 2 + 0.0) / 3)
    assert calibration.distinct_values(s) == 2
    # nothing known: no entry, no ECE
    none = calibration.summary(y, s, np.zeros(y.shape, dtype=bool))
    assert none["entries"] == 0 and none["ece"] is None and none["distinct"] == 0
    assert set(none["reliability"]["mean_score"]) == {None}


def test_section_renders_without_positives_and_with_one_class():
    data = sample_data()
    labels = np.zeros((4, 1), dtype=np.uint8)
    scores = np.array([[0.1], [0.2], [0.2], [0.9]])
    data["calibration"] = calibration.summary(labels, scores)
    data["calibration_note"] = "no <positives>"
    page = render_page(data)
    assert "<h2>Calibration</h2>" in page and "no &lt;positives&gt;" in page
    # mean scores 0.1 (bin 1, count 1), 0.2 (bin 2, count 2), 0.9 (bin 9): ECE = 1.4 / 4
    assert "ECE 0.350 over 4 entries; 3 distinct values (to 3 decimals)" in page
    assert "positives (0)" in page and "negatives (4)" in page
    data["calibration"] = calibration.summary(labels, scores, np.zeros((4, 1), dtype=bool))
    assert "No known entry: nothing to calibrate." in render_page(data)


def test_calibration_section_in_a_real_eval_report(tmp_path):
    """eval's report on a tiny trained workspace shows the figures of the scores it wrote."""
    cfg = tiny_config(frozen=True)
    cfg.eval.checkpoint = "classifier"
    ws = trained_workspace(tmp_path / "w", cfg, "ingest", "classifier", "eval")
    page = (ws.stage_dir("eval") / "report.html").read_text(encoding="utf-8")
    with h5py.File(ws.stage_dir("eval") / "scores.h5", "r") as h5:
        scores, labels = h5["scores"][:], h5["labels"][:]
        known = h5["known"][:] if "known" in h5 else None
    s = calibration.summary(labels, scores, known)
    assert s["entries"] == labels.size and s["distinct"] > 1
    line = (f"ECE {s['ece']:.3f} over {s['entries']:,} entries; "
            f"{s['distinct']:,} distinct values (to 3 decimals)")
    assert f"<p>{html.escape(line)}</p>" in page
    assert "<h2>Calibration</h2>" in page and "Reliability (10 bins)" in page and "Scores (20 bins)" in page
    assert page.index("<h2>Precision-recall curves</h2>") < page.index("<h2>Calibration</h2>")
