"""ASL, masked BCE and the base-loss registry against NumPy hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retdmctl.errors import ConfigError
from retdmctl.losses.asl import ASL_OPTIMIZER, asl_loss
from retdmctl.losses.base import BASE_LOSSES, base_loss, masked_bce, targets_from_observed


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_asl(z, y, mask=None, gp=0.0, gn=4.0, clip=0.05, eps=1e-8):
    """Per-entry value and d/dz (focusing weight held constant, as the official code)."""
    p = _sig(z)
    pm = np.maximum(p - clip, 0.0)
    lpos = -((1 - p) ** gp) * np.log(np.maximum(p, eps))
    lneg = -(pm**gn) * np.log(np.maximum(1 - pm, eps))
    dpos = -((1 - p) ** gp) * (1 - p) * (p >= eps)  # d/dz of -w log p = -w (1 - p)
    dpm = p * (1 - p) * (p > clip)
    dneg = (pm**gn) * dpm / (1 - pm)
    val = np.where(y == 1, lpos, lneg)
    grad = np.where(y == 1, dpos, dneg)
    if mask is not None:
        val, grad = val * mask, grad * mask
    n = z.shape[0]
    return val.sum() / n, grad / n


# logits chosen so that sigmoid spans both sides of the clip (p=0.05 <-> z=-2.944)
Z = np.array([[-4.0, -2.0, 0.0, 1.5], [3.0, -3.5, 0.7, -0.3], [-1.0, 2.5, -6.0, 4.0]])
Y = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [1, 0, 1, 0]], dtype=float)


def _run(z, y, mask=None, **kw):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    mt = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    loss = asl_loss(zt, torch.tensor(y), mt, **kw)
    loss.backward()
    return loss.item(), zt.grad.numpy()


def test_asl_value_and_gradient_match_numpy():
    got, grad = _run(Z, Y)
    want, want_grad = _np_asl(Z, Y)
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-15)


def test_asl_clip_removes_easy_negatives():
    # negatives with p <= 0.05 (z = -4, -3.5, -6) contribute no loss and no gradient
    z = np.array([[-4.0, -3.5, -6.0]])
    got, grad = _run(z, np.zeros_like(z))
    assert got == 0.0
    assert np.all(grad == 0.0)
    # without the clip they do
    got, grad = _run(z, np.zeros_like(z), clip=0.0)
    assert got > 0 and np.all(grad > 0)


def test_asl_mask_ignores_entries():
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    got, grad = _run(Z, Y, mask)
    want, want_grad = _np_asl(Z, Y, mask)
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-15)
    assert np.all(grad[~mask] == 0.0)


def test_asl_full_derivative_option():
    # detach_focal_weight=False differentiates the weight too: compare with autograd
    # of the same formula written directly
    zt = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    asl_loss(zt, torch.tensor(Y), detach_focal_weight=False).backward()
    z2 = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(z2)
    pm = (p - 0.05).clamp_min(0)
    y = torch.tensor(Y)
    direct = -(y * torch.log(p) + (1 - y) * pm**4 * torch.log(1 - pm)).sum() / 3
    direct.backward()
    torch.testing.assert_close(zt.grad, z2.grad)


def test_asl_reduces_to_summed_bce():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(5, 7) < 0.4).double()
    got = asl_loss(z, y, gamma_pos=0, gamma_neg=0, clip=0)
    want = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / 5
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got, z)
    g2, = torch.autograd.grad(want, z)
    torch.testing.assert_close(g1, g2)


def test_masked_bce_mean_over_counted_entries():
    z = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    got = masked_bce(z, y, mask)
    zz, yy = z.detach().numpy(), y.numpy()
    per = -(yy * np.log(_sig(zz)) + (1 - yy) * np.log(1 - _sig(zz)))
    assert got.item() == pytest.approx(per[mask.numpy()].mean(), rel=1e-12)
    got.backward()
    assert z.grad[0, 1] == 0.0
    torch.testing.assert_close(masked_bce(z, y), F.binary_cross_entropy_with_logits(z, y))
    # nothing counted: zero, finite gradient
    z.grad = None
    none = masked_bce(z, y, torch.zeros(2, 2, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.all(z.grad == 0)


def test_targets_from_observed():
    obs = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    y, known = targets_from_observed(obs)
    assert y.tolist() == [[1.0, 0.0, 0.0]]
    assert known.tolist() == [[True, True, False]]


def test_base_loss_registry():
    assert base_loss("bce") is masked_bce
    assert base_loss("asl") is asl_loss
    assert set(BASE_LOSSES) == {"bce", "asl"}
    with pytest.raises(ConfigError, match="known: asl, bce"):
        base_loss("focal")


def test_asl_optimizer_constant_documents_source():
    assert ASL_OPTIMIZER["optimizer"] == "adam"
    assert ASL_OPTIMIZER["lr"] == 1e-4 and ASL_OPTIMIZER["weight_decay"] == 1e-4
    assert ASL_OPTIMIZER["scheduler"] == "onecycle"
    assert "Alibaba-MIIL/ASL" in ASL_OPTIMIZER["source"]
