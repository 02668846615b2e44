"""Multi-label classification metrics (numpy only).

All functions take ``y_true`` of shape ``(N, L)`` with values in {0, 1} (any integer or
bool dtype) and ``scores`` of shape ``(N, L)`` holding per-label probabilities.

Conventions (the project's spec):

* A label is predicted positive when ``score >= threshold`` (inclusive).
* Classes without a positive in the evaluated labels have no defined recall or AP: they
  are left out of *every* per-class average (``mAP``, ``C-P``, ``C-R``, ``C-F1``), one
  convention for all four, and the report names them. Their false positives still count
  in the pooled ``O-P`` and in ``hamming_loss``.
* Per-class precision is 0 for a class with no predicted positive. ``C-P``/``C-R`` are
  the means over the classes with a positive, and ``C-F1`` is the F1 of those two means
  (not the mean of per-class F1s).
* ``O-P``/``O-R``/``O-F1`` pool the counts of all classes (micro averaging).
* Ranking metrics (``ranking_loss``, ``coverage``, ``one_error``, ``average_precision``)
  ignore images with no true label; ``coverage`` is 0-based (sklearn's
  ``coverage_error`` minus 1). Ties in scores are handled exactly as scikit-learn does:
  in ``ranking_loss`` a tied (relevant, irrelevant) pair counts as mis-ordered, and in
  ``coverage``/``average_precision`` a label's rank is the number of labels scored at
  least as high. ``one_error`` takes the *first* index of the maximum score
  (``np.argmax``) as the top label.
* ``mAP`` is the mean of the non-interpolated per-class average precision (sklearn's
  ``average_precision_score``) over classes with at least one positive; tied scores form
  one threshold step.

A metric that is undefined for the input (no class with a positive for ``mAP``, no image
with a true label for the ranking metrics) is ``nan``.

Unknown labels (``known``, an optional ``(N, L)`` bool mask; False = the label of that
image is unknown, ``?name`` in a csv file) are left out of every metric, as if the entry
were not there: a class's AP, precision and recall are computed over the images where
that class is known; ``O-*`` and ``hamming_loss`` over the known entries; the ranking
metrics rank each image's known labels only (``one_error`` takes the top known label).
With every label known this is exactly the unmasked computation.
"""

from __future__ import annotations

import numpy as np

from retdmctl.errors import InputError

METRIC_NAMES: tuple[str, ...] = (
    "mAP",
    "C-P",
    "C-R",
    "C-F1",
    "O-P",
    "O-R",
    "O-F1",
    "hamming_loss",
    "ranking_loss",
    "coverage",
    "one_error",
    "average_precision",
)

HIGHER_IS_BETTER: dict[str, bool] = {
    "mAP": True,
    "C-P": True,
    "C-R": True,
    "C-F1": True,
    "O-P": True,
    "O-R": True,
    "O-F1": True,
    "hamming_loss": False,
    "ranking_loss": False,
    "coverage": False,
    "one_error": False,
    "average_precision": True,
}

# Upper bound on the number of booleans in one (rows, L, L) pairwise-comparison block.
_PAIRWISE_BLOCK = 1 << 24


def _validate(y_true: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes and values; return ``(bool labels, float64 scores, bool known or None)``.
    ``known`` comes back None when every entry is known (the unmasked fast path), and the
    labels come back False where unknown."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 2 or scores.ndim != 2:
        raise InputError(
            f"y_true and scores must be 2-D (N, L) arrays, got shapes "
            f"{y_true.shape} and {scores.shape}"
        )
    if y_true.shape != scores.shape:
        raise InputError(
            f"y_true and scores must have the same shape, got {y_true.shape} "
            f"and {scores.shape}"
        )
    if y_true.shape[0] == 0 or y_true.shape[1] == 0:
        raise InputError(f"need at least one image and one label, got shape {y_true.shape}")
    if y_true.dtype != bool:
        if not np.isin(y_true, (0, 1)).all():
            raise InputError("y_true must contain only 0 and 1")
        y_true = y_true != 0
    try:
        scores = scores.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"scores must be numeric: {exc}") from None
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or infinite values")
    if known is not None:
        known = np.asarray(known)
        if known.shape != y_true.shape:
            raise InputError(f"known must have the labels' shape {y_true.shape}, got {known.shape}")
        known = known.astype(bool)
        if known.all():
            known = None
        else:
            y_true = y_true & known
    return y_true, scores, known


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """Elementwise ``num / den`` with 0 where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _hamming(pred: np.ndarray, y: np.ndarray, known: np.ndarray | None) -> float:
    """The share of (known) entries predicted wrong; nan when no entry is known."""
    wrong = pred != y
    if known is None:
        return float(wrong.mean())
    return float(wrong[known].mean()) if known.any() else float("nan")


def _f1(p: float, r: float) -> float:
    """Harmonic mean of ``p`` and ``r`` (0 when both are 0)."""
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _per_class_ap(y: np.ndarray, s: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Non-interpolated AP per column of validated inputs; NaN for a column without positives.

    Equivalent to sklearn's step integral over the precision-recall curve: each
    positive contributes ``1/P`` times the precision measured at the lowest score of
    its tie group (all tied items cross the threshold together). An unknown entry
    (``y`` already False there) is scored -inf: it ranks below every known entry (the
    validated scores are finite), so it changes no precision at any positive, which is
    AP over the known rows of that column.
    """
    if known is not None:
        s = np.where(known, s, -np.inf)
    n = s.shape[0]
    order = np.argsort(-s, axis=0, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=0)
    y_sorted = np.take_along_axis(y, order, axis=0)
    tps = np.cumsum(y_sorted, axis=0)
    precision = tps / np.arange(1, n + 1, dtype=np.float64)[:, None]
    # Index of the last row of the tie group each row belongs to.
    is_end = np.ones_like(s_sorted, dtype=bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    end_idx = np.where(is_end, np.arange(n)[:, None], n - 1)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    prec_at_end = np.take_along_axis(precision, end_idx, axis=0)
    n_pos = y.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (y_sorted * prec_at_end).sum(axis=0) / n_pos
    ap[n_pos == 0] = np.nan
    return ap


def classes_without_positives(y_true: np.ndarray) -> np.ndarray:
    """Indices of the classes with no positive: left out of every per-class average."""
    return np.flatnonzero(~np.asarray(y_true).astype(bool).any(axis=0))


def per_class_average_precision(y_true: np.ndarray, scores: np.ndarray,
                                known: np.ndarray | None = None) -> np.ndarray:
    """Average precision of each class, shape ``(L,)``; NaN for a class with no positive.

    Matches ``sklearn.metrics.average_precision_score`` applied to each column (to the
    column's known rows where ``known`` is given).
    """
    y, s, known = _validate(y_true, scores, known)
    return _per_class_ap(y, s, known)


def _ranking_metrics(y: np.ndarray, s: np.ndarray, known: np.ndarray | None = None) -> dict[str, float]:
    """Ranking loss, 0-based coverage, one-error and LRAP over rows with a true label,
    each row ranking its known labels only."""
    keep = y.any(axis=1)
    if not keep.any():
        nan = float("nan")
        return {"ranking_loss": nan, "coverage": nan, "one_error": nan, "average_precision": nan}
    y, s = y[keep], s[keep]
    n, n_labels = y.shape
    yf = y.astype(np.float64)
    kf = None if known is None else known[keep].astype(np.float64)
    n_pos = yf.sum(axis=1)
    n_neg = (n_labels if kf is None else kf.sum(axis=1)) - n_pos

    rank_loss = np.empty(n)
    coverage = np.empty(n)
    lrap = np.empty(n)
    step = max(1, _PAIRWISE_BLOCK // (n_labels * n_labels))
    for start in range(0, n, step):
        sl = slice(start, start + step)
        sb, yb = s[sl], yf[sl]
        # ge[i, j, k]: label k scores at least as high as label j in image i.
        ge = sb[:, None, :] >= sb[:, :, None]
        # labels at least as high, of the known ones when some are unknown
        n_ge_all = ge.sum(axis=2) if kf is None else np.einsum("ijk,ik->ij", ge, kf[sl], dtype=np.float64)
        n_ge_rel = np.einsum("ijk,ik->ij", ge, yb, dtype=np.float64)
        n_ge_irr = n_ge_all - n_ge_rel
        rank_loss[sl] = (yb * n_ge_irr).sum(axis=1)
        coverage[sl] = np.where(yb > 0, n_ge_all, 0).max(axis=1) - 1
        lrap[sl] = (yb * _safe_div(n_ge_rel, n_ge_all)).sum(axis=1)  # 0 / 0 only at unknown labels

    rank_loss = _safe_div(rank_loss, n_pos * n_neg)  # 0 for all-positive rows
    lrap = lrap / n_pos
    top = np.argmax(s if kf is None else np.where(kf > 0, s, -np.inf), axis=1)
    one_error = ~y[np.arange(n), top]
    return {
        "ranking_loss": float(rank_loss.mean()),
        "coverage": float(coverage.mean()),
        "one_error": float(one_error.mean()),
        "average_precision": float(lrap.mean()),
    }


def compute_metrics(
    y_true: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray = 0.5,
    known: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute every metric in :data:`METRIC_NAMES`, keyed in that order.

    A label is predicted positive when ``scores >= threshold`` (one threshold, or one per
    class as an ``(L,)`` array). See the module docstring
    for the exact conventions (``known``: unknown entries left out). Raises
    :class:`~retdmctl.errors.InputError` for mismatched shapes, non-binary labels or
    non-finite scores.
    """
    y, s, known = _validate(y_true, scores, known)
    pred = s >= threshold
    if known is not None:
        pred = pred & known  # an unknown entry is neither a true nor a false positive

    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)  # y is False where unknown
    present = y.any(axis=0)
    if present.any():
        c_p = float(_safe_div(tp, tp + fp)[present].mean())
        c_r = float(_safe_div(tp, tp + fn)[present].mean())
    else:
        c_p = c_r = float("nan")
    o_p = float(_safe_div(tp.sum(), tp.sum() + fp.sum()))
    o_r = float(_safe_div(tp.sum(), tp.sum() + fn.sum()))

    ap = _per_class_ap(y, s, known)
    m_ap = float(np.nanmean(ap)) if not np.isnan(ap).all() else float("nan")

    result = {
        "mAP": m_ap,
        "C-P": c_p,
        "C-R": c_r,
        "C-F1": _f1(c_p, c_r) if present.any() else float("nan"),
        "O-P": o_p,
        "O-R": o_r,
        "O-F1": _f1(o_p, o_r),
        "hamming_loss": _hamming(pred, y, known),
    }
    result.update(_ranking_metrics(y, s, known))
    return {name: result[name] for name in METRIC_NAMES}
