"""Many processes: the sharded sampler, the single-process identities, the write guard,
and a real 2-process gloo run through torchrun compared with one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from retdmctl import atomic, distributed, tracking
from retdmctl.cli import app
from retdmctl.training.parallel import epoch_batches
from retdmctl.runtime import load_checkpoint
from retdmctl.sources import CachedSource
from tests.conftest import TINY_TOML, runner

TINY = TINY_TOML.replace("batch_size = 16\n", "batch_size = 16\ndropout = 0.0\n")  # ranks draw their own dropout


# --- the sharded sampler ---------------------------------------------------------
@pytest.mark.parametrize("n, batch, world", [(43, 16, 2), (43, 16, 3), (64, 16, 4), (17, 16, 4), (5, 4, 3), (2, 8, 4)])
def test_sharded_batches_cut_one_permutation_into_equal_step_counts(n, batch, world):
    rows = np.arange(100, 100 + n)
    shards = [epoch_batches(rows, 7, batch, world, r) for r in range(world)]
    single = epoch_batches(rows, 7, batch, 1, 0)
    steps = len(single)
    assert steps == -(-n // batch)
    assert [len(s) for s in shards] == [steps] * world  # every rank: the same number of steps
    for step in range(steps):
        parts = [shards[r][step][0] for r in range(world)]
        assert all(len(p) >= 1 for p in parts)  # no rank ever gets an empty batch
        global_batch = np.concatenate(parts)
        one = single[step][0]
        # the ranks' parts, in rank order, are the one-process batch (plus padding)
        assert np.array_equal(global_batch[: len(one)], one)
        pad = global_batch[len(one):]
        assert len(pad) == max(0, world - len(one)) and set(pad) <= set(rows)
        # loss weights: each part's share of the global batch, times the world size
        weights = [shards[r][step][1] for r in range(world)]
        assert weights == pytest.approx([len(p) * world / len(global_batch) for p in parts])
        assert sum(weights) == pytest.approx(world)
    # disjoint shards covering the epoch (padding apart)
    seen = np.concatenate([p for s in shards for p, _ in s])
    assert set(seen) == set(rows)
    if n % batch == 0 or n % batch >= world:
        assert len(seen) == n and len(np.unique(seen)) == n


def test_sharded_batches_follow_the_epoch_seed_and_match_one_process():
    rows = np.arange(50)
    a = [p for p, _ in epoch_batches(rows, 1, 16, 2, 0)]
    b = [p for p, _ in epoch_batches(rows, 2, 16, 2, 0)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    # one process: the batches and order CachedSource draws from the same seed
    info = type("Info", (), {"labels": np.zeros((50, 3), np.uint8)})()
    source = CachedSource(np.zeros((50, 4), np.float32), info, 16)
    cached = [r for _, _, r in source.train_batches(rows, 5)]
    mine = epoch_batches(rows, 5, 16, 1, 0)
    assert all(np.array_equal(x, y) and w == 1.0 for x, (y, w) in zip(cached, mine))


# --- one process: nothing changes -----------------------------------------------
def test_without_torchrun_the_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.setup()
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.active()) == (0, 1, True, False)
    rows = np.arange(7)
    assert distributed.shard(rows) is rows and distributed.gather_rows(rows) is rows
    assert distributed.on_main(lambda: 41 + 1) == 42
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    distributed.single_process("predict")  # no error in one process


def test_a_rank_that_may_not_write_fails_loudly(tmp_path):
    atomic.set_writer(False)
    try:
        with pytest.raises(RuntimeError, match="only rank 0 writes"):
            atomic.write_text_atomic(tmp_path / "x.txt", "no")
    finally:
        atomic.set_writer(True)
    assert not list(tmp_path.iterdir())


def test_sources_serve_exactly_the_given_batches(tmp_path):
    from retdmctl.data.dataset import read_dataset
    from retdmctl.models.backbones import get_backbone_spec
    from retdmctl.sources import PixelSource

    (tmp_path / "retdm.toml").write_text(TINY)
    assert runner.invoke(app, ["-w", str(tmp_path), "ingest", "demo"]).exit_code == 0
    info = read_dataset(tmp_path / "data" / "dataset.h5")
    batches = [np.array([5, 2, 9]), np.array([0]), np.array([33, 7])]
    pixels = PixelSource(tmp_path / "data" / "images.lmdb", info, get_backbone_spec("tiny_cnn"), 32, 16, 0)
    cached = CachedSource(np.random.default_rng(0).random((len(info.ids), 4), dtype=np.float32), info, 16)
    for source in (pixels, cached):
        got = list(source.batches_of(batches, 3))
        assert [r.tolist() for _, _, r in got] == [b.tolist() for b in batches]
        for (x, y, r) in got:
            assert x.shape[0] == len(r) and torch.equal(y, torch.from_numpy(info.labels[r].astype(np.float32)))


# --- two real processes -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights_diff(a: Path, b: Path) -> float:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert x.keys() == y.keys()
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    base, one, two = tmp_path / "base", tmp_path / "one", tmp_path / "two"
    base.mkdir()
    (base / "retdm.toml").write_text(TINY)
    assert runner.invoke(app, ["-w", str(base), "ingest", "demo"]).exit_code == 0
    shutil.copytree(base, one)
    shutil.copytree(base, two)

    # one process (in this process: the CLI is the same code)
    result = runner.invoke(app, ["-w", str(one), "run"])
    assert result.exit_code == 0, result.output

    # two processes, gloo, through torchrun; every committed file is logged with its rank
    log = tmp_path / "writes.log"
    cache = tmp_path / "cache"  # a cache of its own: the two processes extract it, not reuse one's
    env = {**os.environ, "RETDM_CACHE_DIR": str(cache), "RETDM_NO_PROGRESS": "1", "RETDM_WRITE_LOG": str(log), "RETDM_DIST_TIMEOUT": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "retdmctl", "-w", str(two), "run"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("classifier epoch 2/2") == 1  # rank 0 speaks for both
    assert "error" not in done.stderr.lower()

    # the same artifacts as one process, and no resume point left
    outputs = ["knn.h5", "classifier/checkpoint.pt", "classifier/features.h5", "metric/checkpoint.pt",
               "joint/checkpoint.pt", "eval/scores.h5", "eval/metrics.json", "eval/report.html"]
    for rel in outputs:
        assert (two / rel).is_file(), rel
    assert not list(two.glob("*/resume.pt"))
    # the experiment log: rank 0's CSV (logged above with the other writes) and event files
    for stage in ("classifier", "metric", "joint"):
        assert (two / stage / "history.csv").is_file() and not (two / stage / "history.partial.csv").exists()
        if tracking.tensorboard_available():
            assert len(list((two / "runs" / stage).iterdir())) == 1, stage
    assert len(list((cache / "backbone").glob("*.h5"))) == 1

    # only rank 0 wrote, one process, and each stage's manifest exactly once
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert lines and {rank for rank, _, _ in lines} == {"0"} and len({pid for _, pid, _ in lines}) == 1
    manifests = [Path(path).name for _, _, path in lines if "/.retdm/manifests/" in path]
    assert sorted(manifests) == sorted(f"{s}.json" for s in ("knn", "classifier", "metric", "joint", "eval"))
    for stage in ("classifier", "metric", "joint"):
        manifest = json.loads((two / ".retdm" / "manifests" / f"{stage}.json").read_text())
        assert manifest["world_size"] == 2
        assert load_checkpoint(two / stage / "checkpoint.pt")["world_size"] == 2
        assert load_checkpoint(one / stage / "checkpoint.pt")["world_size"] == 1

    # same global batch => the same training, up to float rounding. The classifier (no
    # dropout here) is exact; the metric and joint stages draw way-2 images per rank
    # from the epoch's stream (rank 1 draws other ones), hence a looser bound.
    assert _weights_diff(one / "classifier" / "checkpoint.pt", two / "classifier" / "checkpoint.pt") < 1e-6
    assert _weights_diff(one / "metric" / "checkpoint.pt", two / "metric" / "checkpoint.pt") < 1e-4
    assert _weights_diff(one / "joint" / "checkpoint.pt", two / "joint" / "checkpoint.pt") < 1e-4
    for stage in ("classifier", "joint"):
        h1 = load_checkpoint(one / stage / "checkpoint.pt")["history"]
        h2 = load_checkpoint(two / stage / "checkpoint.pt")["history"]
        assert [h["val_loss"] for h in h2] == pytest.approx([h["val_loss"] for h in h1], abs=1e-5)
        assert [h["val_mAP"] for h in h2] == pytest.approx([h["val_mAP"] for h in h1], abs=1e-6)
    with h5py.File(one / "classifier" / "features.h5") as a, h5py.File(two / "classifier" / "features.h5") as b:
        assert np.abs(a["features"][()].astype(np.float32) - b["features"][()].astype(np.float32)).max() < 1e-2
    # the neighbour vote is chosen alike (on gathered embeddings, the same on every rank)
    for stage in ("classifier", "joint"):
        v1, v2 = (load_checkpoint(d / stage / "checkpoint.pt")["fusion"] for d in (one, two))
        assert (v1["k"], v1["temp"], v1["w"]) == (v2["k"], v2["temp"], v2["w"])
        assert v2["rows"].tolist() == v1["rows"].tolist()
    # eval's scores are fused with it: at temperature 0.05 a 1e-7 change in a near-tied
    # similarity of this barely trained model moves a vote weight by 1e-3 or swaps the
    # k-th neighbour, hence the looser bound than the weights'
    with h5py.File(one / "eval" / "scores.h5") as a, h5py.File(two / "eval" / "scores.h5") as b:
        assert np.array_equal(a["rows"][()], b["rows"][()])  # gathered back in order
        assert np.abs(a["scores"][()] - b["scores"][()]).max() < 1e-2
    # the test mAP of this barely trained model ranks near-tied scores: a 1e-6 change
    # may swap two images, hence the looser bound on it
    m1 = json.loads((one / "eval" / "metrics.json").read_text())["metrics"]
    m2 = json.loads((two / "eval" / "metrics.json").read_text())["metrics"]
    assert m2["mAP"] == pytest.approx(m1["mAP"], abs=0.02)

    # the number of processes never makes a stage stale: one process skips them all
    again = runner.invoke(app, ["-w", str(two), "run"])
    assert again.exit_code == 0 and again.output.count("up to date, skipped") == 6, again.output


# --- LL-R and CLML read the whole batch: one process only --------------------------------
def test_batch_terms_problem_names_what_is_refused():
    from retdmctl.config import Config
    from retdmctl.training.labels import batch_terms_problem

    cfg = Config()
    assert batch_terms_problem(cfg, 2) is None  # bce: the per-row mean is weighted exactly
    cfg.loss.clml = 0.5
    assert batch_terms_problem(cfg, 1) is None
    assert batch_terms_problem(cfg, 2) == ("loss.clml > 0 read the whole batch, but each of the 2 processes sees only "
                                           "its share: train without torchrun (one process)")
    cfg.loss.base = "llr"
    assert batch_terms_problem(cfg, 3) == ("loss.base = llr and loss.clml > 0 read the whole batch, but each of the 3 "
                                           "processes sees only its share: train without torchrun (one process)")


@pytest.mark.slow
def test_two_processes_refuse_llr_and_clml_with_one_line(tmp_path):
    (tmp_path / "retdm.toml").write_text(TINY)
    assert runner.invoke(app, ["-w", str(tmp_path), "ingest", "demo"]).exit_code == 0
    cache = tmp_path / "cache"  # a cache of its own: the two processes extract it, not reuse one's
    env = {**os.environ, "RETDM_CACHE_DIR": str(cache), "RETDM_NO_PROGRESS": "1", "RETDM_DIST_TIMEOUT": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "retdmctl", "-w", str(tmp_path), "train", "--stage", "classifier", "--set", "loss.base=llr"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: loss.base = llr read the whole batch, but each of the 2 processes sees only its share: "
                      "train without torchrun (one process)"]
    # each process exits 1 (torchrun then prints its own ChildFailedError), none aborts
    assert "(exitcode: 1)" in done.stderr and "terminate called" not in done.stderr and "SIGABRT" not in done.stderr
    assert "retdmctl/" not in done.stderr  # no traceback from the product's code
    assert not (tmp_path / "classifier" / "checkpoint.pt").exists()
