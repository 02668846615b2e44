"""clml_loss against a direct float64 per-class computation."""

from __future__ import annotations

import math

import pytest
import torch

from retdmctl.losses.clml import clml_loss, corrected_targets


def _reference(f, logits, y, *, epoch, lam, tau=0.75, delta=1.0, start_epoch=1, margin=1.0):
    """Loop over labels, the rows of each label taken explicitly, float64 autograd."""
    f = f.detach().double().requires_grad_(True)
    p = torch.sigmoid(logits.double() - margin * y.double())
    pos = y > 0.5
    if epoch >= start_epoch:
        pos = pos | (p > tau)
    total = torch.zeros((), dtype=torch.float64)
    for c in range(y.shape[1]):
        rows = torch.nonzero(pos[:, c]).flatten()
        if rows.numel() == 0:
            total = total + delta
            continue
        nuc = torch.linalg.matrix_norm(f[rows], ord="nuc")
        total = total + torch.clamp(nuc, min=delta)
    loss = lam / f.shape[0] * (total - torch.linalg.matrix_norm(f, ord="nuc"))
    loss.backward()
    return loss.detach(), f.grad


def _data(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    logits = torch.randn(n, c, generator=g) * 1.5
    y = (torch.rand(n, c, generator=g) < 0.3).float()
    # label 0: no sample even after correction; label 1: exactly one sample
    y[:, 0] = 0
    logits[:, 0] = -5
    y[:, 1] = 0
    y[3, 1] = 1
    logits[:, 1] = -5
    # label 2: two samples with a tiny norm (||F_c||_* < delta: clamped, no gradient)
    y[:, 2] = 0
    logits[:, 2] = -5
    y[[0, 1], 2] = 1
    f[[0, 1]] *= 0.01
    return f, logits, y


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("n,d", [(12, 20), (24, 6)])  # N < D and N > D
def test_value_and_gradient_match_per_class_reference(n, d, method):
    f, logits, y = _data(n, d, 7, seed=n + d)
    want, want_grad = _reference(f, logits, y, epoch=3, lam=0.7)
    ft = f.clone().requires_grad_(True)
    got = clml_loss(ft, logits, y, epoch=3, lam=0.7, method=method)
    got.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-4)
    torch.testing.assert_close(ft.grad.double(), want_grad, rtol=1e-3, atol=1e-4)
    assert torch.isfinite(ft.grad).all()


def test_float64_agrees_tightly():
    f, logits, y = _data(10, 16, 5, seed=1)
    want, want_grad = _reference(f, logits, y, epoch=1, lam=1.0)
    ft = f.double().requires_grad_(True)
    got = clml_loss(ft, logits, y, epoch=1, lam=1.0)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(ft.grad, want_grad, rtol=1e-6, atol=1e-9)


def test_empty_and_single_sample_labels():
    f = torch.randn(6, 8, requires_grad=True)
    y = torch.zeros(6, 3)
    y[2, 1] = 1  # label 1 has one sample; labels 0 and 2 none
    logits = torch.full((6, 3), -5.0)
    loss = clml_loss(f, logits, y, epoch=1, lam=1.0)
    loss.backward()
    fd = f.detach().double()
    want = (1.0 + max(1.0, fd[2].norm().item()) + 1.0 - torch.linalg.matrix_norm(fd, ord="nuc").item()) / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(f.grad).all()
    # no positive at all, and rank-deficient embeddings (duplicate and zero rows)
    g = torch.zeros(5, 4)
    g[1] = g[2] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    g.requires_grad_(True)
    y = torch.zeros(5, 3)
    y[[1, 2, 4], 0] = 1
    loss = clml_loss(g, torch.full((5, 3), -5.0), y, epoch=1, lam=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(g.grad).all()


def test_correction_threshold_and_start_epoch():
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # probabilities: 0.8 > tau (corrected), 0.7 < tau (not), logit of a positive irrelevant
    logits = torch.tensor([[-3.0, math.log(0.8 / 0.2), math.log(0.7 / 0.3)],
                           [math.log(0.76 / 0.24), -3.0, 5.0]])
    got = corrected_targets(logits, y, epoch=2, tau=0.75, start_epoch=2)
    assert got.tolist() == [[True, True, False], [True, False, True]]
    before = corrected_targets(logits, y, epoch=1, tau=0.75, start_epoch=2)
    assert before.tolist() == [[True, False, False], [False, False, True]]
    # margin only shifts entries that are already positive: no effect on y == 0 entries
    assert corrected_targets(logits, y, epoch=2, start_epoch=2, margin=0.0).equal(got)


def test_correction_changes_the_loss_from_start_epoch():
    f, logits, y = _data(12, 20, 7, seed=5)
    logits[:, 3] = 4.0  # every sample confidently predicted for label 3
    before = clml_loss(f, logits, y, epoch=1, lam=1.0, start_epoch=2)
    after = clml_loss(f, logits, y, epoch=2, lam=1.0, start_epoch=2)
    ref_before, _ = _reference(f, logits, y, epoch=1, lam=1.0, start_epoch=2)
    ref_after, _ = _reference(f, logits, y, epoch=2, lam=1.0, start_epoch=2)
    assert before.item() == pytest.approx(ref_before.item(), rel=1e-4)
    assert after.item() == pytest.approx(ref_after.item(), rel=1e-4)
    assert after.item() != pytest.approx(before.item(), rel=1e-3)


def test_logits_get_no_gradient_and_lam_zero():
    f, logits, y = _data(8, 10, 4, seed=2)
    f.requires_grad_(True)
    logits.requires_grad_(True)
    loss = clml_loss(f, logits, y, epoch=1, lam=1.0)
    loss.backward()
    assert logits.grad is None
    zero = clml_loss(f, logits, y, epoch=1, lam=0.0)
    assert zero.item() == 0.0 and zero.requires_grad


def test_batch_sized_like_the_bench_matches_the_reference_in_float64():
    """Batch 64, 80 labels: every block size the forward pass meets (1 closed form;
    2, 4, 8 padded; a 20-sample label decomposed at its own size; empty labels),
    value and the gradient assembled in the forward pass, float64."""
    g = torch.Generator().manual_seed(5)
    n, d, c = 64, 96, 80
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, c, generator=g) < 0.04).float()
    y[:, 0] = 0
    y[:20, 0] = 1  # exact-size bucket
    y[:, 1] = 0  # empty
    y[:, 2] = 0
    y[[5, 9, 11], 2] = 1  # 3 samples, padded to 4
    logits = torch.full((n, c), -5.0)
    counts = set(y.sum(0).int().tolist())
    assert {0, 1, 2, 3, 20} <= counts
    want, want_grad = _reference(f, logits, y, epoch=1, lam=0.5)
    ft = f.clone().requires_grad_(True)
    got = clml_loss(ft, logits, y, epoch=1, lam=0.5)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(ft.grad, want_grad, rtol=1e-6, atol=1e-9)
