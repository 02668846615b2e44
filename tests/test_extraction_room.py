"""Before a backbone cache is extracted: its size and the time left are said, and a disk
without the room refuses it with one line before anything is written. Under torchrun
every process extracts its shard of a views cache, merged into the file one process
writes, with no part file left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from retdmctl import disk, distributed
from retdmctl.cache import display
from retdmctl.data.dataset import read_dataset
from retdmctl.inputs import _check_room, _extract, _job, backbone_cache_key, backbone_cache_path
from retdmctl.pace import Pace, duration
from retdmctl.workspace import Workspace
from tests.conftest import TINY_TOML, invoke

CPU = torch.device("cpu")
# tiny_cnn at 32 px, its first three conv layers (stride 2 each) cached for 3 views:
# 3 x 64 x 4 x 4 float16 = 6,144 bytes an image, 368,640 for the 60 demo images
VIEWS_TOML = TINY_TOML.replace("tune_blocks = 0\nviews = 1\n", "tune_blocks = 1\nviews = 3\n")
VIEWS_FIX = ("free space, point RETDM_CACHE_DIR at a larger disk, or cache fewer views (--set model.views=N) "
             "or pooled features (--tune-blocks 0 --views 1)")


def _ingested(root: Path, toml: str) -> Workspace:
    root.mkdir(parents=True)
    (root / "retdm.toml").write_text(toml)
    assert invoke("-w", root, "ingest", "demo").exit_code == 0
    return Workspace(root)


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its mtime, but the fingerprint cache (no artifact)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != "state.json"}


def _little_room_in(directory: Path, free: int):
    """A stand-in for disk.free_bytes: ``free`` bytes under ``directory``, 1 TB elsewhere."""
    return lambda path: free if str(Path(path).absolute()).startswith(str(directory)) else 10**12


@pytest.mark.parametrize("toml, size, fix", [
    (VIEWS_TOML, "369 KB", VIEWS_FIX),
    # pooled: 64 features an image, 60 x 64 x 2 = 7,680 bytes
    (TINY_TOML, "7.68 KB", "free space or point RETDM_CACHE_DIR at a larger disk"),
])
def test_a_full_disk_refuses_the_extraction_before_anything_is_written(tmp_path, own_cache, monkeypatch, toml, size, fix):
    ws = _ingested(tmp_path / "w", toml)
    before = _files(ws.root)
    monkeypatch.setattr(disk, "free_bytes", _little_room_in(own_cache, 10**6))
    result = invoke("-w", ws.root, "train", "--stage", "classifier")
    assert result.exit_code == 1
    # spare: 5 % of it and 100 MB
    assert result.output.splitlines()[-1] == (f"error: the backbone cache needs {size} (and 100 MB to spare) but "
                                              f"{display(own_cache / 'backbone')} has 1 MB free: {fix}")
    assert "Traceback" not in result.output
    assert not own_cache.exists()  # no lock file, no temporary file, not even the folder
    assert _files(ws.root) == before  # no artifact, manifest or resume point written or touched


def test_a_full_workspace_disk_refuses_the_classifier_before_it_trains(tmp_path, own_cache, monkeypatch):
    ws = _ingested(tmp_path / "w", TINY_TOML)
    before = _files(ws.root)
    monkeypatch.setattr(disk, "free_bytes", _little_room_in(ws.root.resolve(), 5 * 10**7))
    result = invoke("-w", ws.root, "train", "--stage", "classifier")
    assert result.exit_code == 1
    # features.h5: 60 images x 512 (model.embed_dim) x 2 bytes = 61,440
    assert result.output.splitlines()[-1] == (
        f"error: classifier/features.h5 needs 61.4 KB (and 100 MB to spare) but {ws.root.resolve() / 'classifier'} "
        "has 50 MB free: free space on that disk, or use a workspace on a larger one (-w DIR)")
    assert not own_cache.exists() and _files(ws.root) == before


def test_the_extraction_says_its_size_and_the_time_left(tmp_path, own_cache):
    ws = _ingested(tmp_path / "w", VIEWS_TOML)
    path = backbone_cache_path(ws, ws.load_config())
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.part1").write_bytes(b"left by a killed torchrun process")
    result = invoke("-w", ws.root, "train", "--stage", "classifier")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"backbone inputs: 60 images x 3 views of 64x4x4, 369 KB, into {display(path)}" in lines
    # 5 images a batch (16 // 3 views); the rate is measured from the end of the first
    # batch over 32 images or more: at 40 images done, 20 are left
    estimates = [line for line in lines if line.startswith("about ")]
    assert len(estimates) == 1
    assert re.fullmatch(r"about \d+ s left \([\d.]+ images/s measured on 35 images\)", estimates[0]), estimates
    with h5py.File(path) as h5:
        assert h5["features"].shape == (60, 3, 64, 4, 4) and h5["features"].chunks == (1, 3, 64, 4, 4)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # the stale part too


def test_the_estimate_comes_after_the_warm_up_from_the_measured_rate():
    said, clock = [], iter([0.0] + [1.28 * i for i in range(1, 40)])
    with Pace("x", 1000, said.append, clock=lambda: next(clock)) as pace:
        for _ in range(10):
            pace.advance(32)
    # the first batch is not measured; warm-up: min(256, max(32, 1000 // 10)) = 100
    # images and 3 batches. After batch 5: 128 images in 4 x 1.28 s = 25 images/s, and
    # 1000 - 160 = 840 left: 33.6 s
    assert said == ["about 34 s left (25 images/s measured on 128 images)"]
    assert [duration(s) for s in (0.2, 59.4, 90, 3599, 3600 * 3.24)] == ["1 s", "59 s", "2 min", "60 min", "3.2 h"]


def test_under_torchrun_the_room_check_counts_the_part_files(tmp_path, own_cache, monkeypatch):
    ws = _ingested(tmp_path / "w", VIEWS_TOML)
    cfg, info = ws.load_config(), read_dataset(ws.dataset)
    from retdmctl.config import concrete

    concrete(cfg)
    path = backbone_cache_path(ws, cfg, info, CPU)
    job = _job(ws, cfg, info, CPU, path, backbone_cache_key(ws, cfg, info, CPU))
    assert job.nbytes == 60 * 3 * 64 * 4 * 4 * 2
    monkeypatch.setattr(disk, "free_bytes", lambda p: 10**6)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(disk.NoRoomError) as err:
        _check_room(job)
    # the merged file and the parts (737,280 bytes), and 5 % + 100 MB
    assert str(err.value) == (f"the backbone cache with its 2 shard files needs 737 KB (and 100 MB to spare) but "
                              f"{display(path.parent)} has 1 MB free: {VIEWS_FIX}; one process (without torchrun) "
                              "needs half")
    assert not own_cache.exists()


@pytest.mark.parametrize("nbytes, text", [(512, "512 B"), (61_440, "61.4 KB"), (1_234_000_000, "1.23 GB"),
                                          (23_100_000_000, "23.1 GB"), (368_640, "369 KB")])
def test_sizes_read_as_people_write_them(nbytes, text):
    assert disk.size(nbytes) == text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_extract_the_views_cache_in_shards_as_one_process_would(tmp_path):
    ws = _ingested(tmp_path / "w", VIEWS_TOML.replace("demo_images = 60", "demo_images = 61"))  # shards of 31 and 30
    cache = tmp_path / "cache"  # its own: the two processes extract it, not reuse one
    env = {**os.environ, "RETDM_CACHE_DIR": str(cache), "RETDM_NO_PROGRESS": "1", "RETDM_DIST_TIMEOUT": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "retdmctl", "-w", str(ws.root), "train", "--stage", "classifier", "--set", "classifier.epochs=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [sharded] = (cache / "backbone").glob("*.h5")
    assert f"backbone inputs: 61 images x 3 views of 64x4x4, 375 KB, into {sharded}, extracted by 2 processes" \
        in done.stdout.splitlines()
    # no part file (nor temporary file) left beside it
    assert sorted(p.name for p in sharded.parent.iterdir()) == [sharded.name, sharded.name + ".lock"]

    # one process, in this one, into a file of its own
    cfg, info = ws.load_config(), read_dataset(ws.dataset)
    from retdmctl.config import concrete

    concrete(cfg)
    key = backbone_cache_key(ws, cfg, info, CPU)
    one = tmp_path / "one.h5"
    _extract(ws, cfg, info, CPU, one, key)
    with h5py.File(one) as a, h5py.File(sharded) as b:
        assert b.attrs["key"] == a.attrs["key"]
        fa, fb = a["features"], b["features"]
        assert (fb.shape, fb.dtype, fb.chunks) == (fa.shape, fa.dtype, fa.chunks) == ((61, 3, 64, 4, 4), np.float16,
                                                                                       (1, 3, 64, 4, 4))
        # the same rows in the same order; each process ran with one thread (torchrun),
        # this one with all: float32 sums in another order, then float16
        np.testing.assert_allclose(fb[()].astype(np.float32), fa[()].astype(np.float32), rtol=2e-3, atol=2e-3)


def _outputs(values: np.ndarray, rows: np.ndarray, batch: int, fail_at: int | None = None):
    for start in range(0, len(rows), batch):
        if fail_at is not None and start >= fail_at:
            raise OSError("disk went away")
        r = rows[start : start + batch]
        yield values[r], r


@pytest.mark.parametrize("chunked", [False, True])
def test_merged_parts_are_the_file_one_writer_makes(tmp_path, chunked):
    from retdmctl.sources import merge_parts, part_path, write_cache, write_part

    values = np.random.default_rng(0).normal(size=(23, 2, 3)).astype(np.float16)
    whole, merged = tmp_path / "whole.h5", tmp_path / "merged.h5"
    write_cache(whole, _outputs(values, np.arange(23), 4), 23, {"k": 1}, "here", chunked=chunked)
    shards = np.array_split(np.arange(23), 3)  # 8, 8, 7 rows
    for rank, rows in enumerate(shards):
        write_part(merged, rank, _outputs(values, rows, 4), rows, chunked=chunked)
    parts = [part_path(merged, rank) for rank in range(3)]
    assert [p.name for p in parts] == [".merged.h5.part0", ".merged.h5.part1", ".merged.h5.part2"]
    merge_parts(merged, parts, 23, {"k": 1}, "here", block_bytes=30)  # 30 bytes: 2 rows a block
    with h5py.File(whole) as a, h5py.File(merged) as b:
        assert np.array_equal(a["features"][()], b["features"][()]) and np.array_equal(b["features"][()], values)
        assert a["features"].chunks == b["features"].chunks == ((1, 2, 3) if chunked else None)
        assert a.attrs["key"] == b.attrs["key"] and b.attrs["workspace"] == "here"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.h5", "whole.h5"]  # no part, no temporary


def test_a_part_that_fails_half_way_is_removed(tmp_path):
    from retdmctl.sources import write_part

    rows = np.arange(10, 20)
    with pytest.raises(OSError, match="disk went away"):
        write_part(tmp_path / "c.h5", 1, _outputs(np.zeros((20, 3), np.float16), rows, 4, fail_at=4), rows, chunked=False)
    assert list(tmp_path.iterdir()) == []
