"""LL-R rejection on a hand example."""

from __future__ import annotations

import math

import pytest
import torch

from retdmctl.losses.llr import DEFAULT_DELTA_REL, llr_loss, llr_rejection_mask, rejection_rate

# 2 images x 4 labels = 8 entries. Observed positives: (0, 0) and (1, 2); (1, 2) has a
# large loss as a positive but is observed, so it is never a rejection candidate.
LOGITS = torch.tensor([[5.0, 2.0, -1.0, 0.5],
                       [1.0, -2.0, -4.0, 0.0]], dtype=torch.float64)
Y_OBS = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
# unobserved entries by loss softplus(z), largest first: (0,1) z=2, (1,0) z=1,
# (0,3) z=0.5, (1,3) z=0, (0,2) z=-1, (1,1) z=-2
DELTA = 0.125  # rate per epoch: k = ceil(8 * (epoch - 1) * 0.125) = epoch - 1


def _rejected(epoch, **kw):
    mask = llr_rejection_mask(LOGITS, Y_OBS, epoch, DELTA, **kw)
    return sorted(map(tuple, torch.nonzero(mask).tolist()))


def test_schedule():
    assert rejection_rate(1) == 0.0
    assert rejection_rate(6) == pytest.approx(5 * DEFAULT_DELTA_REL)
    assert DEFAULT_DELTA_REL == 0.002  # official --delta_rel 0.2 (percent)
    assert rejection_rate(100, 0.5) == 1.0


def test_rejected_entries_epoch_1_2_3():
    assert _rejected(1) == []
    assert _rejected(2) == [(0, 1)]
    assert _rejected(3) == [(0, 1), (1, 0)]
    assert _rejected(4) == [(0, 1), (0, 3), (1, 0)]


def test_observed_positives_never_rejected():
    mask = llr_rejection_mask(LOGITS, Y_OBS, 2, 1.0)  # rate 1: k capped at the 6 unobserved
    assert mask.sum() == 6
    assert not mask[0, 0] and not mask[1, 2]


def test_mask_unobserved_restricts_candidates():
    # (0, 1) is an observed negative: not a candidate, so (1, 0) goes first
    unobserved = Y_OBS == 0
    unobserved[0, 1] = False
    assert _rejected(2, mask_unobserved=unobserved) == [(1, 0)]


def _bce(z, y):
    return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))


def test_loss_mean_over_kept_entries():
    z = LOGITS.clone().requires_grad_(True)
    loss = llr_loss(z, Y_OBS, 3, DELTA)
    kept = [(i, j) for i in range(2) for j in range(4) if (i, j) not in {(0, 1), (1, 0)}]
    want = sum(_bce(LOGITS[i, j].item(), Y_OBS[i, j].item()) for i, j in kept) / len(kept)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert z.grad[0, 1] == 0 and z.grad[1, 0] == 0 and z.grad[0, 2] != 0
    official = llr_loss(LOGITS, Y_OBS, 3, DELTA, reduction="all")
    assert official.item() == pytest.approx(want * len(kept) / 8, rel=1e-12)
    # epoch 1 is plain BCE with unobserved entries as negatives
    torch.testing.assert_close(llr_loss(LOGITS, Y_OBS, 1, DELTA),
                               torch.nn.functional.binary_cross_entropy_with_logits(LOGITS, Y_OBS))
