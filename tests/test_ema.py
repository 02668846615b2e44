"""Weight EMA (``<stage>.ema``): the average follows every step, validation and the kept
weights use it, a resumed run averages as an uninterrupted one, and ema = 0 changes
nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import retdmctl.training.loop as loop
from retdmctl.cli import app
from retdmctl.config import Config, TrainConfig, parse_set, validate
from retdmctl.errors import ConfigError
from retdmctl.runtime import load_checkpoint
from retdmctl.workspace import Workspace
from stages import BY_NAME
from tests.conftest import run_stages, tiny_config


def spy_resume_points(monkeypatch) -> list[dict]:
    """Every resume point the loop saves, copied as it was at that moment."""
    saved: list[dict] = []
    real_save = loop.save_checkpoint

    def spy(path, state, **kw):
        copy = dict(state)
        copy["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
        saved.append(copy)
        real_save(path, state, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    return saved


class _Batches:
    """Three fixed batches of a tiny regression, in the shape of a stage's source."""

    batch_size = 4

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(3)]

    def num_batches(self, rows):
        return len(self.data)

    def train_batches(self, rows, seed):
        for i, (x, y) in enumerate(self.data):
            yield x, y, np.arange(4 * i, 4 * i + 4)


def test_the_average_follows_every_step_as_computed_by_hand(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []  # the weights each step starts from

    def step(x, y, rows, rng):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"total": loss.detach()}

    schedule = TrainConfig(epochs=1, lr=0.1, ema=0.5, select="last")
    loop.fit(name="t", stage_dir=tmp_path, model=model, params=list(model.parameters()),  # a plain list
             schedule=schedule, source=_Batches(), train_rows=np.arange(12), step=step,
             validate=lambda: {"val_loss": 0.0}, device=torch.device("cpu"), resume_key={},
             console=Console(file=io.StringIO()))
    resume = load_checkpoint(tmp_path / "resume.pt")
    after = seen[1:] + [resume["model"]]  # the weights after steps 1, 2 and 3
    assert len(after) == 3 and not torch.equal(after[0]["weight"], start["weight"])
    for name in ("weight", "bias"):
        shadow = start[name]
        for weights in after:  # decay 0.5: shadow = 0.5 * shadow + 0.5 * param
            shadow = 0.5 * shadow + 0.5 * weights[name]
        assert torch.allclose(resume["ema"][name], shadow, rtol=1e-6, atol=1e-7), name
        # select = "last": the model is left with the average, not the live weights
        assert torch.equal(dict(model.named_parameters())[name].detach(), resume["ema"][name])
        assert not torch.equal(resume["ema"][name], resume["model"][name])


def test_ema_zero_changes_nothing(tmp_path, monkeypatch):
    saved = spy_resume_points(monkeypatch)
    default_ws, zero_ws = Workspace(tmp_path / "default"), Workspace(tmp_path / "zero")
    run_stages(default_ws, tiny_config(), "ingest", "classifier")
    cfg = tiny_config()
    cfg.classifier.ema = 0.0  # said explicitly
    run_stages(zero_ws, cfg, "ingest", "classifier")
    assert saved and not any("ema" in state for state in saved)  # resume points as before
    ckpt = "classifier/checkpoint.pt"
    assert (default_ws.root / ckpt).read_bytes() == (zero_ws.root / ckpt).read_bytes()


def test_the_kept_weights_are_the_average_not_the_live_weights(tmp_path, monkeypatch):
    saved = spy_resume_points(monkeypatch)
    ws, cfg = Workspace(tmp_path), tiny_config()
    cfg.classifier.ema = 0.5  # select = "best": the best epoch's average
    run_stages(ws, cfg, "ingest", "classifier")
    ckpt = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
    kept = next(h["epoch"] for h in ckpt["history"] if h["kept"])
    at_kept = next(s for s in saved if s["epoch"] == kept)
    trained = at_kept["ema"]
    assert set(trained) == {n for n in ckpt["model"] if n.startswith(("backbone.", "embed.", "cls_head."))
                            and not n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    for name, shadow in trained.items():
        assert torch.equal(ckpt["model"][name], shadow), name
    assert any(not torch.equal(at_kept["model"][n], s) for n, s in trained.items())  # not the live weights
    for name in ckpt["model"]:  # BatchNorm's running statistics: the live model's
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(ckpt["model"][name], at_kept["model"][name]), name


def test_interrupted_training_with_ema_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_config()
    cfg.classifier.ema, cfg.classifier.select = 0.7, "last"
    ref_ws, ws = Workspace(tmp_path / "ref"), Workspace(tmp_path / "cut")
    run_stages(ref_ws, cfg, "ingest", "classifier")
    run_stages(ws, cfg, "ingest")
    real_save = loop.save_checkpoint

    def save_then_die(path, state, **kw):
        real_save(path, state, **kw)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # as if Ctrl-C arrived right after this epoch

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stages(ws, cfg, "classifier")
    assert "ema" in load_checkpoint(ws.stage_dir("classifier") / "resume.pt")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    out = io.StringIO()
    run_stages(ws, cfg, "classifier", out=out)
    assert "resuming after epoch 1 of 3" in out.getvalue()
    got = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
    ref = load_checkpoint(ref_ws.stage_dir("classifier") / "checkpoint.pt")
    assert [h["val_mAP"] for h in got["history"]] == pytest.approx([h["val_mAP"] for h in ref["history"]])
    for key in ref["model"]:
        assert torch.allclose(got["model"][key].float(), ref["model"][key].float(), atol=1e-6), key


@pytest.mark.parametrize("stage", ["classifier", "metric", "joint"])
def test_ema_is_part_of_the_resume_key(stage):
    sections = BY_NAME[stage].sections  # resume_key["config"] is cfg.sections(STAGE.sections)
    cfg, other = Config(), Config()
    getattr(other, stage).ema = 0.99
    assert cfg.sections(sections) != other.sections(sections)


def test_validate_rejects_an_ema_of_one(tmp_path):
    cfg = Config()
    cfg.classifier.ema = 1.0
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == "classifier.ema must be in [0, 1), got 1.0"
    result = CliRunner().invoke(app, ["--workdir", str(tmp_path), "run", "--set", "joint.ema=1"])
    assert (result.exit_code, result.output) == (2, "error: joint.ema must be in [0, 1), got 1.0\n")


def test_set_takes_the_ema_of_each_stage(tmp_path):
    sets = ["classifier.ema=0.99", "metric.ema=0.9", "joint.ema=0.5"]
    cfg = Workspace(tmp_path).load_config(None, parse_set(sets))  # what --set does
    validate(cfg)
    assert (cfg.classifier.ema, cfg.metric.ema, cfg.joint.ema) == (0.99, 0.9, 0.5)


@pytest.mark.slow
def test_two_gloo_processes_average_as_one_process(tmp_path):
    """Every rank holds the same parameters, hence the same average: no communication."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distributed import TINY, _free_port, _weights_diff

    base, one, two = tmp_path / "base", tmp_path / "one", tmp_path / "two"
    base.mkdir()
    (base / "retdm.toml").write_text(TINY)
    runner = CliRunner()
    assert runner.invoke(app, ["-w", str(base), "ingest", "demo"]).exit_code == 0
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    sets = ["--set", "classifier.ema=0.5", "--set", "classifier.select=last"]
    result = runner.invoke(app, ["-w", str(one), "train", "--stage", "classifier", *sets])
    assert result.exit_code == 0, result.output
    env = {**os.environ, "RETDM_NO_PROGRESS": "1", "RETDM_DIST_TIMEOUT": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "retdmctl", "-w", str(two), "train", "--stage", "classifier", *sets]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_checkpoint(two / "classifier" / "checkpoint.pt")["config"]["classifier"]["ema"] == 0.5
    assert _weights_diff(one / "classifier" / "checkpoint.pt", two / "classifier" / "checkpoint.pt") < 1e-6
