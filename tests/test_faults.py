"""The fault catalogue: every way a result could go wrong without a word, and every bad
input or environment, each with its exact message. Each case leaves nothing good lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from retdmctl.cli import app
from retdmctl.errors import CheckpointError
from retdmctl.lock import workspace_lock
from retdmctl.runtime import load_checkpoint
from tests.conftest import TINY_TOML, invoke, runner, tiny_pipeline

TINY = TINY_TOML + 'way2 = "forward"\n'  # the joint stage on cached features


def stage_states(workdir) -> dict[str, str]:
    from retdmctl.pipeline import status
    from retdmctl.workspace import Workspace
    from stages import PIPELINE

    ws = Workspace(workdir)
    cfg = ws.load_config()
    return {s.name: status(ws, cfg, s, PIPELINE).state for s in PIPELINE}


def snapshot(workdir) -> dict[str, bytes]:
    """Every file of the workspace but the hash cache and the lock, by content."""
    out = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir).as_posix()
        if path.is_file() and not rel.startswith(".retdm/state.json") and "lock" not in path.name:
            out[rel] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished tiny pipeline (frozen tiny CNN): copy it, never change it."""
    return tiny_pipeline(tmp_path_factory.mktemp("done"), TINY)


@pytest.fixture
def work(done, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(done, dst)
    # the hash cache is keyed by absolute path: a copy starts without one
    (dst / ".retdm" / "state.json").unlink(missing_ok=True)
    return dst


# --- stale and missing inputs -----------------------------------------------------------
def test_eval_after_reingesting_another_dataset_runs_the_stale_stages_first(work):
    assert invoke("--workdir", work, "ingest", "demo", "--images", "80").exit_code == 0
    assert stage_states(work)["classifier"] == "stale"
    result = invoke("--workdir", work, "eval")
    assert result.exit_code == 0, result.output
    ran = [line.split(":")[0] for line in result.output.splitlines() if ": running" in line]
    assert ran == ["knn", "classifier", "metric", "joint", "eval"]
    from retdmctl.data.dataset import read_dataset

    test_rows = read_dataset(work / "data" / "dataset.h5").split("test")
    assert json.loads((work / "eval" / "metrics.json").read_text())["images"] == len(test_rows)
    assert set(stage_states(work).values()) == {"done"}


def test_a_library_caller_cannot_run_a_stage_on_a_stale_input(work):
    import io

    from rich.console import Console

    from retdmctl.errors import StageNotReadyError
    from retdmctl.pipeline import Context, run_stage
    from retdmctl.workspace import Workspace
    from stages import BY_NAME, PIPELINE

    ws = Workspace(work)
    cfg = ws.load_config()
    cfg.knn.k = 2  # knn is now stale: metric must not read its old knn.h5
    with pytest.raises(StageNotReadyError) as info:
        run_stage(Context(ws, cfg, Console(file=io.StringIO())), BY_NAME["metric"], PIPELINE)
    assert str(info.value) == (
        "knn.h5 is out of date (knn: config changed: knn.k=2): run `retdmctl knn` first"
    )


def test_a_state_dict_that_does_not_fit_is_an_error_naming_the_keys():
    from retdmctl.models.retdm import RETDM
    from retdmctl.model_io.checkpoint import load_state

    model = RETDM(3, 8, 4)
    state = {k: v for k, v in model.state_dict().items() if k != "cls_head.bias"}
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_state(model, state, "joint/checkpoint.pt")
    assert str(info.value) == (
        "joint/checkpoint.pt does not fit the model; missing keys: cls_head.bias (1); unexpected keys: extra.weight (1)"
    )


def test_finetuning_after_a_frozen_classifier_loads_the_pretrained_backbone_explicitly():
    from retdmctl.config import Config
    from retdmctl.models.backbones import build_backbone
    from retdmctl.model_io.checkpoint import build_model, restore_image_model

    cfg = Config()
    cfg.model.frozen_backbone, cfg.model.tune_blocks, cfg.model.views = True, 0, 1  # pooled features only
    frozen, _ = build_model(cfg, 4, pretrained=True)
    ckpt = {"model": frozen.state_dict(), "frozen_backbone": True}
    cfg.model.frozen_backbone = False
    model, _ = build_model(cfg, 4, pretrained=False, seed=3)
    note = restore_image_model(model, ckpt, cfg, "classifier/checkpoint.pt")
    assert note == "efficientnet_lite0 pretrained weights (classifier/checkpoint.pt was trained on frozen features)"
    reference, _ = build_backbone("efficientnet_lite0", pretrained=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.cls_head.weight, frozen.cls_head.weight)
    # the other way round would silently drop fine-tuned weights: refused
    cfg.model.frozen_backbone = True
    frozen_model, _ = build_model(cfg, 4, pretrained=False)
    with pytest.raises(CheckpointError, match=r"holds a fine-tuned backbone, but model.frozen_backbone = true"):
        restore_image_model(frozen_model, {"model": model.state_dict(), "frozen_backbone": False}, cfg, "x")


def test_the_content_of_the_weights_file_is_part_of_the_fingerprint(work, tmp_path):
    from retdmctl.models.backbones import build_backbone

    weights = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny_cnn")[0].state_dict(), weights)
    assert invoke("--workdir", work, "train", "--stage", "classifier", "--weights-file", str(weights)).exit_code == 0
    assert stage_states(work)["classifier"] == "done"
    torch.save({k: v + 1 for k, v in torch.load(weights, weights_only=True).items()}, weights)
    assert stage_states(work)["classifier"] == "stale"


def test_eval_manifest_covers_the_model_section(done):
    manifest = json.loads((done / ".retdm" / "manifests" / "eval.json").read_text())
    assert set(manifest["config"]) == {"model", "eval"}


# --- one writer per workspace -----------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from retdmctl.lock import workspace_lock
with workspace_lock(Path(sys.argv[1]), "retdmctl ingest demo"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_is_refused_and_readers_still_work(work):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(work)
        for command in (["ingest", "demo"], ["run"], ["knn", "--k", "3"], ["eval"]):
            result = invoke("--workdir", work, *command)
            assert (result.exit_code, result.output) == (
                1, f"error: workspace {work} is in use by pid {holder.pid} (retdmctl ingest demo)\n"
            ), command
        assert snapshot(work) == before
        assert invoke("--workdir", work, "status").exit_code == 0  # a reader needs no lock
    finally:
        holder.kill()
        holder.wait()
    assert invoke("--workdir", work, "knn", "--k", "3").exit_code == 0  # the kernel freed the lock of the killed holder


@pytest.mark.slow
def test_two_concurrent_ingests_end_with_one_refused_and_the_store_intact(tmp_path):
    (tmp_path / "retdm.toml").write_text(TINY.replace("demo_images = 60", "demo_images = 4000"))  # ingest outlasts the second one's start-up
    env = {**os.environ, "RETDM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "retdmctl", "--workdir", str(tmp_path), "ingest", "demo"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # start the second only once the first holds the lock: launched together, the first
    # could finish before the second starts on a fast machine, and both would succeed
    holder = tmp_path / ".retdm" / "lock.json"
    deadline = time.monotonic() + 60
    while not (holder.exists() and f'"pid": {first.pid}' in holder.read_text(errors="ignore")):
        assert first.poll() is None and time.monotonic() < deadline, "the first ingest never held the lock"
        time.sleep(0.005)
    procs = [first, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, _, err in results if code == 1)
    winner = next(p.pid for p, (code, _, _) in zip(procs, results) if code == 0)
    assert refused.strip().splitlines()[-1] == f"error: workspace {tmp_path} is in use by pid {winner} ({' '.join(['retdmctl', *cmd[3:]])})"
    from retdmctl.data.dataset import read_dataset
    from retdmctl.data.store import ImageReader

    info = read_dataset(tmp_path / "data" / "dataset.h5")
    reader = ImageReader(tmp_path / "data" / "images.lmdb")
    assert len(info.ids) == 4000 and all(reader.get(i) for i in info.ids)
    assert stage_states(tmp_path)["ingest"] == "done"


def test_leftovers_are_removed_only_when_their_writer_is_dead(tmp_path):
    from retdmctl.atomic import remove_stale_tmp

    target = tmp_path / "knn.h5"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".knn.h5.tmp-{alive.pid}"
        dead = tmp_path / ".knn.h5.tmp-999999999"
        live.write_bytes(b"being written")
        dead.write_bytes(b"half")
        assert remove_stale_tmp(target) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        alive.kill()
        alive.wait()


# --- options ----------------------------------------------------------------------------
def test_a_rejected_option_changes_nothing(work):
    before = snapshot(work)
    result = invoke("--workdir", work, "train", "--stage", "metric", "--alpha", "-5")
    assert (result.exit_code, result.output) == (2, "error: loss.alpha must be >= 0, got -5.0\n")
    result = invoke("--workdir", work, "run", "--set", "loss.alpha=-5")
    assert (result.exit_code, result.output) == (2, "error: loss.alpha must be >= 0, got -5.0\n")
    assert snapshot(work) == before  # retdm.toml byte-identical, metric checkpoint unchanged
    assert set(stage_states(work).values()) == {"done"}


def test_a_failed_stage_leaves_the_previous_artifacts_and_their_status(work, monkeypatch):
    import stages.metric as metric_stage
    from retdmctl.training import setup

    real = setup.finish_training

    def write_then_fail(stage_dir, state, history):
        real(stage_dir, state, history)  # the new checkpoint is staged...
        raise OSError(errno.ENOSPC, "No space left on device", str(stage_dir / "checkpoint.pt"))

    monkeypatch.setattr(metric_stage, "finish_training", write_then_fail)
    before = snapshot(work)
    result = invoke("--workdir", work, "train", "--stage", "metric", "--alpha", "0.5")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"error: no space left on device: {work / 'metric' / 'checkpoint.pt'}; "
        "the previous artifacts are unchanged, free some space and run the command again"
    )
    after = snapshot(work)
    assert after.pop("metric/resume.pt")  # the finished epochs are kept, to resume from
    # the experiment log shows what the failed run did (retdmctl.tracking): no stage output
    assert after.pop("metric/history.partial.csv").startswith(b"epoch,")
    logged = [{k: d.pop(k) for k in list(d) if k.startswith("runs/metric/")} for d in (before, after)]
    assert len(logged[1]) == len(logged[0])  # one event file (none without tensorboard), started over
    assert after == before
    assert set(stage_states(work).values()) == {"done"}
    assert not [p for p in work.rglob("*") if ".tmp-" in p.name]


def test_eval_options_are_for_that_evaluation_only(work):
    toml = (work / "retdm.toml").read_bytes()
    result = invoke("--workdir", work, "eval", "--checkpoint", "classifier", "--split", "val")
    assert result.exit_code == 0, result.output
    saved = json.loads((work / "eval" / "metrics.json").read_text())
    assert (saved["checkpoint"], saved["split"]) == ("classifier/checkpoint.pt", "val")
    assert (work / "retdm.toml").read_bytes() == toml
    result = invoke("--workdir", work, "run")
    ran = [line.split(":")[0] for line in result.output.splitlines() if ": running" in line]
    assert ran == ["eval"]
    saved = json.loads((work / "eval" / "metrics.json").read_text())
    assert (saved["checkpoint"], saved["split"]) == ("joint/checkpoint.pt", "test")


def test_settings_of_one_dataset_do_not_leak_into_the_next(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(30):
        Image.new("RGB", (40, 30), (i * 8, 0, 0)).save(photos / f"{i}.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{i}.jpg,{'a|b' if i % 2 else 'b'}\n" for i in range(30)))
    w = tmp_path / "w"
    assert invoke("--workdir", w, "ingest", "demo", "--images", "40", "--seed", "3").exit_code == 0
    assert invoke("--workdir", w, "train", "--stage", "classifier", "--image-size", "128", "--epochs", "1",
                  "--set", "model.backbone=tiny_cnn", "--set", "model.frozen_backbone=true").exit_code == 0
    result = invoke("--workdir", w, "ingest", "csv", str(labels), "--images", str(photos), "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "note: another dataset: model.image_size reset from 128 to 224; ingest.seed reset from 3 to 0" in result.output
    from retdmctl.workspace import Workspace

    cfg = Workspace(w).load_config()
    assert (cfg.model.image_size, cfg.ingest.seed, cfg.ingest.demo_images) == (224, 0, 2000)


def test_quickstart_uses_its_own_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETDM_WORKDIR", raising=False)
    from retdmctl.cli_support import STATE

    monkeypatch.setattr(STATE, "workdir_given", False)
    result = runner.invoke(app, ["quickstart", "--images", "60"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "retdm-quickstart" / "eval" / "report.html").exists()
    assert not (tmp_path / "retdm-work").exists()


# --- help -------------------------------------------------------------------------------
def test_help_lists_commands_in_pipeline_order_without_type_names():
    import re

    result = runner.invoke(app, ["--help"])
    listed = re.findall(r"^  (\w+)\s", result.output.split("Commands:")[1], flags=re.M)
    assert listed[:7] == ["ingest", "knn", "train", "eval", "run", "status", "quickstart"]
    for command in (["train"], ["eval"], ["knn"], ["run"], ["ingest", "csv"], ["ingest", "coco"], ["status"]):
        text = runner.invoke(app, [*command, "--help"], terminal_width=200).output
        assert not re.search(r"<(str|int|float|list\[str\])>|\b(INTEGER|TEXT|FLOAT)\b", text), command
        assert "-w, --workdir" in text, command
    train = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "[default: (224, or model.image_size in retdm.toml)]" in train
    eval_help = runner.invoke(app, ["eval", "--help"], terminal_width=200).output
    assert "--checkpoint classifier|joint" in eval_help and "metric" not in eval_help.split("--checkpoint")[1].split("\n")[0]


def test_workdir_is_accepted_after_the_command(work):
    result = runner.invoke(app, ["status", "--workdir", str(work)])
    assert result.exit_code == 0 and str(work) in result.output.replace("\n", "")


# --- data -------------------------------------------------------------------------------
def test_an_empty_val_split_is_an_error_before_any_training(work):
    import h5py
    import numpy as np

    with h5py.File(work / "data" / "dataset.h5", "a") as h5:
        del h5["splits/val"]
        h5.create_dataset("splits/val", data=np.zeros(0, dtype=np.int64))
    # re-record ingest as done with the edited file (as if it had been written so)
    manifest = json.loads((work / ".retdm" / "manifests" / "ingest.json").read_text())
    from retdmctl.workspace import Workspace

    manifest["outputs"]["data/dataset.h5"] = Workspace(work).fingerprint(work / "data" / "dataset.h5")
    (work / ".retdm" / "manifests" / "ingest.json").write_text(json.dumps(manifest))
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--force")
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, "error: data/dataset.h5: the val split is empty; re-ingest with a larger --val-fraction"
    )


# --- reproducibility --------------------------------------------------------------------
def test_metrics_do_not_depend_on_a_preexisting_feature_cache(done, tmp_path):
    warm = tmp_path / "warm"
    shutil.copytree(done, warm)
    for name in ("classifier", "metric", "joint", "eval"):
        shutil.rmtree(warm / name)
    from retdmctl.inputs import backbone_cache_path
    from retdmctl.workspace import Workspace

    assert backbone_cache_path(Workspace(warm), Workspace(warm).load_config()).is_file()  # cached already
    result = invoke("--workdir", warm, "run")
    assert result.exit_code == 0 and "reusing cached tiny_cnn features" in result.output
    fresh = json.loads((done / "eval" / "metrics.json").read_text())["metrics"]
    again = json.loads((warm / "eval" / "metrics.json").read_text())["metrics"]
    assert again == fresh


# --- environment ------------------------------------------------------------------------
def test_missing_workdir_for_status_is_one_line(tmp_path):
    result = invoke("--workdir", tmp_path / "nope", "status")
    assert (result.exit_code, result.output) == (
        1, f"error: workspace {tmp_path / 'nope'} does not exist: run `retdmctl ingest <format> PATH` first\n"
    )


def test_a_read_only_workdir_is_one_line(work, monkeypatch):
    import retdmctl.lock as lock

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(work / ".retdm" / "lock"))

    monkeypatch.setattr(lock.FileLock, "acquire", refuse)
    result = invoke("--workdir", work, "knn", "--k", "3")
    assert (result.exit_code, result.output) == (
        1, f"error: permission denied: {work / '.retdm' / 'lock'} (is the workspace read-only?)\n"
    )
    assert invoke("--workdir", work, "status").exit_code == 0


def test_a_corrupt_resume_point_is_set_aside_and_the_stage_starts_over(work):
    (work / "classifier" / "resume.pt").write_bytes(b"\x00garbage")
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "classifier starts over" in result.output
    assert len(list((work / "classifier").glob("resume.pt.corrupt-*"))) == 1
    assert stage_states(work)["classifier"] == "done"


def test_a_corrupt_checkpoint_is_rebuilt_by_the_stage_that_made_it(work):
    good = (work / "joint" / "checkpoint.pt").read_bytes()
    (work / "joint" / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert stage_states(work)["joint"] == "stale"
    result = invoke("--workdir", work, "eval")
    assert result.exit_code == 0, result.output
    # training is deterministic: the rebuilt checkpoint is the same file, so eval stays valid
    assert [line.split(":")[0] for line in result.output.splitlines() if ": running" in line] == ["joint"]
    assert (work / "joint" / "checkpoint.pt").read_bytes() == good
    assert set(stage_states(work).values()) == {"done"}


def test_an_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=rf"^{bad}: not a readable checkpoint \("):
        load_checkpoint(bad)


def test_progress_bars_are_transient_and_each_epoch_is_logged(work):
    from retdmctl.progress import make_progress

    assert make_progress().live.transient
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--force")
    lines = [line for line in result.output.splitlines() if line.startswith("classifier epoch ")]
    assert [line.split(":")[0] for line in lines] == ["classifier epoch 1/2", "classifier epoch 2/2"]


def test_lock_file_names_the_holder(tmp_path):
    with workspace_lock(tmp_path, "retdmctl run"):
        info = json.loads((tmp_path / ".retdm" / "lock.json").read_text())
        assert info == {"pid": os.getpid(), "command": "retdmctl run"}
    assert not (tmp_path / ".retdm" / "lock.json").exists()
    time.sleep(0)


def test_features_of_a_random_frozen_backbone_are_the_same_when_extracted_again(done, tmp_path):
    """tiny_cnn without pretrained weights is random: a deleted cache must come back the
    same, whatever the global RNG went through, or eval would score other features."""
    import h5py

    from retdmctl.inputs import backbone_cache_path
    from retdmctl.workspace import Workspace

    work = tmp_path / "w"
    shutil.copytree(done, work)
    ws = Workspace(work)
    cache = backbone_cache_path(ws, ws.load_config())
    with h5py.File(cache) as h5:
        before = h5["features"][()]
    cache.unlink()
    torch.manual_seed(12345)  # whatever state the global RNG is in
    result = invoke("--workdir", work, "eval", "--force")
    assert result.exit_code == 0, result.output
    with h5py.File(cache) as h5:
        assert (h5["features"][()] == before).all()
