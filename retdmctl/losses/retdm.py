"""RETDM losses (docs/method.md): two-way metric loss, reconstruction, BCE, total."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance over the last dimension (broadcasting). The clamp keeps the
    gradient of sqrt finite when the two points coincide."""
    return ((a - b) ** 2).sum(-1).clamp_min(1e-12).sqrt()


def one_way_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-sample loss of one direction.

    anchor (B, D), positive (B, D), negatives (B, k, D):
    -log softmax(-d_pos, -d_neg_1..k)[0] + (1/k) sum_j max(0, d_pos - d_neg_j + m).
    """
    d_pos = distance(anchor, positive)  # (B,)
    d_neg = distance(anchor[:, None, :], negatives)  # (B, k)
    scores = torch.cat([-d_pos[:, None], -d_neg], dim=1)
    nll = -F.log_softmax(scores, dim=1)[:, 0]
    hinge = F.relu(d_pos[:, None] - d_neg + margin).mean(dim=1)
    return nll + hinge


def two_way_metric_loss(
    f: torch.Tensor,
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    f_neg: torch.Tensor,
    lam: float = 1.0,
    margin: float = 0.0,
) -> torch.Tensor:
    """L_metric = mean_i (L1(i) + lam * L2(i)).

    f (B, D): image embeddings f_i; g_pos (B, D): psi(u_i) of their label sets;
    g_neg (B, k, D): psi(v_j) of the k neighbouring label sets;
    f_neg (B, k, D): embeddings f_{i_j} of images whose label set is exactly v_j.
    Way 1 anchors on the image, way 2 on the label set.
    """
    loss = one_way_loss(f, g_pos, g_neg, margin)
    if lam:
        loss = loss + lam * one_way_loss(g_pos, f, f_neg, margin)
    return loss.mean()


def reconstruction_loss(rec: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_rec: mean squared error between r = W_r g + b_r and the label vector."""
    return F.mse_loss(rec, y)


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_cls: binary cross-entropy of sigmoid(W_c f + b_c) against the labels."""
    return F.binary_cross_entropy_with_logits(logits, y)


@dataclass
class LossParts:
    total: torch.Tensor
    cls: torch.Tensor
    metric: torch.Tensor
    rec: torch.Tensor

    def items(self) -> dict[str, torch.Tensor]:
        """The parts, detached and left on the device (read once per epoch: no host sync per step)."""
        return {k: getattr(self, k).detach() for k in ("total", "cls", "metric", "rec")}


def total_loss(cls: torch.Tensor, metric: torch.Tensor, rec: torch.Tensor, alpha: float, beta: float) -> LossParts:
    """L = L_cls + alpha * L_metric + beta * L_rec."""
    return LossParts(cls + alpha * metric + beta * rec, cls, metric, rec)
