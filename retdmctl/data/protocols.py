"""Missing-label protocols: which training labels a model gets to see.

Each protocol takes the full 0/1 label matrix ``labels`` (N, L), the indices ``rows`` of
the training rows, and a seed, and returns the int8 *observed* matrix (N, L) with
1 = observed positive, 0 = observed negative, -1 = unknown. Rows outside ``rows`` are
returned fully observed (a copy of ``labels``): the test split always keeps the full
labels (docs/method.md); validation rows get a draw of their own under
``labels.val_protocol = same`` (:mod:`retdmctl.training.labels`).

* ``keep_positives(labels, rows, p, seed)``: keep ``round(p * k)`` of each training row's
  k positives (at least one when k > 0), chosen uniformly; everything else in that row
  becomes -1. The protocols "keep 75 % / 40 % of the positives" of the CLML paper.
* ``single_positive(labels, rows, seed)``: keep one positive per training row, chosen
  uniformly; everything else -1 (single-positive multi-label learning, as in LL-R).
* ``hide_entries(labels, rows, fraction, seed)``: hide ``round(fraction * len(rows) * L)``
  entries of the training rows, drawn uniformly without replacement from all of them,
  positives and negatives alike; only those become -1.

In "keep" and "single" every non-kept entry is -1, not 0: a hidden positive cannot be
told from a negative (the positive-unlabelled setting), so a loss that wants "assume
negative" reads -1 as 0 itself. A training row with no positive at all becomes all -1.

Determinism: each protocol draws from its own generator,
``np.random.default_rng([seed, PROTOCOL_ID])``, so the same seed gives the same matrix
whatever else used that seed, and protocols do not share a stream. A nonzero ``stream``
(the validation rows' draw, ``labels.val_protocol = same``) makes it
``default_rng([seed, PROTOCOL_ID, stream])``: a draw of its own. Rows are processed in
ascending order of ``rows`` (the order ``rows`` is given in does not matter). ``round``
is numpy's round-half-to-even (2.5 -> 2).
"""

from __future__ import annotations

import numpy as np

from retdmctl.config import CHOICES
from retdmctl.errors import ConfigError

PROTOCOLS: tuple[str, ...] = CHOICES["labels.protocol"]

# generator stream ids, one per protocol (part of the seed: never renumber)
_ID_KEEP = 101
_ID_SINGLE = 102
_ID_HIDE = 103


def _prepare(labels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ConfigError(f"labels must be a 2-D (N, L) matrix, got shape {labels.shape}")
    rows = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if rows.size and (rows[0] < 0 or rows[-1] >= labels.shape[0]):
        raise ConfigError(f"training rows must lie in [0, {labels.shape[0]}), got {rows[0]}..{rows[-1]}")
    return (labels > 0).astype(np.int8), rows


def _keep_per_row(observed: np.ndarray, rows: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each training row keep ``counts[i]`` of its positives, chosen uniformly
    without replacement (the positives with the smallest random keys); the rest of the
    row becomes -1. Vectorised: one (len(rows), L) draw, no loop over rows."""
    sub = observed[rows] == 1
    keys = rng.random(sub.shape)
    keys[~sub] = np.inf
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    keep = sub & (rank < counts[:, None])
    observed[rows] = np.where(keep, 1, -1).astype(np.int8)
    return observed


def _rng(seed: int, protocol_id: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, protocol_id, stream] if stream else [seed, protocol_id])


def keep_positives(labels: np.ndarray, rows: np.ndarray, p: float, seed: int, stream: int = 0) -> np.ndarray:
    """Keep a fraction ``p`` of each training row's positives (``round(p*k)``, at least
    one when k > 0); every other entry of a training row becomes -1."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"keep fraction must be in [0, 1], got {p}")
    observed, rows = _prepare(labels, rows)
    rng = _rng(seed, _ID_KEEP, stream)
    k = (observed[rows] == 1).sum(axis=1)
    counts = np.minimum(k, np.maximum(1, np.round(p * k).astype(np.int64)))
    return _keep_per_row(observed, rows, counts, rng)


def single_positive(labels: np.ndarray, rows: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Keep one positive per training row, chosen uniformly; every other entry of a
    training row becomes -1."""
    observed, rows = _prepare(labels, rows)
    rng = _rng(seed, _ID_SINGLE, stream)
    k = (observed[rows] == 1).sum(axis=1)
    return _keep_per_row(observed, rows, np.minimum(k, 1), rng)


def hide_entries(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int, stream: int = 0) -> np.ndarray:
    """Hide ``round(fraction * len(rows) * L)`` entries of the training rows, uniformly
    without replacement over positives and negatives alike; they become -1."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"hide fraction must be in [0, 1], got {fraction}")
    observed, rows = _prepare(labels, rows)
    n_labels = observed.shape[1]
    total = rows.size * n_labels
    n_hide = int(np.round(fraction * total))
    rng = _rng(seed, _ID_HIDE, stream)
    flat = rng.choice(total, size=n_hide, replace=False)
    observed[rows[flat // n_labels], flat % n_labels] = -1
    return observed


def apply_protocol(labels: np.ndarray, rows: np.ndarray, name: str, p: float, seed: int, stream: int = 0) -> np.ndarray:
    """Dispatch on ``name``: "full" (everything observed; p ignored), "keep"
    (:func:`keep_positives` with fraction p), "single" (:func:`single_positive`; p
    ignored), "hide" (:func:`hide_entries` with fraction p). ConfigError otherwise."""
    if name == "full":
        observed, _ = _prepare(labels, rows)
        return observed
    if name == "keep":
        return keep_positives(labels, rows, p, seed, stream)
    if name == "single":
        return single_positive(labels, rows, seed, stream)
    if name == "hide":
        return hide_entries(labels, rows, p, seed, stream)
    raise ConfigError(f"unknown missing-label protocol {name!r}; known: {', '.join(PROTOCOLS)}")


def describe(summary: dict) -> str:
    """One line: the protocol a training stage's labels were under (its summary's
    ``labels``, :func:`retdmctl.training.labels.training_view`)."""
    s = summary["labels"]
    p = f" {s['fraction']:g}" if "fraction" in s else ""
    line = (
        f"labels: {s['protocol']}{p} (seed {s['seed']}): {s['hidden_positives']} of {s['train_positives']} "
        f"training positives hidden, {s['unknown_entries']} unknown entries read as {s['unknown']}"
    )
    if s.get("val_protocol") == "same":
        line += (f"; validation under the same protocol: {s['val_hidden_positives']} of {s['val_positives']} "
                 "positives hidden, read as negative")
    elif s.get("val_protocol") == "full" and s["protocol"] != "full":
        line += "; validation on full labels"
    return line
