"""Asymmetric Loss (ASL) for multi-label classification.

Ridnik, Ben-Baruch, Zamir, Friedman, Protter, Zelnik-Manor, Noy: "Asymmetric Loss For
Multi-Label Classification", ICCV 2021 (arXiv:2009.14119). Reference implementation:
``AsymmetricLoss`` in ``src/loss_functions/losses.py`` of github.com/Alibaba-MIIL/ASL,
used by its ``train.py`` as
``AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)``.

Per entry, with p = sigmoid(z) and the shifted probability p_m = max(p - clip, 0):

    positive (y = 1):  L+ = -(1 - p) ** gamma_pos * log(max(p, eps))
    negative (y = 0):  L- = -p_m ** gamma_neg * log(max(1 - p_m, eps))

exactly as the official code computes it: ``xs_neg = (1 - p + clip).clamp(max=1)`` is
``1 - p_m``, and the focusing weight ``(1 - pt) ** gamma`` with ``pt = xs_neg`` is
``p_m ** gamma_neg``. Consequences worth knowing: a negative with p <= clip contributes
neither loss nor gradient (hard thresholding of easy negatives), and the ``eps`` clamp
zeroes the gradient of a positive whose p < eps (a logit below about -18.4).

Focusing weight and gradient: the official ``train.py`` passes
``disable_torch_grad_focal_loss=True``, i.e. the weights ``(1-p)**gamma_pos`` and
``p_m**gamma_neg`` are computed without autograd and act as constants in the backward
pass. ``detach_focal_weight=True`` (the default) reproduces that; ``False`` gives the full
derivative analysed in the paper.

Reduction (a deliberate difference from the official code, which returns ``-loss.sum()``
over the whole batch): sum over labels, mean over the batch rows, so the loss does not
scale with the batch size. With a ``mask`` (bool, True = entry counts), masked-out entries
contribute nothing; the mean is still over all N rows.
"""

from __future__ import annotations

import torch

#: ASL's own published training recipe (Alibaba-MIIL/ASL ``train.py``, MS-COCO 2014):
#: Adam with lr 1e-4 and decoupled-from-Adam weight decay 1e-4 applied only to weights
#: (``add_weight_decay`` puts biases and 1-D parameters, i.e. BatchNorm, in a
#: no-decay group; Adam's own ``weight_decay`` is 0), a OneCycle schedule
#: (``OneCycleLR(max_lr=lr, epochs=80, pct_start=0.2)``, stepped every batch) of which
#: only the first 40 epochs are run (``Stop_epoch = 40``), batch 128, input 448 px,
#: mixed precision, and an EMA of the weights with decay 0.9997 evaluated alongside the
#: model. CLML's code (github.com/chuangua/ContrastiveLossMLML ``train_clml.py``)
#: reuses the same recipe with batch 16 and ``Stop_epoch = 25``.
ASL_OPTIMIZER: dict[str, object] = {
    "source": "github.com/Alibaba-MIIL/ASL train.py (train_multi_label_coco)",
    "optimizer": "adam",
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "weight_decay_on_bias_and_norm": False,
    "scheduler": "onecycle",
    "onecycle_pct_start": 0.2,
    "epochs_scheduled": 80,
    "epochs_run": 40,
    "batch_size": 128,
    "image_size": 448,
    "ema_decay": 0.9997,
    "loss": {"gamma_neg": 4, "gamma_pos": 0, "clip": 0.05, "eps": 1e-8,
             "disable_torch_grad_focal_loss": True},
}


def asl_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    detach_focal_weight: bool = True,
) -> torch.Tensor:
    """Asymmetric loss, summed over labels and averaged over the batch.

    Args:
        logits: (N, L) raw scores z.
        y: (N, L) float targets in {0, 1}; unknown entries read as 0 (assumed negative).
        mask: optional (N, L) bool; entries with False are ignored.
        gamma_pos, gamma_neg, clip, eps: as in the paper / official code (defaults
            0, 4, 0.05, 1e-8). ``clip=0`` disables the probability shift.
        detach_focal_weight: treat the focusing weights as constants in backward
            (official ``disable_torch_grad_focal_loss=True``).

    Returns:
        A scalar: ``sum over (counted) entries / N``. With gamma 0 and clip 0 this is
        BCE summed over labels and averaged over rows (up to the eps clamp).
    """
    y = y.to(logits.dtype)
    p = torch.sigmoid(logits)
    xs_pos = p
    xs_neg = 1.0 - p
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1.0)  # = 1 - max(p - clip, 0)

    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1.0 - y) * torch.log(xs_neg.clamp(min=eps))

    if gamma_pos > 0 or gamma_neg > 0:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_focal_weight):
            pt = xs_pos * y + xs_neg * (1.0 - y)
            gamma = gamma_pos * y + gamma_neg * (1.0 - y)
            weight = torch.pow(1.0 - pt, gamma)
        loss = loss * weight

    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    n = max(logits.shape[0], 1)
    return -loss.sum() / n
