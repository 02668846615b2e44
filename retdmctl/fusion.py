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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from retdmctl.data.dataset import ids_mismatch
from retdmctl.errors import CheckpointError

GRID = {"k": (5, 10, 20, 40), "temp": (0.05, 0.1, 1.0), "w": (0.0, 0.1, 0.2, 0.3, 0.5)}
CHUNK = 1024  # query rows per similarity block: (CHUNK, N_train) floats at a time


def normalize(f: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(f.float(), dim=1, eps=1e-12)


class NeighbourVote(nn.Module):
    """The fused scorer: ``forward(f, p)`` -> (1 - w) p + w * vote(f)."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, k: int, temp: float, w: float) -> None:
        super().__init__()
        self.register_buffer("bank", normalize(bank))  # (N, D), unit rows
        self.register_buffer("labels", labels.float())  # (N, L)
        self.rows = rows.cpu().numpy().astype(np.int64)  # dataset rows of the bank (to leave an image out of its own vote)
        self.k, self.temp, self.w = int(k), float(temp), float(w)

    def vote(self, f: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) label vote of each row's k nearest bank images; ``exclude`` (B,) is a bank
        position per row to leave out (-1 for none), so a training image never votes for itself."""
        sim = normalize(f) @ self.bank.T
        if exclude is not None:
            hit = exclude >= 0
            sim[hit, exclude[hit]] = float("-inf")
        top, idx = sim.topk(self.k, dim=1)
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
        return torch.from_numpy(pos).to(self.bank.device)

    def describe(self) -> dict:
        return {"k": self.k, "temp": self.temp, "w": self.w, "bank_images": int(self.bank.shape[0])}


# --- choosing (k, t, w) on validation ----------------------------------------------------


def _mean_ap(y: np.ndarray, s: np.ndarray, known: np.ndarray | None = None) -> float:
    from retdmctl.metrics import per_class_average_precision

    ap = per_class_average_precision(y, s, known)
    return float(np.nanmean(ap)) if not np.isnan(ap).all() else float("nan")


def _top(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, idxs = [], []
    for start in range(0, len(query), CHUNK):
        top, idx = (query[start : start + CHUNK] @ bank.T).topk(k, dim=1)
        sims.append(top)
        idxs.append(idx)
    return torch.cat(sims), torch.cat(idxs)


def choose(
    train_f: np.ndarray, train_y: np.ndarray, train_rows: np.ndarray,
    val_f: np.ndarray, val_p: np.ndarray, val_y: np.ndarray, val_known: np.ndarray | None = None,
    ids: str | None = None,
) -> dict:
    """The (k, t, w) of :data:`GRID` with the best validation mAP of the fused scores, and
    the thresholds chosen on those scores. w = 0 is tried first and kept on ties.
    ``val_known``: False where a validation label is unknown (left out of both choices).
    ``ids``: the :func:`~retdmctl.data.dataset.ids_digest` of the dataset whose rows
    ``train_rows`` are, saved with them (see :func:`from_checkpoint`)."""
    from retdmctl import thresholds

    # the bank is saved as float16: choose with exactly the bank that eval and predict apply
    train_f = np.asarray(train_f, dtype=np.float16).astype(np.float32)
    bank, labels = normalize(torch.from_numpy(train_f)), torch.from_numpy(train_y).float()
    ks = sorted({min(k, len(bank)) for k in GRID["k"]})
    top, idx = _top(normalize(torch.from_numpy(val_f)), bank, ks[-1])  # sorted: the first k are the k nearest
    p = torch.from_numpy(val_p).float()
    plain = _mean_ap(val_y, val_p, val_known)
    best = (plain, ks[0], GRID["temp"][0], 0.0)
    for k in ks:
        for temp in GRID["temp"]:
            vote = (torch.softmax(top[:, :k] / temp, dim=1).unsqueeze(-1) * labels[idx[:, :k]]).sum(dim=1)
            for w in GRID["w"]:
                if w == 0.0:
                    continue
                score = _mean_ap(val_y, ((1 - w) * p + w * vote).numpy(), val_known)
                if score > best[0]:
                    best = (score, k, temp, w)
    score, k, temp, w = best
    vote_module = NeighbourVote(torch.from_numpy(train_f), labels, torch.from_numpy(train_rows), k, temp, w)
    with torch.no_grad():
        fused = vote_module(torch.from_numpy(val_f), p).numpy()
    return {
        "k": k, "temp": float(temp), "w": float(w),
        "val_mAP": float(score), "plain_val_mAP": float(plain),
        "bank": torch.from_numpy(train_f).to(torch.float16),
        "labels": torch.from_numpy(train_y).to(torch.uint8),
        "rows": torch.from_numpy(np.asarray(train_rows, dtype=np.int64)),
        "ids_digest": ids,  # the dataset those rows are rows of
        "threshold_choice": thresholds.choose(val_y, fused, val_known),
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
    if ids is None:
        rows = torch.zeros(0, dtype=torch.int64)
    elif why := ids_mismatch(saved.get("ids_digest"), ids):
        raise CheckpointError(f"{source}: its neighbour vote {why}: train again")
    else:
        rows = saved["rows"]
    return NeighbourVote(bank, labels, rows, saved["k"], saved["temp"], saved["w"])
