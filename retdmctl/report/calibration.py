"""How well the evaluated scores read as probabilities: the figures of the report's
Calibration section, from the split's scores held in memory (pure numpy, no I/O).

Every (image, class) entry is pooled; unknown entries (``known`` False) and non-finite
scores are left out. Bins are equal-width on [0, 1], each half-open ``[lo, hi)`` but the
last, which takes 1.0; a score outside [0, 1] falls in the nearest end bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _pooled(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The entries that count, flattened: (positive?, score)."""
    keep = np.isfinite(scores)
    if known is not None:
        keep &= known
    return labels[keep].astype(bool), scores[keep].astype(np.float64)


def _bin_of(s: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(s * bins), 0, bins - 1).astype(np.intp)


def reliability(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None,
                bins: int = 10) -> dict[str, Any]:
    """Per bin: ``count``, ``mean_score`` and ``positive_fraction`` (None for an empty
    bin); ``entries`` (how many counted) and ``ece`` (None without any entry)."""
    y, s = _pooled(labels, scores, known)
    b = _bin_of(s, bins)
    count = np.bincount(b, minlength=bins)
    total = np.bincount(b, weights=s, minlength=bins)
    pos = np.bincount(b, weights=y, minlength=bins)
    filled = count > 0
    mean = np.divide(total, count, out=np.zeros(bins), where=filled)
    frac = np.divide(pos, count, out=np.zeros(bins), where=filled)
    n = int(count.sum())
    # bin-count-weighted mean gap: sum over bins of count/n * |mean score - positive fraction|
    gap = float((count * np.abs(mean - frac)).sum() / n) if n else None
    return {"bins": bins, "entries": n, "count": count.tolist(),
            "mean_score": [float(m) if f else None for m, f in zip(mean, filled)],
            "positive_fraction": [float(p) if f else None for p, f in zip(frac, filled)],
            "ece": gap}


def ece(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None, bins: int = 10) -> float | None:
    """Expected calibration error over ``bins`` equal-width bins (None without any entry)."""
    return reliability(labels, scores, known, bins)["ece"]


def histogram(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None,
              bins: int = 20) -> dict[str, Any]:
    """Entries per bin, positives and negatives apart; ``edges`` has ``bins + 1`` values."""
    y, s = _pooled(labels, scores, known)
    b = _bin_of(s, bins)
    return {"edges": np.linspace(0, 1, bins + 1).round(6).tolist(),
            "positives": np.bincount(b[y], minlength=bins).tolist(),
            "negatives": np.bincount(b[~y], minlength=bins).tolist()}


def distinct_values(scores: np.ndarray, known: np.ndarray | None = None, decimals: int = 3) -> int:
    """How many distinct score values the counted entries take, rounded to ``decimals``."""
    _, s = _pooled(np.zeros(scores.shape, dtype=bool), scores, known)
    return int(np.unique(np.round(s, decimals)).size)


def summary(labels: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None) -> dict[str, Any]:
    """What the report shows: the 10-bin reliability curve (with its ECE), the 20-bin
    histogram and the distinct values to 3 decimals."""
    rel = reliability(labels, scores, known, bins=10)
    return {"reliability": rel, "histogram": histogram(labels, scores, known, bins=20),
            "entries": rel["entries"], "ece": rel["ece"], "distinct": distinct_values(scores, known, 3)}
