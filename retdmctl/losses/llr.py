"""LL-R: large-loss rejection for weakly supervised multi-label classification.

Kim, Kim, Akata, Lee: "Large Loss Matters in Weakly Supervised Multi-Label
Classification", CVPR 2022. Official code: github.com/snucml/LargeLossMatters
(``losses.py: compute_batch_loss``, ``config.py``, ``train.py``).

Unobserved entries are read as negatives (BCE against 0); in each batch the unobserved
entries with the largest loss are rejected (weight 0), because late in training they are
mostly false negatives being memorised.

Schedule (official code): ``clean_rate`` starts at 1 and after every epoch
``clean_rate -= delta_rel``, where ``--delta_rel`` is given in percent and divided by 100
(``config.py``); the README's grid is delta_rel in {0.1, 0.2, 0.3, 0.4, 0.5} %. With
epochs numbered from 1 (as there, and in this project's loop) the rejection rate in epoch
``e`` is ``(e - 1) * delta_rel``: nothing is rejected in epoch 1. The number rejected in a
batch is ``k = ceil(N * C * rate)``: a fraction of *all* N*C entries of the batch, taken
from the unobserved ones.

Differences from the official code, all in edge cases:

* Exactly the k unobserved entries of largest loss are rejected (ties broken by
  ``torch.topk``); the official code rejects every entry whose loss is >= the k-th
  largest, which can reject more on ties and, when k exceeds the number of unobserved
  entries with a nonzero loss, rejects observed positives too. Here k is capped at the
  number of unobserved entries.
* Reduction: the mean over the *kept* entries (the official code divides the sum by all
  N*C entries, counting rejected ones as zeros; ``reduction="all"`` reproduces that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Default per-epoch increment of the rejection rate: 0.2 % (``--delta_rel 0.2``), the
#: middle of the official README's grid {0.1, ..., 0.5} %.
DEFAULT_DELTA_REL = 0.002


def rejection_rate(epoch: int, delta_rel: float = DEFAULT_DELTA_REL) -> float:
    """Fraction of a batch's N*C entries rejected in ``epoch`` (1-based):
    ``(epoch - 1) * delta_rel``, clipped to [0, 1]."""
    return min(max((epoch - 1) * delta_rel, 0.0), 1.0)


def llr_rejection_mask(
    logits: torch.Tensor,
    y_obs: torch.Tensor,
    epoch: int,
    delta_rel: float = DEFAULT_DELTA_REL,
    mask_unobserved: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (N, C): True where an entry is rejected this batch.

    Args:
        logits: (N, C) raw scores.
        y_obs: (N, C) float, 1 = observed positive, 0 otherwise.
        epoch: 1-based epoch.
        delta_rel: per-epoch increment of the rejection rate (a fraction, 0.002 = 0.2 %).
        mask_unobserved: bool (N, C), True = unobserved (a rejection candidate);
            defaults to ``y_obs == 0``. Pass ``observed == -1`` to keep observed
            negatives out of the candidates.
    """
    unobserved = (y_obs <= 0.5) if mask_unobserved is None else mask_unobserved.bool()
    n_entries = logits.numel()
    k = math.ceil(n_entries * rejection_rate(epoch, delta_rel) - 1e-9)
    k = min(k, int(unobserved.sum().item()))
    rejected = torch.zeros_like(unobserved, dtype=torch.bool)
    if k <= 0:
        return rejected
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(logits.detach(), torch.zeros_like(logits), reduction="none")
        candidates = torch.where(unobserved, loss, torch.full_like(loss, -math.inf))
        idx = torch.topk(candidates.flatten(), k).indices
    rejected.view(-1)[idx] = True
    return rejected


def llr_loss(
    logits: torch.Tensor,
    y_obs: torch.Tensor,
    epoch: int,
    delta_rel: float = DEFAULT_DELTA_REL,
    mask_unobserved: torch.Tensor | None = None,
    *,
    reduction: str = "kept",
) -> torch.Tensor:
    """LL-R loss: BCE with unobserved entries as negatives, the largest-loss unobserved
    entries rejected (see :func:`llr_rejection_mask`).

    ``reduction="kept"`` (default): mean over the kept entries; ``"all"``: sum over kept
    entries divided by N*C (the official code)."""
    y = (y_obs > 0.5).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    kept = ~llr_rejection_mask(logits, y_obs, epoch, delta_rel, mask_unobserved)
    total = (loss * kept).sum()
    if reduction == "kept":
        return total / kept.sum().clamp_min(1)
    if reduction == "all":
        return total / max(loss.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}; known: kept, all")
