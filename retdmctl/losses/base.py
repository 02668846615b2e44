"""Base classification losses for incomplete labels, and their registry.

Label convention shared by the project: an int8 *observed* matrix with 1 = observed
positive, 0 = observed negative, -1 = unknown. Losses take ``y`` as float {0, 1} targets
(unknown read as 0, "assume negative") plus an optional bool ``mask`` (True = the entry
counts); :func:`targets_from_observed` makes both from the observed matrix.
Every base loss has the signature ``loss(logits, y, mask=None) -> scalar Tensor``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from retdmctl.errors import ConfigError
from retdmctl.losses.asl import asl_loss

BaseLoss = Callable[..., torch.Tensor]


def targets_from_observed(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, known) from an int8 observed matrix: y = 1.0 where observed positive, else
    0.0 (unknown read as negative); known = True where the entry is observed (!= -1).
    Pass ``known`` as ``mask`` to ignore the unknown entries instead of assuming them
    negative."""
    return (observed == 1).float(), observed != -1


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the counted entries.

    Without ``mask`` it equals ``F.binary_cross_entropy_with_logits(logits, y)`` (mean
    over all N*L entries). With a bool ``mask`` only entries with True count, and the
    mean is over their number; no counted entry gives 0 (with a zero gradient).
    """
    y = y.to(logits.dtype)
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, y)
    per_entry = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    m = mask.to(per_entry.dtype)
    return (per_entry * m).sum() / m.sum().clamp_min(1.0)


#: name -> loss(logits, y, mask=None). "bce": :func:`masked_bce` (mean over counted
#: entries); "asl": :func:`retdmctl.losses.asl.asl_loss` with the published defaults
#: (gamma_neg 4, gamma_pos 0, clip 0.05; sum over labels, mean over rows). The two are
#: on different scales (ASL is about L times larger): retune weights when switching.
BASE_LOSSES: dict[str, BaseLoss] = {
    "bce": masked_bce,
    "asl": asl_loss,
}


def base_loss(name: str) -> BaseLoss:
    """The base loss registered as ``name``; :class:`ConfigError` listing the known
    names otherwise."""
    try:
        return BASE_LOSSES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(BASE_LOSSES))
        raise ConfigError(f"unknown base loss {name!r}; known: {known}") from None
