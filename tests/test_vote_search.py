"""The neighbour vote's search at scale (retdmctl.fusion.search): the blocked exact search
against the dense one, the IVF index with the switch forced low, what the checkpoint
saves of it and how strictly it is read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retdmctl import fusion
from retdmctl.errors import CheckpointError
from retdmctl.fusion import search
from tests.test_fusion import clustered, hand_vote, mean_ap


def dense_top(q, bank, k, exclude=None, unit=False):
    """The search as it was: one (B, N) similarity block, the excluded position masked."""
    sim = fusion.normalize(q) @ bank.T if unit else fusion.normalize(q) @ fusion.normalize(bank).T
    if exclude is not None:
        hit = exclude >= 0
        sim[hit, exclude[hit]] = float("-inf")
    return sim.topk(k, dim=1)


def test_the_blocked_exact_search_equals_the_dense_one(monkeypatch):
    # 3 query rows x 7 bank rows per block: 50 bank rows make 8 blocks, the last of 1 row
    monkeypatch.setattr(search, "BANK_BLOCK", 7)
    monkeypatch.setattr(search, "BLOCK_BYTES", 4 * 7 * 3)
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.normal(size=(50, 8))).float()
    q = torch.from_numpy(rng.normal(size=(11, 8))).float()
    exclude = torch.tensor([-1, 3, 49, -1, 7, 0, 13, -1, 6, 21, 42])
    for k, ex in ((1, None), (10, None), (10, exclude), (49, exclude)):
        want_s, want_i = dense_top(q, bank, k, ex)
        got_s, got_i = search.exact_top(fusion.normalize(q), fusion.normalize(bank), k, ex)
        assert torch.equal(got_i, want_i)
        assert torch.allclose(got_s, want_s, atol=1e-6)
    # and the vote built on it is the hand computation's, own rows left out
    labels = rng.integers(0, 2, size=(50, 3)).astype(np.float32)
    vote = fusion.NeighbourVote(bank, torch.from_numpy(labels), torch.arange(50), 4, 0.2, 1.0)
    got = vote.vote(q, exclude).numpy()
    for i in range(len(q)):
        skip = int(exclude[i]) if exclude[i] >= 0 else None
        assert np.allclose(got[i], hand_vote(bank.numpy(), labels, q[i].numpy(), 4, 0.2, skip=skip), atol=1e-6)


def ivf_choice(monkeypatch, n=400, nval=120, seed=5):
    """fusion.choose on a bank of ``n`` with the IVF switched on from 100 bank images."""
    monkeypatch.setattr(search, "EXACT_MAX", 100)
    rng = np.random.default_rng(seed)
    train_f, train_y = clustered(rng, n, dim=16)
    val_f, val_y = clustered(rng, nval, dim=16)
    val_p = np.clip(0.4 * val_y + rng.uniform(size=val_y.shape), 0, 1).astype(np.float32)
    got = fusion.choose(train_f, train_y, np.arange(n), val_f, val_p, val_y)
    return got, train_f, val_f, val_p, val_y


def test_the_ivf_is_chosen_from_the_switch_and_scans_every_list_on_a_small_bank(monkeypatch):
    got, train_f, val_f, val_p, val_y = ivf_choice(monkeypatch)
    s = got["search"]
    assert s["kind"] == "ivf" and s["nlist"] == 20 and s["nprobe"] == 20  # round(sqrt(400)); min(nlist, 32)
    assert s["centroids"].shape == (20, 16) and s["centroids"].dtype == torch.float32
    assert s["assign"].shape == (400,) and s["assign"].dtype == torch.int32
    vote = fusion.from_checkpoint({"fusion": got}, "x", embed_dim=16, num_classes=4)
    assert vote.kind == "ivf" and vote.describe()["search"] == "ivf"
    # every list scanned: the IVF finds what the exact search finds over its float16
    # unit rows, own row left out alike
    bank16 = fusion.normalize(got["bank"].float()).half().float()
    q = torch.from_numpy(np.concatenate([val_f, train_f[:50]])).float()
    exclude = torch.cat([torch.full((len(val_f),), -1), torch.arange(50)])
    ivf_s, ivf_i = vote.top(q, 40, exclude)
    exact_s, exact_i = dense_top(q, bank16, 40, exclude, unit=True)
    assert torch.equal(ivf_i, exact_i) and torch.allclose(ivf_s, exact_s, atol=1e-6)
    assert torch.allclose(ivf_s, dense_top(q, got["bank"].float(), 40, exclude)[0], atol=2e-3)
    assert not (ivf_i[len(val_f):] == exclude[len(val_f):, None]).any()  # a training image never votes for itself
    # the choice was made with this very search: its saved figures are those of the vote
    fused = vote(torch.from_numpy(val_f).float(), torch.from_numpy(val_p)).numpy()
    assert got["w"] > 0 and got["val_mAP"] == mean_ap(val_y, fused)


def test_the_ivf_scanning_a_few_lists_keeps_most_neighbours_and_never_votes_for_itself(monkeypatch):
    got, train_f, _, _, _ = ivf_choice(monkeypatch, n=2500, nval=40)
    assert got["search"]["nlist"] == 50 and got["search"]["nprobe"] == 32
    got["search"]["nprobe"] = 3  # of 50 lists
    vote = fusion.from_checkpoint({"fusion": got}, "x", embed_dim=16, num_classes=4)
    q = torch.from_numpy(train_f[:200]).float()
    own = torch.arange(200)
    _, ivf_i = vote.top(q, 40, own)
    _, exact_i = dense_top(q, got["bank"].float(), 40, own)
    recall = np.mean([len(set(a) & set(b)) / 40 for a, b in zip(ivf_i.tolist(), exact_i.tolist())])
    assert 0.75 < recall < 1.0  # approximate (0.91 here), and still most of the 40 nearest
    assert not (ivf_i == own[:, None]).any()
    assert ivf_i.shape == (200, 40) and bool((ivf_i >= 0).all())


def test_the_search_round_trips_through_a_checkpoint(monkeypatch, tmp_path):
    got, _, val_f, _, _ = ivf_choice(monkeypatch)
    before = fusion.from_checkpoint({"fusion": got}, "x", embed_dim=16, num_classes=4)
    torch.save({"fusion": got}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {k: saved["fusion"]["search"][k] for k in ("kind", "nlist", "nprobe")} == {"kind": "ivf", "nlist": 20, "nprobe": 20}
    assert torch.equal(saved["fusion"]["search"]["assign"], got["search"]["assign"])
    after = fusion.from_checkpoint(saved, "x", embed_dim=16, num_classes=4)
    q = torch.from_numpy(val_f).float()
    assert [torch.equal(a, b) for a, b in zip(before.top(q, 10), after.top(q, 10))] == [True, True]
    # the lists are rebuilt as saved: each bank row in its list
    for row in (0, 17, 399):
        assert after.index.get_list_size(int(got["search"]["assign"][row])) > 0


def test_a_checkpoint_saved_before_the_search_field_reads_as_exact(monkeypatch):
    rng = np.random.default_rng(6)
    train_f, train_y = clustered(rng, 60)
    val_f, val_y = clustered(rng, 30)
    got = fusion.choose(train_f, train_y, np.arange(60), val_f, rng.uniform(size=val_y.shape).astype(np.float32), val_y)
    assert got["search"] == {"kind": "exact"}
    del got["search"]
    got["w"] = 0.3
    vote = fusion.from_checkpoint({"fusion": got}, "x", embed_dim=8, num_classes=4)
    assert vote.kind == "exact" and vote.index is None and vote.describe()["search"] == "exact"


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(kind="hnsw"), "x.pt: its neighbour vote's search kind 'hnsw' is not one of exact, ivf"),
    (lambda s: s.update(nprobe=21), "x.pt: its neighbour vote's IVF index is malformed (nlist 20, nprobe 21, 400 bank images)"),
    (lambda s: s.update(centroids=s["centroids"][:5]),
     "x.pt: its neighbour vote's IVF index is malformed (centroids (5, 16), want (20, 16) finite float32)"),
    (lambda s: s["assign"].__setitem__(3, 20),
     "x.pt: its neighbour vote's IVF index is malformed (list of each bank image (400,), want (400,) in 0..19)"),
    (lambda s: s.update(assign=s["assign"][:-1]),
     "x.pt: its neighbour vote's IVF index is malformed (list of each bank image (399,), want (400,) in 0..19)"),
])
def test_a_malformed_saved_index_is_a_checkpoint_error(monkeypatch, change, message):
    got, *_ = ivf_choice(monkeypatch)
    got["w"] = max(got["w"], 0.1)
    change(got["search"])
    with pytest.raises(CheckpointError) as err:
        fusion.from_checkpoint({"fusion": got}, "x.pt", embed_dim=16, num_classes=4)
    assert str(err.value) == message
