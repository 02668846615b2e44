"""Tests for retdmctl.metrics against scikit-learn and a hand-computed example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retdmctl.errors import InputError
from retdmctl.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    compute_metrics,
    per_class_average_precision,
)

skm = pytest.importorskip("sklearn.metrics")


def _random_case(seed: int, n: int = 60, n_labels: int = 7, decimals: int | None = None):
    """Random labels/scores with the awkward cases: ties, empty rows, and either a class
    with no positive (even seeds) or all-positive images (odd seeds)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.3).astype(np.int64)
    scores = np.clip(0.35 * y + rng.random((n, n_labels)) * 0.8, 0.0, 1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)
    y[0] = 0  # an image with no true label
    if seed % 2 == 0:
        y[:, 2] = 0  # a class with no positive
    else:
        y[1] = 1  # all-positive images
        y[3] = 1
    scores[4] = 0.5  # an image with all scores tied
    return y, scores


def _sklearn_reference(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """The same metrics computed with scikit-learn (C-F1 built from its macro P and R)."""
    pred = (s >= threshold).astype(int)
    keep = y.any(axis=1)
    has_pos = y.sum(axis=0) > 0  # classes without a positive are left out of every class average
    c_p = skm.precision_score(y[:, has_pos], pred[:, has_pos], average="macro", zero_division=0)
    c_r = skm.recall_score(y[:, has_pos], pred[:, has_pos], average="macro", zero_division=0)
    m_ap = np.mean(
        [skm.average_precision_score(y[:, c], s[:, c]) for c in np.flatnonzero(has_pos)]
    )
    top = np.argmax(s[keep], axis=1)
    return {
        "mAP": m_ap,
        "C-P": c_p,
        "C-R": c_r,
        "C-F1": 2 * c_p * c_r / (c_p + c_r) if c_p + c_r else 0.0,
        "O-P": skm.precision_score(y, pred, average="micro", zero_division=0),
        "O-R": skm.recall_score(y, pred, average="micro", zero_division=0),
        "O-F1": skm.f1_score(y, pred, average="micro", zero_division=0),
        "hamming_loss": skm.hamming_loss(y, pred),
        "ranking_loss": skm.label_ranking_loss(y[keep], s[keep]),
        "coverage": skm.coverage_error(y[keep], s[keep]) - 1,
        "one_error": float(np.mean(y[keep][np.arange(keep.sum()), top] == 0)),
        "average_precision": skm.label_ranking_average_precision_score(y[keep], s[keep]),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_matches_sklearn(seed: int, decimals: int | None, threshold: float) -> None:
    y, s = _random_case(seed, decimals=decimals)
    got = compute_metrics(y, s, threshold=threshold)
    want = _sklearn_reference(y, s, threshold)
    assert tuple(got) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
        assert isinstance(got[name], float)


@pytest.mark.parametrize("seed", range(4))
def test_per_class_ap_matches_sklearn(seed: int) -> None:
    y, s = _random_case(seed, n=200, decimals=1 if seed > 1 else None)
    ap = per_class_average_precision(y, s)
    assert ap.shape == (y.shape[1],)
    assert math.isnan(ap[2]) == (seed % 2 == 0)
    for c in range(y.shape[1]):
        if y[:, c].any():
            assert ap[c] == pytest.approx(skm.average_precision_score(y[:, c], s[:, c]), abs=1e-12)


def test_threshold_is_inclusive() -> None:
    y = np.array([[1, 0]])
    s = np.array([[0.5, 0.2]])
    m = compute_metrics(y, s, threshold=0.5)
    assert m["O-P"] == 1.0 and m["O-R"] == 1.0 and m["hamming_loss"] == 0.0


def test_hand_computed_example() -> None:
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    s = np.array(
        [
            [0.9, 0.6, 0.4],
            [0.7, 0.3, 0.3],
            [0.8, 0.1, 0.2],
            [0.2, 0.6, 0.6],
        ]
    )
    m = compute_metrics(y, s, threshold=0.5)
    # pred = [[1,1,0],[1,0,0],[1,0,0],[0,1,1]]
    # class 0: TP1 FP2 FN1 -> P 1/3 R 1/2; class 1: TP1 FP1 FN1 -> P 1/2 R 1/2;
    # class 2: TP0 FP1 FN1 -> P 0 R 0.
    c_p, c_r = (1 / 3 + 1 / 2 + 0) / 3, (1 / 2 + 1 / 2 + 0) / 3
    assert m["C-P"] == pytest.approx(c_p)
    assert m["C-R"] == pytest.approx(c_r)
    assert m["C-F1"] == pytest.approx(2 * c_p * c_r / (c_p + c_r))
    assert m["O-P"] == pytest.approx(2 / 6)
    assert m["O-R"] == pytest.approx(2 / 5)
    assert m["O-F1"] == pytest.approx(2 * (1 / 3) * (2 / 5) / (1 / 3 + 2 / 5))
    assert m["hamming_loss"] == pytest.approx(7 / 12)
    # AP class 0: order 0.9(+) 0.8(-) 0.7(-) 0.2(+) -> (1 + 2/4) / 2 = 0.75
    # AP class 1: 0.6 tie between rows 0(-) and 3(+) -> precision 1/2 at recall 1/2;
    #   then 0.3(+) -> 2/3; AP = (1/2 + 2/3) / 2 = 7/12
    # AP class 2: single positive (row 0, 0.4) ranked behind row 3 (0.6, -) -> 1/2
    assert per_class_average_precision(y, s) == pytest.approx([0.75, 7 / 12, 0.5])
    assert m["mAP"] == pytest.approx((0.75 + 7 / 12 + 0.5) / 3)
    # Ranking metrics over rows 0, 1, 3 (row 2 has no true label).
    # row 0: rel {0:0.9, 2:0.4}, irr {1:0.6}: pair (2,1) mis-ordered -> 1/2
    # row 1: rel {1:0.3}, irr {0:0.7, 2:0.3 (tie)} -> 2/2 = 1
    # row 3: rel {0:0.2, 1:0.6}, irr {2:0.6 (tie with 1)} -> 2/2 = 1
    assert m["ranking_loss"] == pytest.approx((0.5 + 1 + 1) / 3)
    # coverage (0-based): row 0 -> 3-1=2, row 1 -> 3-1=2, row 3 -> 3-1=2
    assert m["coverage"] == pytest.approx(2.0)
    # one_error: row 0 top=0 (true); row 1 top=0 (false); row 3 tie 1/2 -> first = 1 (true)
    assert m["one_error"] == pytest.approx(1 / 3)
    # LRAP: row 0: label 0 rank1 ->1/1, label 2 rank3 ->2/3 -> 5/6
    #       row 1: label 1 rank 3 (ties count as ahead) -> 1/3
    #       row 3: label 1 rank 2 -> 1/2, label 0 rank 3 -> 2/3 -> 7/12
    assert m["average_precision"] == pytest.approx((5 / 6 + 1 / 3 + 7 / 12) / 3)


def test_undefined_metrics_are_nan() -> None:
    y = np.zeros((3, 4), dtype=int)
    m = compute_metrics(y, np.full((3, 4), 0.7))
    for name in ("mAP", "C-P", "C-R", "C-F1", "ranking_loss", "coverage", "one_error", "average_precision"):
        assert math.isnan(m[name]), name
    assert m["O-P"] == 0.0 and m["hamming_loss"] == 1.0


@pytest.mark.parametrize(
    ("y", "s"),
    [
        (np.zeros((3, 4)), np.zeros((3, 5))),
        (np.zeros((3, 4)), np.zeros((4, 4))),
        (np.zeros(4), np.zeros(4)),
        (np.zeros((0, 4)), np.zeros((0, 4))),
        (np.full((2, 2), 2), np.zeros((2, 2))),
        (np.zeros((2, 2)), np.array([[0.1, np.nan], [0.2, 0.3]])),
    ],
)
def test_bad_input_raises(y: np.ndarray, s: np.ndarray) -> None:
    with pytest.raises(InputError):
        compute_metrics(y, s)


def test_shape_mismatch_message() -> None:
    with pytest.raises(InputError, match="same shape"):
        per_class_average_precision(np.zeros((3, 4)), np.zeros((3, 5)))


def test_higher_is_better_covers_all_metrics() -> None:
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    assert not HIGHER_IS_BETTER["hamming_loss"] and HIGHER_IS_BETTER["mAP"]


def test_a_class_without_positives_is_left_out_of_every_class_average() -> None:
    from retdmctl.metrics import classes_without_positives

    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    s = np.array([[0.9, 0.2, 0.8], [0.1, 0.7, 0.6], [0.6, 0.4, 0.1]])
    m = compute_metrics(y, s, threshold=0.5)
    assert list(classes_without_positives(y)) == [2]
    # class 0: TP 2 FP 0 -> P 1, R 1; class 1: TP 1, FP 0, FN 1 -> P 1, R 1/2; class 2 left out
    assert (m["C-P"], m["C-R"]) == pytest.approx((1.0, 0.75))
    # its two false positives still count in the pooled precision: TP 3, FP 2
    assert m["O-P"] == pytest.approx(3 / 5)


def test_chunked_ranking_matches_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pairwise blocks (many chunks, a ragged last one) give the same answer."""
    import retdmctl.metrics as metrics

    monkeypatch.setattr(metrics, "_PAIRWISE_BLOCK", 3 * 20 * 20)
    y, s = _random_case(7, n=301, n_labels=20, decimals=2)
    got = compute_metrics(y, s)
    want = _sklearn_reference(y, s, 0.5)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
