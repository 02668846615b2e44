"""Out-of-fold decisions (decision.folds, retdmctl.training.folds, stages/folds.py): the
folds are seeded and recorded, no fold model trains on an image it scores or on the test
split, the thresholds and the vote are chosen on the pooled held-out scores, and the
fold copies are reused, not retrained, while nothing they read has changed."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from retdmctl import fusion, thresholds
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.knn import read_graph
from retdmctl.runtime import load_checkpoint
from retdmctl.training import folds
from tests.conftest import run_stages, tiny_config, trained_workspace

# --- the folds -----------------------------------------------------------------------------


def test_folds_are_seeded_balanced_and_depend_on_nothing_else():
    rows = np.arange(3, 103)
    a = folds.assign(rows, 5, seed=0)
    assert sorted(np.bincount(a).tolist()) == [20] * 5
    assert np.array_equal(a, folds.assign(rows, 5, seed=0))
    assert not np.array_equal(a, folds.assign(rows, 5, seed=1))
    b = folds.assign(np.arange(7), 3, seed=4)
    assert sorted(np.bincount(b).tolist()) == [2, 2, 3]


def test_a_fold_moves_its_images_from_train_to_test():
    d = DatasetInfo(ids=[str(i) for i in range(10)], labels=np.zeros((10, 2), np.uint8), class_names=["a", "b"],
                    splits={"train": np.array([0, 1, 2, 3, 4, 5]), "val": np.array([6, 7]), "test": np.array([8, 9])})
    f = folds.fold_info(d, np.array([1, 4]))
    assert f.split("train").tolist() == [0, 2, 3, 5]
    assert f.split("val").tolist() == [6, 7]
    assert f.split("test").tolist() == [1, 4, 8, 9]


# --- cross-fitted C-F1 and the pooled thresholds, by hand -----------------------------------


def test_cross_fitted_cf1_matches_a_hand_computation():
    # one class, two groups of four images
    y = np.array([[1], [1], [0], [0], [1], [0], [1], [0]])
    s = np.array([[0.9], [0.35], [0.3], [0.1], [0.8], [0.6], [0.7], [0.2]])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # group 1 alone: F1 1.0 for any t in (0.6, 0.7]: grid 0.61 .. 0.70, the one closest to 0.5
    # is 0.61; on group 0 that finds 0.9 (tp 1), misses 0.35 (fn 1), no fp
    # group 0 alone: F1 1.0 for t in (0.3, 0.35]: 0.31 .. 0.35 -> 0.35; on group 1 it
    # takes 0.8 and 0.7 (tp 2) and 0.6 (fp 1)
    # summed: tp 3, fp 1, fn 1 -> precision 0.75, recall 0.75, C-F1 0.75
    assert thresholds.cross_fitted_cf1(y, s, g) == pytest.approx(0.75)
    assert thresholds.best_class_thresholds(y[g == 1], s[g == 1])[0] == 0.61
    assert thresholds.best_class_thresholds(y[g == 0], s[g == 0])[0] == 0.35


def scored_part(p, y, bank_labels, cos=None, idx=None):
    n = len(p)
    cos = torch.zeros(n, 1) if cos is None else cos
    idx = torch.zeros(n, 1, dtype=torch.int64) if idx is None else idx
    return fusion.Scored(np.asarray(p, np.float32), np.asarray(y, np.uint8), None, cos, idx,
                         torch.as_tensor(bank_labels, dtype=torch.uint8))


def test_thresholds_are_chosen_on_the_pooled_out_of_fold_scores():
    """Validation alone puts class 0's threshold at 0.3; with the held-out training images
    pooled in, at 0.22 (by hand below)."""
    val_p = np.array([[0.9, 0.9], [0.3, 0.1], [0.2, 0.8], [0.1, 0.2]], np.float32)
    val_y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], np.uint8)  # class 0: t in (0.2, 0.3] -> 0.3
    oof_p = np.array([[0.25, 0.7], [0.225, 0.3], [0.05, 0.6], [0.205, 0.1]], np.float32)
    oof_y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], np.uint8)
    rng = np.random.default_rng(0)
    train_f = rng.normal(size=(6, 4)).astype(np.float32)
    train_y = np.zeros((6, 2), np.uint8)  # a bank with no positive: the vote cannot help
    val_f = rng.normal(size=(4, 4)).astype(np.float32)
    alone = fusion.choose(train_f, train_y, np.arange(6), val_f, val_p, val_y)
    pooled = fusion.choose(train_f, train_y, np.arange(6), val_f, val_p, val_y,
                           out_of_fold=[scored_part(oof_p, oof_y, np.zeros((3, 2)))])
    assert alone["w"] == pooled["w"] == 0.0
    assert alone["threshold_choice"]["per_class"][0] == 0.3
    # pooled class 0: positives 0.9, 0.3, 0.25, 0.225; negatives 0.2, 0.1, 0.05, 0.205:
    # F1 1.0 for t in (0.205, 0.225]: grid 0.21, 0.22 -> the one closest to 0.5, 0.22
    assert pooled["threshold_choice"]["per_class"][0] == 0.22
    # class 1: positives 0.9, 0.8, 0.7, 0.6; negatives 0.1, 0.2, 0.3, 0.1: (0.3, 0.6] -> 0.5
    assert pooled["threshold_choice"]["per_class"][1] == 0.5
    assert pooled["considered"]["images"] == 8
    assert pooled["threshold_choice"] == thresholds.choose(np.concatenate([val_y, oof_y]), np.concatenate([val_p, oof_p]))


def test_a_vote_that_raises_map_but_lowers_transferred_cf1_is_not_kept(monkeypatch):
    rng = np.random.default_rng(5)
    n, parts = 60, []
    for _ in range(3):
        y = (rng.uniform(size=(n, 3)) < 0.4).astype(np.uint8)
        p = np.clip(0.3 * y + rng.uniform(size=y.shape) * 0.7, 0, 1)
        parts.append(scored_part(p, y, y, torch.ones(n, 40), torch.arange(n).repeat(40, 1).T.contiguous()))
    # every vote a perfect ranking (each image its own label): mAP rises to 1.0 ...
    val = parts[0]
    seen = {}

    def fake_cf1(y, s, groups, known=None):  # ... but say it transfers worse
        seen.setdefault("calls", 0)
        seen["calls"] += 1
        return 0.8 if seen["calls"] == 1 else 0.7

    monkeypatch.setattr(thresholds, "cross_fitted_cf1", fake_cf1)
    got = fusion.choose(rng.normal(size=(n, 4)).astype(np.float32), val.y, np.arange(n),
                        rng.normal(size=(n, 4)).astype(np.float32), val.p, val.y, out_of_fold=parts[1:])
    assert got["considered"]["w"] > 0 and got["considered"]["mAP"] > got["plain_val_mAP"]
    assert got["considered"]["plain_C-F1"] == 0.8 and got["considered"]["C-F1"] == 0.7
    assert got["w"] == 0.0 and got["val_mAP"] == got["plain_val_mAP"]
    assert fusion.from_checkpoint({"fusion": got}, "x", embed_dim=4, num_classes=3) is None


# --- the fold copies, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A tiny pipeline (80 demo images) with 3 folds, up to the joint stage; every call
    to the training loop recorded (stage folder, training rows)."""
    from retdmctl.training import loop

    cfg = tiny_config(frozen=True)
    cfg.decision.folds = 3
    calls = []
    real = loop.fit

    def spy(**kw):
        calls.append((kw["stage_dir"], np.asarray(kw["train_rows"]).copy()))
        return real(**kw)

    mp = pytest.MonkeyPatch()
    for module in ("stages.classifier", "stages.metric", "stages.joint"):
        mp.setattr(f"{module}.fit", spy)
    ws = trained_workspace(tmp_path_factory.mktemp("folded"), cfg, "ingest", "knn", "classifier", "metric", "joint")
    mp.undo()
    return ws, cfg, calls


def test_no_fold_model_trains_on_an_image_it_scores_or_on_test(folded):
    ws, cfg, calls = folded
    info = read_dataset(ws.dataset)
    train, test = info.split("train"), info.split("test")
    fold_of = folds.assign(train, 3, cfg.decision.seed)
    trained_folds = [c for c in calls if "folds" in c[0].parts]
    # classifier x 3 (in the classifier stage), metric and joint x 3 (in the joint stage)
    assert sorted(c[0].name for c in trained_folds) == ["classifier"] * 3 + ["joint"] * 3 + ["metric"] * 3
    for stage_dir, rows in trained_folds:
        k = int(stage_dir.parent.name.split("-")[1])
        held = train[fold_of == k]
        assert len(rows) == len(train) - len(held)
        assert not np.intersect1d(rows, held).size and not np.intersect1d(rows, test).size
        fws = folds.fold_workspace(ws, k)
        # the fold's label graph and vote bank know its own training rows only
        graph = read_graph(fws.knn, ids=info.ids_digest, source="knn")
        assert np.array_equal(np.flatnonzero(graph.image_set >= 0), np.setdiff1d(train, held))
        for stage in ("classifier", "joint"):
            bank_rows = load_checkpoint(fws.stage_dir(stage) / "checkpoint.pt")["fusion"]["rows"].numpy()
            assert np.array_equal(bank_rows, np.setdiff1d(train, held))
    # the full models train on the whole training split
    full = [rows for d, rows in calls if "folds" not in d.parts]
    assert len(full) == 3 and all(np.array_equal(r, train) for r in full)


def test_the_decision_records_its_folds_and_pools_every_training_and_validation_image(folded):
    ws, cfg, _ = folded
    info = read_dataset(ws.dataset)
    n_train, n_val = len(info.split("train")), len(info.split("val"))
    for stage in ("classifier", "joint"):
        ckpt = load_checkpoint(ws.stage_dir(stage) / "checkpoint.pt")
        d = ckpt["decision"]
        assert d["folds"] == 3 and d["seed"] == 0 and sum(d["fold_sizes"]) == n_train
        assert d["images"] == n_train + n_val and d["validation_images"] == n_val
        assert d["assignment"] == folds.rows_digest(folds.assign(info.split("train"), 3, 0))
        assert ckpt["fusion"]["considered"]["images"] == n_train + n_val
        kept = next(h["epoch"] for h in ckpt["history"] if h.get("kept"))
        assert d["epochs"][stage] == kept
        fold_ckpt = load_checkpoint(folds.fold_workspace(ws, 0).stage_dir(stage) / "checkpoint.pt")
        assert len(fold_ckpt["history"]) == kept and fold_ckpt["config"][stage]["select"] == "last"


def test_fold_copies_are_reused_until_what_they_read_changes(folded):
    ws, cfg, _ = folded
    clf = folds.fold_workspace(ws, 1).stage_dir("classifier") / "checkpoint.pt"
    joint = folds.fold_workspace(ws, 1).stage_dir("joint") / "checkpoint.pt"
    before = clf.stat().st_mtime_ns, joint.stat().st_mtime_ns
    run_stages(ws, cfg, "joint", force=True)  # the same joint stage again: every fold copy reused
    assert (clf.stat().st_mtime_ns, joint.stat().st_mtime_ns) == before
    cfg.joint.lr = 0.002  # another joint stage: its fold copies train again, on the same classifier folds
    run_stages(ws, cfg, "joint")
    assert clf.stat().st_mtime_ns == before[0] and joint.stat().st_mtime_ns != before[1]
    assert load_checkpoint(joint)["config"]["joint"]["lr"] == 0.002
    # a changed input of the copies (the classifier copy's dataset file, as a stand-in for
    # the image store or a weights file) retrains them, though the config did not change
    fold_ds = folds.fold_workspace(ws, 1).dataset
    with h5py.File(fold_ds, "a") as h5:
        h5.attrs["touched"] = "yes"
    run_stages(ws, cfg, "joint", force=True)
    assert clf.stat().st_mtime_ns != before[0]
    before = clf.stat().st_mtime_ns, joint.stat().st_mtime_ns
    # a copy's own file changed by hand is not read as it is: the copy trains again
    size = joint.stat().st_size
    joint.write_bytes(joint.read_bytes() + b"\0")
    run_stages(ws, cfg, "joint", force=True)
    assert joint.stat().st_size == size and load_checkpoint(joint)["config"]["joint"]["lr"] == 0.002
    before = clf.stat().st_mtime_ns, joint.stat().st_mtime_ns
    cfg.decision.seed = 7  # other folds: every copy trains again
    run_stages(ws, cfg, "classifier", force=True)
    assert clf.stat().st_mtime_ns != before[0]
    assert load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["decision"]["seed"] == 7
    cfg.decision.seed, cfg.joint.lr = 0, 0.001


def test_validation_only_decisions_train_no_copies(tmp_path):
    cfg = tiny_config(frozen=True)
    cfg.decision.folds = 0
    ws = trained_workspace(tmp_path, cfg)
    assert not (ws.root / "folds").exists()
    d = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["decision"]
    assert d == {"folds": 0, "images": len(read_dataset(ws.dataset).split("val")),
                 "validation_images": len(read_dataset(ws.dataset).split("val"))}
