"""The experiment log (retdmctl.tracking): every training stage's per-epoch history as
CSV beside its checkpoint, always; TensorBoard event files under ``runs/`` when
tensorboard is installed; ``retdmctl eval``'s metrics there too."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from rich.console import Console

from conftest import TINY_TOML, invoke, run_stages, tiny_config, tiny_pipeline, trained_workspace
from retdmctl import tracking
from retdmctl.metrics import METRIC_NAMES
from retdmctl.pipeline import Context, run_stage, status
from retdmctl.runtime import load_checkpoint
from retdmctl.training import loop
from retdmctl.workspace import Workspace
from stages import BY_NAME, PIPELINE

TB_REASON = "tensorboard is not installed (pip install 'retdmctl[tracking]'): no event files to read"


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``logdir``'s event files: [(step, value), ...]."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", reason=TB_REASON)
    acc = accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_history_csv_round_trips_floats_and_gaps(tmp_path):
    history = [{"epoch": 1, "train_total": 0.1 + 0.2, "val_loss": 1 / 3, "lr": 0.1, "kept": False},
               {"epoch": 2, "train_total": 0.25, "train_clml": 2 / 3, "val_loss": 0.5, "lr": 0.01, "kept": True}]
    path = tmp_path / "history.csv"
    path.write_text(tracking.history_csv(history))
    assert path.read_text().splitlines()[0] == "epoch,train_total,val_loss,lr,kept,train_clml"
    assert tracking.read_history(path) == history  # exact floats; the missing cell left out
    assert tracking.history_csv([]) == "\n"


@pytest.mark.parametrize("stage", ["classifier", "metric", "joint"])
def test_every_training_stage_writes_its_history_beside_its_checkpoint(tiny_frozen, stage):
    ws = tiny_frozen
    stage_dir = ws.stage_dir(stage)
    history = load_checkpoint(stage_dir / "checkpoint.pt")["history"]
    assert tracking.read_history(stage_dir / "history.csv") == history
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1)) and sum(h["kept"] for h in history) == 1
    assert not (stage_dir / "history.partial.csv").exists()  # the run finished: the final CSV replaces it


def test_the_csv_log_is_no_stage_output(tiny_frozen, tmp_path):
    """Deleting or editing the log never makes the stage stale (it is a view of the
    checkpoint's history, which is fingerprinted)."""
    shutil.copytree(tiny_frozen.root, tmp_path / "w")
    (tmp_path / "w" / ".retdm" / "state.json").unlink(missing_ok=True)  # keyed by absolute path
    ws = Workspace(tmp_path / "w")
    cfg = ws.load_config()
    (ws.stage_dir("classifier") / "history.csv").write_text("edited\n")
    (ws.stage_dir("metric") / "history.csv").unlink()
    for name in ("classifier", "metric", "joint"):
        assert status(ws, cfg, BY_NAME[name], PIPELINE).state == "done", name


@pytest.fixture(scope="module")
def tiny_frozen(tmp_path_factory):
    """ingest, knn, classifier, metric and joint on the frozen tiny CNN (2/2/2 epochs)."""
    cfg = tiny_config(frozen=True)
    cfg.classifier.epochs = 2
    return trained_workspace(tmp_path_factory.mktemp("frozen"), cfg, "ingest", "knn", "classifier", "metric", "joint")


def test_tensorboard_scalars_per_epoch_equal_the_history(tiny_frozen):
    for stage in ("classifier", "metric", "joint"):
        history = load_checkpoint(tiny_frozen.stage_dir(stage) / "checkpoint.pt")["history"]
        got = scalars(tiny_frozen.root / "runs" / stage)
        epochs = [h["epoch"] for h in history]
        assert "val/loss" in got and "lr" in got and "train/total" in got, sorted(got)
        for key, tag in (("val_loss", "val/loss"), ("train_total", "train/total"), ("lr", "lr")):
            assert [s for s, _ in got[tag]] == epochs, (stage, tag)
            assert [v for _, v in got[tag]] == pytest.approx([h[key] for h in history], rel=1e-6)
        if stage != "metric":  # the metric stage measures no mAP
            assert [v for _, v in got["val/mAP"]] == pytest.approx([h["val_mAP"] for h in history], rel=1e-6)


def test_without_tensorboard_only_the_csv_and_the_same_numbers(tmp_path, monkeypatch):
    cfg = tiny_config(frozen=True)
    with_tb = trained_workspace(tmp_path / "with", cfg)
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    without = trained_workspace(tmp_path / "without", cfg)
    assert not (without.root / "runs").exists()
    a, b = (load_checkpoint(w.stage_dir("classifier") / "checkpoint.pt") for w in (with_tb, without))
    assert tracking.read_history(without.stage_dir("classifier") / "history.csv") == b["history"]
    assert a["history"] == b["history"]  # the log changes no trained number
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_an_interrupted_run_shows_its_epochs_and_the_resumed_run_repeats_none(tmp_path, monkeypatch):
    cfg = tiny_config(frozen=True)
    cfg.classifier.epochs = 4
    ws = trained_workspace(tmp_path, cfg, "ingest")
    stage_dir = ws.stage_dir("classifier")
    real_save = loop.save_checkpoint

    def die_before_saving_epoch_3(path, state, **kw):
        if state["epoch"] == 3:  # epoch 3 is logged, its resume point never written
            raise KeyboardInterrupt
        real_save(path, state, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", die_before_saving_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_stages(ws, cfg, "classifier")
    assert not (stage_dir / "history.csv").exists() and not (stage_dir / "checkpoint.pt").exists()
    partial = tracking.read_history(stage_dir / "history.partial.csv")
    assert [h["epoch"] for h in partial] == [1, 2, 3]  # what the killed run did
    assert load_checkpoint(stage_dir / "resume.pt")["epoch"] == 2

    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    out = io.StringIO()
    assert run_stage(Context(ws, cfg, Console(file=out)), BY_NAME["classifier"], PIPELINE)
    assert "resuming after epoch 2 of 4" in out.getvalue()
    history = load_checkpoint(stage_dir / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert tracking.read_history(stage_dir / "history.csv") == history  # rows 1-2 kept, 3 once
    assert partial[:2] == [{k: v for k, v in h.items() if k != "kept"} for h in history[:2]]
    assert not (stage_dir / "history.partial.csv").exists()
    if tracking.tensorboard_available():  # (the CSV part above runs without it)
        got = scalars(ws.root / "runs" / "classifier")
        assert [s for s, _ in got["val/loss"]] == [1, 2, 3, 4]  # the killed run's epoch 3 is gone
        assert [v for _, v in got["val/loss"]] == pytest.approx([h["val_loss"] for h in history], rel=1e-6)


def test_a_fresh_start_clears_the_previous_log(tmp_path):
    """--force (or a config change) trains from scratch: the log starts over too."""
    ws = Workspace(tmp_path / "again")
    cfg = tiny_config(frozen=True)
    cfg.classifier.epochs = 3
    trained_workspace(ws.root, cfg)
    cfg.classifier.epochs = 2
    ws.save_config(cfg)
    run_stages(ws, cfg, "classifier")  # the config changed: trained again, 2 epochs
    history = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in tracking.read_history(ws.stage_dir("classifier") / "history.csv")] == [1, 2]
    assert len(history) == 2
    if tracking.tensorboard_available():  # (the CSV part above runs without it)
        assert [s for s, _ in scalars(ws.root / "runs" / "classifier")["val/loss"]] == [1, 2]
        assert len(list((ws.root / "runs" / "classifier").iterdir())) == 1


def test_eval_writes_its_12_metrics_for_tensorboard(tmp_path):
    root = tiny_pipeline(tmp_path, TINY_TOML)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())["metrics"]
    kept = next(h["epoch"] for h in load_checkpoint(root / "joint" / "checkpoint.pt")["history"] if h["kept"])
    got = scalars(root / "runs" / "eval" / "test")
    assert sorted(got) == sorted(f"eval/{name}" for name in METRIC_NAMES) and len(got) == 12
    for name in METRIC_NAMES:
        assert got[f"eval/{name}"] == [(kept, pytest.approx(metrics[name], rel=1e-6))], name
    # another eval of the split replaces it; another split goes beside it
    assert invoke("-w", root, "eval", "--force", "--report", "none").exit_code == 0
    assert invoke("-w", root, "eval", "--split", "val", "--report", "none").exit_code == 0
    assert all(len(points) == 1 for points in scalars(root / "runs" / "eval" / "test").values())
    assert sorted(scalars(root / "runs" / "eval" / "val")) == sorted(got)
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["classifier", "eval", "joint", "metric"]
