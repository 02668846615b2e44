"""Decision thresholds chosen on the validation split, never on test.

Two rules, both saved with the model (``checkpoint["thresholds"]``) and used by eval and
predict:

* ``global``: one threshold for every class, the one that maximises C-F1 (the F1 of the
  mean per-class precision and recall, docs/metrics.md) on validation;
* ``per_class``: each class its own threshold, the one that maximises that class's F1;
  a class without a positive in validation keeps the global one.

Thresholds are searched on a fixed grid (0.01 .. 0.99) so that a choice never hangs on
one validation image's exact score; ties go to the threshold closest to 0.5. Unknown
validation labels (``known`` False, ``?name`` in a csv file) count as neither positive
nor negative, as in :mod:`retdmctl.metrics`.
"""

from __future__ import annotations

import numpy as np

GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)
RULES = ("per_class", "global", "fixed")


def _counts(y: np.ndarray, s: np.ndarray, grid: np.ndarray, known: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, L) true positives, false positives and false negatives per grid threshold,
    over the known entries."""
    y = y.astype(bool)
    if known is not None:
        y = y & known
    tp = np.empty((len(grid), y.shape[1]))
    fp = np.empty_like(tp)
    for g, t in enumerate(grid):  # G small steps of (N, L) work: no (N, L, G) blow-up
        pred = s >= t
        if known is not None:
            pred &= known
        tp[g] = (pred & y).sum(axis=0)
        fp[g] = (pred & ~y).sum(axis=0)
    fn = y.sum(axis=0)[None, :] - tp
    return tp, fp, fn


def _argbest(values: np.ndarray, grid: np.ndarray) -> int:
    """Index of the largest value; among ties, the threshold closest to 0.5."""
    best = values.max()
    ties = np.flatnonzero(np.isclose(values, best, rtol=0, atol=1e-12))
    return int(ties[np.argmin(np.abs(grid[ties] - 0.5))])


def best_global_threshold(y: np.ndarray, s: np.ndarray, grid: np.ndarray = GRID,
                          known: np.ndarray | None = None) -> float:
    """The one threshold that maximises C-F1 over the classes with a (known) positive."""
    tp, fp, fn = _counts(y, s, grid, known)
    present = (tp + fn)[0] > 0
    if not present.any():
        return 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)[:, present].mean(axis=1)
        r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)[:, present].mean(axis=1)
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(grid[_argbest(f1, grid)])


def best_class_thresholds(y: np.ndarray, s: np.ndarray, grid: np.ndarray = GRID,
                          known: np.ndarray | None = None) -> np.ndarray:
    """Each class's F1-optimal threshold; the global one for a class without a (known) positive."""
    tp, fp, fn = _counts(y, s, grid, known)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    fallback = best_global_threshold(y, s, grid, known)
    present = (tp + fn)[0] > 0
    return np.array([grid[_argbest(f1[:, c], grid)] if present[c] else fallback for c in range(y.shape[1])])


def choose(y: np.ndarray, s: np.ndarray, known: np.ndarray | None = None) -> dict:
    """Both rules' thresholds for a model's validation scores (``known``: False where a
    label is unknown), to save with it."""
    return {"global": best_global_threshold(y, s, known=known),
            "per_class": [float(t) for t in best_class_thresholds(y, s, known=known)]}


def resolve(choice: dict | None, rule: str, fixed: float, num_classes: int) -> np.ndarray:
    """The (L,) thresholds to apply under ``rule`` (per_class | global | fixed)."""
    if rule == "fixed":
        return np.full(num_classes, fixed)
    if choice is None:
        from retdmctl.errors import CheckpointError

        raise CheckpointError("the checkpoint has no thresholds chosen on validation: retrain it, or use a fixed --threshold")
    if rule == "global":
        return np.full(num_classes, choice["global"])
    return np.asarray(choice["per_class"], dtype=np.float64)


def cross_fitted_cf1(y: np.ndarray, s: np.ndarray, groups: np.ndarray, known: np.ndarray | None = None) -> float:
    """C-F1 of per-class thresholds judged on images that did not choose them: for each
    group g (a fold, or the validation split), the thresholds chosen on every other group
    (:func:`best_class_thresholds`) decide group g's images; the true and false positives
    and false negatives of all groups are summed, and C-F1 is the F1 of the mean per-class
    precision and recall over the classes with a (known) positive (docs/metrics.md). What
    it measures is how well thresholds chosen this way transfer, not how well they fit."""
    tp = fp = fn = 0
    for g in np.unique(groups):
        inside = groups == g
        cut = best_class_thresholds(y[~inside], s[~inside], known=None if known is None else known[~inside])
        counts = _decided(y[inside], s[inside] >= cut, None if known is None else known[inside])
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    return _c_f1(tp, fp, fn)


def c_f1(y: np.ndarray, pred: np.ndarray, known: np.ndarray | None = None) -> float:
    """C-F1 of the (N, L) decisions ``pred`` (as :func:`retdmctl.metrics.compute_metrics`)."""
    return _c_f1(*_decided(y, pred, known))


def _decided(y: np.ndarray, pred: np.ndarray, known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class true positives, false positives and false negatives over the known entries."""
    y = y.astype(bool)
    if known is not None:
        y, pred = y & known, pred & known
    return (pred & y).sum(axis=0), (pred & ~y).sum(axis=0), (~pred & y).sum(axis=0)


def _c_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """F1 of the mean per-class precision and recall over the classes with a positive
    (a class without a predicted positive has precision 0)."""
    present = tp + fn > 0
    if not present.any():
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)[present].mean()
        r = (tp / np.maximum(tp + fn, 1))[present].mean()
    return float(2 * p * r / (p + r)) if p + r > 0 else 0.0
