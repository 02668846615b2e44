"""Decoding from embedding-space neighbours, fused with the classifier.

A trained model scores an image x with embedding f = phi(x) as

    p = (1 - w) * sigmoid(W_c f) + w * sum_{j in kNN_k(f)} softmax_j(cos(f, b_j) / t) * y_j

where b_j are the training images' embeddings (eval mode, centre crop) and y_j their
training labels (the observed positives under a missing-label protocol). The vote is
the kNN decoding that RETDM's metric learning is for; fusing it with the classifier
was the best variant of bench/scene.py.

k, t and w are chosen on validation mAP from :data:`GRID`, which includes w = 0 (no
fusion): where the vote does not help on validation it is switched off. The decision
thresholds are then chosen on the fused validation scores. Everything the vote needs
(the bank, its labels and rows, k, t, w and both threshold choices) is saved in the
checkpoint under ``"fusion"``, and eval, predict, the report and export all apply the
one :class:`NeighbourVote` built from it.

The k nearest are searched exactly below :data:`~retdmctl.fusion.search.EXACT_MAX` bank
images and in a FAISS IVF index from there on (:mod:`retdmctl.fusion.search`); the kind
and its index are saved under ``fusion["search"]``, and validation chooses (k, t, w)
with that very search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retdmctl.data.dataset import ids_mismatch
from retdmctl.errors import CheckpointError
from retdmctl.fusion import search as _search
from retdmctl.fusion.search import EXACT, normalize

GRID = {"k": (5, 10, 20, 40), "temp": (0.05, 0.1, 1.0), "w": (0.0, 0.1, 0.2, 0.3, 0.5)}


class NeighbourVote(nn.Module):
    """The fused scorer: ``forward(f, p)`` -> (1 - w) p + w * vote(f)."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, k: int, temp: float, w: float,
                 search: dict | None = None) -> None:
        super().__init__()
        self.search = dict(search or EXACT)  # as saved: kind, and the IVF's parameters
        self.kind, self.size = self.search["kind"], int(bank.shape[0])
        self.index = None
        if self.kind == "exact":
            # (N, D), unit rows, normalised in place: one float32 copy of a float16 bank
            unit = bank.float().clone() if bank.dtype == torch.float32 else bank.float()
            self.register_buffer("bank", torch.nn.functional.normalize(unit, dim=1, eps=1e-12, out=unit))
        else:  # the IVF holds the unit rows (float16, on the CPU): no float32 copy
            self.index = _search.ivf_index(bank, self.search)
        self.register_buffer("labels", labels.float())  # (N, L)
        self.rows = rows.cpu().numpy().astype(np.int64)  # dataset rows of the bank (to leave an image out of its own vote)
        self.k, self.temp, self.w = int(k), float(temp), float(w)

    def top(self, f: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosines, bank positions), each (B, k), nearest first, by this vote's search."""
        q = normalize(f)
        if self.index is None:
            return _search.exact_top(q, self.bank, k, exclude)
        return _search.ivf_top(self.index, q, k, exclude)

    def vote(self, f: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) label vote of each row's k nearest bank images; ``exclude`` (B,) is a bank
        position per row to leave out (-1 for none), so a training image never votes for itself."""
        top, idx = self.top(f, self.k, exclude)
        weights = torch.softmax(top / self.temp, dim=1)
        return (weights.unsqueeze(-1) * self.labels[idx]).sum(dim=1)

    def forward(self, f: torch.Tensor, p: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        return (1 - self.w) * p.float() + self.w * self.vote(f, exclude)

    def positions(self, rows: np.ndarray) -> torch.Tensor:
        """Bank position of each dataset row, -1 where the row is not in the bank."""
        pos = np.full(len(rows), -1, dtype=np.int64)
        at = np.searchsorted(self.rows, rows)
        inside = at < len(self.rows)
        inside[inside] = self.rows[at[inside]] == rows[inside]
        pos[inside] = at[inside]
        return torch.from_numpy(pos).to(self.labels.device)

    def describe(self) -> dict:
        return {"k": self.k, "temp": self.temp, "w": self.w, "bank_images": self.size, "search": self.kind}


# --- choosing (k, t, w) ------------------------------------------------------------------


def _mean_ap(y: np.ndarray, s: np.ndarray, known: np.ndarray | None = None) -> float:
    from retdmctl.metrics import per_class_average_precision

    ap = per_class_average_precision(y, s, known)
    return float(np.nanmean(ap)) if not np.isnan(ap).all() else float("nan")


@dataclass
class Scored:
    """Images scored by one model, with their k_max nearest in that model's own bank:
    validation images under the full model, or a fold's held-out training images under
    the model trained without them (``retdmctl.training.folds``)."""

    p: np.ndarray  # (n, L) the classifier's probabilities
    y: np.ndarray  # (n, L) labels
    known: np.ndarray | None  # (n, L) False where a label is unknown; None: all known
    cos: torch.Tensor  # (n, k_max) cosines to the nearest bank images, nearest first
    idx: torch.Tensor  # (n, k_max) their bank positions
    bank_labels: torch.Tensor  # (N_bank, L) uint8

    def vote(self, k: int, temp: float, chunk: int = 4096) -> np.ndarray:
        """(n, L) the vote of the k nearest, in chunks of rows (no (n, k, L) float block)."""
        out = np.empty(self.p.shape, np.float32)
        for a in range(0, len(out), chunk):
            weights = torch.softmax(self.cos[a:a + chunk, :k] / temp, dim=1).unsqueeze(-1)
            out[a:a + chunk] = (weights * self.bank_labels[self.idx[a:a + chunk, :k]].float()).sum(dim=1).numpy()
        return out


def neighbours(vote: NeighbourVote, f: np.ndarray, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, bank positions), each (n, k), of rows ``f`` in ``vote``'s bank, in chunks."""
    cos, idx = [], []
    for a in range(0, len(f), chunk):
        c, i = vote.top(torch.from_numpy(np.asarray(f[a:a + chunk], dtype=np.float32)), k)
        cos.append(c)
        idx.append(i)
    if not cos:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(cos), torch.cat(idx)


def _pooled(parts: list[Scored], what) -> np.ndarray | None:
    arrays = [what(s) for s in parts]
    if any(a is None for a in arrays):
        if all(a is None for a in arrays):
            return None
        arrays = [np.ones(s.p.shape, bool) if a is None else a for s, a in zip(parts, arrays)]
    return np.concatenate(arrays)


def choose(
    train_f: np.ndarray, train_y: np.ndarray, train_rows: np.ndarray,
    val_f: np.ndarray, val_p: np.ndarray, val_y: np.ndarray, val_known: np.ndarray | None = None,
    ids: str | None = None, out_of_fold: list[Scored] = (),
) -> dict:
    """The vote's (k, t, w) and the thresholds of the fused scores, chosen on the
    validation images (scored by this model, voted by its bank of training embeddings
    ``train_f``) and the ``out_of_fold`` images (each part scored and voted by a model
    that never trained on it), pooled.

    (k, t, w) is the point of :data:`GRID` with the best pooled mAP; the vote is kept
    only where it also improves C-F1 as thresholds transfer
    (:func:`~retdmctl.thresholds.cross_fitted_cf1`, each part's images decided by
    thresholds chosen on the other parts; with validation alone, C-F1 of thresholds
    chosen on it). Else w = 0: no vote.
    ``val_known``: False where a validation label is unknown (left out of every choice).
    ``ids``: the :func:`~retdmctl.data.dataset.ids_digest` of the dataset whose rows
    ``train_rows`` are, saved with them (see :func:`from_checkpoint`)."""
    from retdmctl import thresholds

    # the bank is saved as float16: choose with exactly the bank and the search that eval
    # and predict apply (float16 in, one float32 copy of it: the vote's unit rows)
    bank, labels = torch.from_numpy(np.ascontiguousarray(train_f, dtype=np.float16)), torch.from_numpy(train_y).float()
    search = _search.train_ivf(bank) if _search.plan(len(bank)) == "ivf" else EXACT
    ks = sorted({min(k, len(bank), *(len(s.bank_labels) for s in out_of_fold)) for k in GRID["k"]})
    vote_module = NeighbourVote(bank, labels, torch.from_numpy(np.asarray(train_rows)), ks[-1], 1.0, 1.0, search)
    # nearest first, and the k nearest of both searches are the first k of their k_max nearest
    cos, idx = neighbours(vote_module, val_f, ks[-1])
    parts = [Scored(val_p, val_y, val_known, cos, idx, torch.from_numpy(np.asarray(train_y, dtype=np.uint8))),
             *out_of_fold]
    p, y = np.concatenate([s.p for s in parts]), np.concatenate([s.y for s in parts])
    known = _pooled(parts, lambda s: s.known)
    group = np.concatenate([np.full(len(s.p), g) for g, s in enumerate(parts)])

    def cf1(s: np.ndarray) -> float:
        if len(parts) > 1:
            return thresholds.cross_fitted_cf1(y, s, group, known)
        cut = thresholds.best_class_thresholds(y, s, known=known)
        return thresholds.c_f1(y, s >= cut, known)

    plain = _mean_ap(y, p, known)
    best = (plain, ks[0], GRID["temp"][0], 0.0)
    for k in ks:
        for temp in GRID["temp"]:
            vote = np.concatenate([s.vote(k, temp) for s in parts])
            for w in GRID["w"]:
                if w == 0.0:
                    continue
                score = _mean_ap(y, (1 - w) * p + w * vote, known)
                if score > best[0]:
                    best = (score, k, temp, w, vote)
    plain_cf1 = cf1(p)
    score, k, temp, w = best[:4]
    fused = p if w == 0 else (1 - w) * p + w * best[4]
    fused_cf1 = cf1(fused) if w > 0 else plain_cf1
    kept = w > 0 and fused_cf1 > plain_cf1
    if not kept:  # no vote: it did not improve both mAP and C-F1
        fused = p
    return {
        "k": k, "temp": float(temp), "w": float(w) if kept else 0.0,
        "val_mAP": float(score if kept else plain), "plain_val_mAP": float(plain),
        # the best vote found on mAP, and C-F1 with and without it (why it was kept or not)
        "considered": {"k": k, "temp": float(temp), "w": float(w), "mAP": float(score),
                       "C-F1": float(fused_cf1), "plain_C-F1": float(plain_cf1), "images": int(len(p))},
        "bank": bank,
        "labels": torch.from_numpy(train_y).to(torch.uint8),
        "rows": torch.from_numpy(np.asarray(train_rows, dtype=np.int64)),
        "ids_digest": ids,  # the dataset those rows are rows of
        "search": search,  # how the k nearest are found (an IVF's centroids and lists)
        "threshold_choice": thresholds.choose(y, fused, known),
    }


# --- reading it back -------------------------------------------------------------------


def from_checkpoint(ckpt: dict, source: str, *, embed_dim: int, num_classes: int,
                    ids: str | None = None) -> NeighbourVote | None:
    """The checkpoint's vote, or None where it has none or validation chose w = 0.

    Its bank knows the dataset rows it was made of, to leave an image out of its own
    vote. Scoring dataset rows (eval, the report) passes ``ids``, the dataset's
    :func:`~retdmctl.data.dataset.ids_digest`: a bank made for another image list is a
    CheckpointError, never a mapping to the wrong images. Without ``ids`` (images that
    are not dataset rows: predict) the vote knows no rows."""
    saved = ckpt.get("fusion")
    if saved is None or float(saved["w"]) == 0.0:
        return None
    bank, labels = saved["bank"], saved["labels"]
    n = bank.shape[0]
    if bank.ndim != 2 or bank.shape[1] != embed_dim or tuple(labels.shape) != (n, num_classes) or len(saved["rows"]) != n:
        raise CheckpointError(f"{source}: its neighbour vote does not fit the model (bank {tuple(bank.shape)}, "
                              f"labels {tuple(labels.shape)}, embedding {embed_dim}, {num_classes} classes)")
    if not 1 <= int(saved["k"]) <= n:
        raise CheckpointError(f"{source}: its neighbour vote has k = {saved['k']} for {n} bank images")
    search = saved.get("search") or EXACT  # saved before the IVF existed: exact
    if why := _search.check(search, n, embed_dim):
        raise CheckpointError(f"{source}: {why}")
    if ids is None:
        rows = torch.zeros(0, dtype=torch.int64)
    elif why := ids_mismatch(saved.get("ids_digest"), ids):
        raise CheckpointError(f"{source}: its neighbour vote {why}: train again")
    else:
        rows = saved["rows"]
    return NeighbourVote(bank, labels, rows, saved["k"], saved["temp"], saved["w"], search)
