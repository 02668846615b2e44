"""Kill ``retdmctl ingest`` with SIGKILL at several points, run the same command again,
and the store is identical (ids, labels, splits, bytes) to an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import retdmctl.data.ingest as core
from retdmctl.cli import app
from retdmctl.config import IngestConfig
from retdmctl.data.dataset import read_dataset
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.coco import read_coco
from retdmctl.data.store import store_key
from retdmctl.workspace import Workspace
from tests.test_ingest_formats import QUIET, coco_json, make_jpeg

N_IMAGES = 400
ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path) -> Path:
    """COCO layout, 400 noisy 400x300 JPEGs (a few seconds of encoding), plus one
    zero-byte and one missing image so that skips are resumed too."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(N_IMAGES):
        name = f"{i:012d}.jpg"
        make_jpeg(root / "train2017" / name, size=(400, 300), seed=i)
        images.append((i + 1, name))
        annotations += [(i + 1, int(c)) for c in rng.choice([1, 3, 17, 18], size=rng.integers(1, 3), replace=False)]
    (root / "train2017" / "empty.jpg").write_bytes(b"")
    images += [(N_IMAGES + 1, "empty.jpg"), (N_IMAGES + 2, "missing.jpg")]
    annotations += [(N_IMAGES + 1, 1), (N_IMAGES + 2, 1)]
    ann = root / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(coco_json(images, annotations)))
    return ann


def command(ann: Path) -> list[str]:
    return ["ingest", "coco", str(ann), "--workers", "2"]


def entries(partial: Path) -> int:
    """Committed entries of the .partial store (read without taking its lock)."""
    if not (partial / "data.mdb").exists():
        return -1
    try:
        env = lmdb.open(str(partial), readonly=True, lock=False, subdir=True)
    except lmdb.Error:
        return -1
    try:
        return env.stat()["entries"]
    finally:
        env.close()


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_when(workdir: Path, ann: Path, ready, what: str) -> None:
    """Start ingest in a subprocess, SIGKILL it once ``ready(partial)`` holds."""
    partial = workdir / "data" / "images.lmdb.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from retdmctl.cli import entry; entry()", "--workdir", str(workdir),
         *command(ann)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready(partial):
            if proc.poll() is not None:
                pytest.fail(f"ingest ended before the kill point ({what}): {proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"kill point never reached: {what}")
            time.sleep(0.01)
        workers = children(proc.pid)
        assert len(workers) == 2, "the encode pool is started before the store is opened"
        proc.send_signal(signal.SIGKILL)  # the main process only: its workers must follow
        proc.wait(10)
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "encode workers outlived the killed ingest"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()


def snapshot(ws: Workspace) -> dict:
    info = read_dataset(ws.dataset)
    env = lmdb.open(str(ws.lmdb), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        store = {bytes(k).hex(): bytes(v) for k, v in txn.cursor()}  # keys: digests of the ids
    env.close()
    return {
        "ids": info.ids,
        "labels": info.labels.tolist(),
        "classes": info.class_names,
        "splits": {k: v.tolist() for k, v in info.splits.items()},
        "store": store,
    }


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_the_same_store(tmp_path):
    ann = make_dataset(tmp_path / "coco")
    reference = tmp_path / "reference"
    result = CliRunner().invoke(app, ["--workdir", str(reference), *command(ann)])
    assert result.exit_code == 0, result.output
    assert "stored 400 images" in result.output

    work = tmp_path / "killed"
    kill_when(work, ann, lambda p: p.exists(), "the .partial store was just created")
    kill_when(work, ann, lambda p: entries(p) >= 64, "a first batch is committed")
    first = entries(work / "data" / "images.lmdb.partial")
    kill_when(work, ann, lambda p: entries(p) >= first + 128, "two more batches are committed")
    done = entries(work / "data" / "images.lmdb.partial")
    assert 64 <= first < done < N_IMAGES

    resumed = subprocess.run(
        [sys.executable, "-c", "from retdmctl.cli import entry; entry()", "--workdir", str(work),
         *command(ann)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert f"resuming: {done} of 402 images already stored" in out.replace("\n", " ")
    assert "skipped 2 items" in out
    assert not (work / "data" / "images.lmdb.partial").exists()

    a, b = snapshot(Workspace(reference)), snapshot(Workspace(work))
    assert len(a["store"]) == N_IMAGES and sorted(a["store"]) == sorted(store_key(i).hex() for i in a["ids"])
    assert a["ids"] == b["ids"] and a["labels"] == b["labels"] and a["splits"] == b["splits"]
    assert a["classes"] == b["classes"]
    assert a["store"] == b["store"]  # every byte


def test_crash_between_dataset_and_rename_resumes(tmp_path, monkeypatch):
    """A crash after dataset.h5 is written but before the store is renamed into place."""
    root = tmp_path / "coco"
    images = [(i + 1, f"{i}.jpg") for i in range(20)]
    for _, name in images:
        make_jpeg(root / "train2017" / name, size=(300, 200), seed=len(name) * 31 + int(name[:-4]))
    ann = root / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(coco_json(images, [(i, 1 + (i % 3 == 0) * 2) for i, _ in images])))
    cfg = IngestConfig(path=str(ann), workers=2)
    ref = Workspace(tmp_path / "ref")
    run_ingest(read_coco([ann], []), ref, cfg, QUIET)

    ws = Workspace(tmp_path / "w")
    real_replace = os.replace

    def crash(src, dst):
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(core.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(read_coco([ann], []), ws, cfg, QUIET)
    monkeypatch.setattr(core.os, "replace", real_replace)
    assert ws.dataset.exists() and not ws.lmdb.exists()
    console_out = io.StringIO()
    run_ingest(read_coco([ann], []), ws, cfg, Console(file=console_out))
    assert "resuming: 20 of 20 images already stored" in console_out.getvalue()
    assert snapshot(ws) == snapshot(ref)
