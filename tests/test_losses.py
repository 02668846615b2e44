"""Losses against direct hand computation on tiny examples."""

from __future__ import annotations

import math

import pytest
import torch

from retdmctl.losses.retdm import (
    classification_loss,
    one_way_loss,
    reconstruction_loss,
    total_loss,
    two_way_metric_loss,
)


def _manual_one_way(anchor, pos, negs, m):
    d_pos = math.dist(anchor, pos)
    d_neg = [math.dist(anchor, n) for n in negs]
    scores = [-d_pos] + [-d for d in d_neg]
    log_z = math.log(sum(math.exp(s) for s in scores))
    nll = -(scores[0] - log_z)
    hinge = sum(max(0.0, d_pos - d + m) for d in d_neg) / len(d_neg)
    return nll + hinge


def test_one_way_loss_matches_hand_computation():
    # anchor at origin; positive at distance 1; negatives at distance 3-4-5 and sqrt(0.5)
    anchor = torch.tensor([[0.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    negs = torch.tensor([[[3.0, 4.0], [0.5, 0.5]]])
    got = one_way_loss(anchor, pos, negs, margin=0.0)
    # by hand: d_pos = 1, d_neg = (5, 0.7071); softmax NLL over (-1, -5, -0.7071)
    nll = -(-1 - math.log(math.exp(-1) + math.exp(-5) + math.exp(-math.sqrt(0.5))))
    hinge = (0 + (1 - math.sqrt(0.5))) / 2
    assert got.item() == pytest.approx(nll + hinge, rel=1e-6)


@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
def test_one_way_loss_margin_and_batch(margin):
    g = torch.Generator().manual_seed(0)
    a, p, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    got = one_way_loss(a, p, n, margin)
    for i in range(3):
        want = _manual_one_way(a[i].tolist(), p[i].tolist(), n[i].tolist(), margin)
        assert got[i].item() == pytest.approx(want, rel=1e-5)


def test_two_way_loss_is_way1_plus_lambda_way2():
    g = torch.Generator().manual_seed(1)
    f, gp = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    gn, fn = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    lam, m = 0.7, 0.1
    want = 0.0
    for i in range(4):
        l1 = _manual_one_way(f[i].tolist(), gp[i].tolist(), gn[i].tolist(), m)  # image -> label sets
        l2 = _manual_one_way(gp[i].tolist(), f[i].tolist(), fn[i].tolist(), m)  # label set -> images
        want += (l1 + lam * l2) / 4
    assert two_way_metric_loss(f, gp, gn, fn, lam, m).item() == pytest.approx(want, rel=1e-5)


def test_lambda_zero_is_the_one_way_ablation():
    g = torch.Generator().manual_seed(2)
    f, gp = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    gn, fn = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    one_way = two_way_metric_loss(f, gp, gn, fn, lam=0.0)
    assert one_way.item() == pytest.approx(one_way_loss(f, gp, gn, 0.0).mean().item())
    # way 2's images play no part at all
    assert two_way_metric_loss(f, gp, gn, fn * 100, lam=0.0).item() == pytest.approx(one_way.item())


def test_metric_loss_gradient_is_finite_when_points_coincide():
    f = torch.zeros(1, 3, requires_grad=True)
    loss = two_way_metric_loss(f, torch.zeros(1, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 3))
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_reconstruction_and_classification_losses():
    rec = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert reconstruction_loss(rec, y).item() == pytest.approx((0.25 + 0 + 0 + 4) / 4)
    logits = torch.tensor([[0.0, 2.0]])
    y1 = torch.tensor([[1.0, 0.0]])
    sig = 1 / (1 + math.exp(-2))
    want = (-math.log(0.5) - math.log(1 - sig)) / 2
    assert classification_loss(logits, y1).item() == pytest.approx(want, rel=1e-6)


def test_total_loss_weights():
    parts = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, beta=2.0)
    assert parts.total.item() == pytest.approx(1 + 0.5 * 2 + 2 * 3)
    assert parts.items() == {"total": 8.0, "cls": 1.0, "metric": 2.0, "rec": 3.0}
