"""The Python API (retdmctl.Workspace, retdmctl.load_predictor): docs/api.md runs as
written, and each method does what its CLI command does, errors raised (not printed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retdmctl
from retdmctl.errors import ConfigError, InputError, RetdmError, StageNotReadyError, WorkspaceBusyError
from tests.conftest import TINY_TOML, invoke

ROOT = Path(__file__).resolve().parents[1]

# The tiny set-up, fine-tuned (a frozen, random tiny CNN cannot be rebuilt to predict).
TINY_SECTIONS = {
    "model": {"backbone": "tiny_cnn", "pretrained": False, "frozen_backbone": False, "image_size": 32, "batch_size": 16},
    "runtime": {"workers": 0, "device": "cpu"},
}
TINY_OVERRIDES = {"classifier.epochs": 2, "metric.epochs": 1, "joint.epochs": 1, "knn.k": 4, "decision.folds": 0}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_the_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"^eval +done ", out, flags=re.M), out
    assert re.search(r"^test mAP 0\.\d{3}, C-F1 \d\.\d{3}$", out, flags=re.M)
    assert re.search(r"^a\.png \[.*'circle'.*\]$", out, flags=re.M), out  # a circle and a triangle
    assert "refused: knn.k must be >= 1, got 0\n" in out
    saved = tomllib.loads((tmp_path / "demo-work" / "retdm.toml").read_text())
    assert saved["model"]["image_size"] == 128 and saved["knn"]["k"] == 10  # the refused run saved nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> retdmctl.Workspace:
    ws = retdmctl.Workspace(tmp_path_factory.mktemp("api") / "work")
    ws.ingest("demo", images=60, classes=5, workers=1)
    ws.run(overrides=TINY_OVERRIDES, **TINY_SECTIONS)
    return ws


def test_run_saves_its_settings_and_every_stage_is_done(tiny):
    assert list(tiny.status()) == ["ingest", "knn", "classifier", "metric", "joint", "eval"]
    assert {st["state"] for st in tiny.status().values()} == {"done"}
    assert tiny.status()["classifier"]["command"] == "retdmctl train --stage classifier"
    saved = tomllib.loads((tiny.root / "retdm.toml").read_text())
    assert saved["model"]["backbone"] == "tiny_cnn" and saved["knn"]["k"] == 4 and saved["ingest"]["demo_images"] == 60
    assert tiny.config().classifier.epochs == 2


def test_status_and_metrics_match_the_cli(tiny):
    result = invoke("-w", tiny.root, "status", terminal_width=200)
    assert result.exit_code == 0, result.output
    for stage, st in tiny.status().items():
        assert re.search(rf"{stage} +│ done ", result.output), result.output
    evaluation = tiny.evaluation()
    assert evaluation["split"] == "test" and evaluation["checkpoint"] == "joint/checkpoint.pt"
    assert set(tiny.metrics()) >= {"mAP", "C-F1", "O-F1", "one_error"}
    assert 0.0 <= tiny.metrics()["mAP"] <= 1.0


def test_a_second_run_skips_everything(tiny):
    before = {s: (tiny.root / ".retdm" / "manifests" / f"{s}.json").read_text() for s in tiny.status()}
    tiny.run()
    assert before == {s: (tiny.root / ".retdm" / "manifests" / f"{s}.json").read_text() for s in tiny.status()}


def test_evaluate_returns_the_metrics_and_leaves_retdm_toml_alone(tiny):
    toml = (tiny.root / "retdm.toml").read_text()
    metrics = tiny.evaluate("classifier", "val")
    assert tiny.evaluation()["split"] == "val" and tiny.evaluation()["checkpoint"] == "classifier/checkpoint.pt"
    assert metrics == tiny.metrics()
    assert (tiny.root / "retdm.toml").read_text() == toml
    tiny.evaluate()  # back to what the config says: joint on test
    assert tiny.evaluation()["split"] == "test" and tiny.status()["eval"]["state"] == "done"


def test_predict_takes_files_and_pil_images_alike(tiny, tmp_path):
    from retdmctl.data.readers.demo import DemoImage

    images = [DemoImage(i, seed=7, classes=(0, 1)).render() for i in range(2)]
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        img.save(files[-1])
    predictor = retdmctl.load_predictor(tiny, device="cpu")
    assert predictor.stage == "joint" and len(predictor.class_names) == 5
    from_files = predictor.predict(files)
    assert from_files.shape == (2, 5) and ((from_files >= 0) & (from_files <= 1)).all()
    np.testing.assert_allclose(predictor.predict([Image.open(f) for f in files]), from_files, atol=1e-6)
    np.testing.assert_allclose(predictor.predict([str(files[0])]), from_files[:1], atol=1e-6)
    gray = Image.open(files[0]).convert("L")  # converted to RGB, as the CLI does
    assert predictor.predict([gray]).shape == (1, 5)
    classifier = tiny.predictor("classifier", device="cpu")
    assert classifier.stage == "classifier"
    with pytest.raises(RetdmError) as err:
        predictor.predict([tmp_path / "missing.png"])
    assert str(err.value) == f"{tmp_path / 'missing.png'}: no such image file"


def test_a_run_another_process_holds_the_lock_for_is_refused(tiny):
    from retdmctl.lock import workspace_lock

    with workspace_lock(tiny.root, command="retdmctl run"):
        with pytest.raises(WorkspaceBusyError) as err:
            tiny.run(force=True)
    assert str(err.value) == f"workspace {tiny.root} is in use by pid {os.getpid()} (retdmctl run)"


def test_a_rejected_run_leaves_retdm_toml_as_it_was(tiny):
    toml = (tiny.root / "retdm.toml").read_text()
    with pytest.raises(ConfigError) as err:
        tiny.run(loss={"alpha": -1})
    assert str(err.value) == "loss.alpha must be >= 0, got -1.0"
    with pytest.raises(ConfigError) as err:
        tiny.run(overrides={"model.nope": 1})
    assert str(err.value).startswith("overrides: unknown option model.nope; known: backbone, ")
    assert (tiny.root / "retdm.toml").read_text() == toml


def test_bad_arguments_raise_one_clear_error(tmp_path):
    ws = retdmctl.Workspace(tmp_path / "w")
    cases = [
        (lambda: ws.status(), RetdmError, f"workspace {tmp_path / 'w'} does not exist: run `retdmctl ingest <format> PATH` first"),
        (lambda: ws.metrics(), RetdmError, f"workspace {tmp_path / 'w'} does not exist: run `retdmctl ingest <format> PATH` first"),
        (lambda: ws.ingest("imagenet", "x"), InputError, "unknown dataset format 'imagenet'; known: demo, scene, csv, coco, voc, mirflickr, nuswide"),
        (lambda: ws.ingest("csv", tmp_path / "nope.csv", images=tmp_path), InputError, f"{tmp_path / 'nope.csv'} does not exist"),
        (lambda: ws.ingest("demo", "somewhere"), InputError, "the demo set is generated: give no path (images=N sets its size)"),
        (lambda: ws.ingest("demo", colour="red"), ConfigError, None),
        (lambda: ws.ingest("demo", images=3), ConfigError, "ingest.demo_images must be >= 10, got 3"),
        (lambda: ws.train("stage2"), ConfigError, "stage must be one of classifier, metric, joint, got 'stage2'"),
        (lambda: ws.run(until="report"), ConfigError, "until must be one of ingest, knn, classifier, metric, joint, eval, got 'report'"),
        (lambda: ws.config(overrides={"knn": 3}), ConfigError, "override 'knn': expected 'section.key', e.g. 'knn.k'"),
        (lambda: ws.config(knn=3), ConfigError, "knn=3: expected a dict of that section's options, e.g. knn={...}"),
        (lambda: retdmctl.Workspace(tmp_path, config_file=tmp_path / "x.toml"), ConfigError, f"{tmp_path / 'x.toml'}: config file not found"),
        (lambda: retdmctl.load_predictor(tmp_path / "none"), RetdmError, f"{tmp_path / 'none'} is neither a workdir nor a checkpoint file"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind) as err:
            call()
        if message is not None:
            assert str(err.value) == message
    assert str(err.value)  # every case raised
    with pytest.raises(ConfigError, match=r"^unknown ingest option 'colour'; known: .*\bclasses\b"):
        ws.ingest("demo", colour="red")


def test_metrics_before_eval_names_the_command(tmp_path):
    ws = retdmctl.Workspace(tmp_path / "w")
    (tmp_path / "w").mkdir()
    with pytest.raises(StageNotReadyError) as err:
        ws.metrics()
    assert str(err.value) == f"no metrics in {tmp_path / 'w'}: run `retdmctl eval` (or Workspace.evaluate()) first"


def test_config_takes_dotted_names_sections_and_a_config_file(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "retdm.toml").write_text(TINY_TOML)
    (tmp_path / "extra.toml").write_text("[knn]\nk = 7\n")
    ws = retdmctl.Workspace(tmp_path / "w", config_file=tmp_path / "extra.toml")
    assert ws.config().knn.k == 7 and ws.config().model.backbone == "tiny_cnn"
    cfg = ws.config(overrides={"knn.k": 3, "loss.alpha": "0.5"}, model={"image_size": 48})
    assert (cfg.knn.k, cfg.loss.alpha, cfg.model.image_size) == (3, 0.5, 48)
    assert ws.config(overrides=["knn.k=2"]).knn.k == 2  # --set's form


def test_ingest_resets_the_settings_of_another_dataset(tmp_path):
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    ws = retdmctl.Workspace(tmp_path / "w", console=Console(file=out, width=300))
    ws.ingest("demo", images=20, classes=3, workers=1)
    (tmp_path / "imgs").mkdir()
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{'a' if i % 2 else 'b'}\n" for i in range(12)))
    ws.ingest("csv", tmp_path / "labels.csv", images=tmp_path / "imgs", workers=1, short_side=0)
    assert "note: another dataset: ingest.workers reset" not in out.getvalue()  # given again
    assert "ingest.demo_images reset from 20 to 2000" in out.getvalue()
    assert ws.config().ingest.source == "csv" and ws.status()["ingest"]["state"] == "done"


def test_the_package_exports_the_api_lazily():
    assert retdmctl.Workspace is __import__("retdmctl.api").api.Workspace
    assert retdmctl.load_predictor.__module__ == "retdmctl.api"
    code = "import sys, retdmctl; assert 'retdmctl.api' not in sys.modules and 'torch' not in sys.modules; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout == "ok\n", done.stderr
    with pytest.raises(AttributeError, match="module 'retdmctl' has no attribute 'nothing'"):
        retdmctl.nothing  # noqa: B018


def test_the_scene_bench_drives_the_api(tmp_path):
    """bench/scene.py's variant runner, on the tiny set-up: through Workspace.train and
    Workspace.evaluate, retdm.toml never written (every variant brings its own config)."""
    from bench.scene import run_variant
    from tests.conftest import tiny_config

    base = tiny_config(frozen=True)
    ws = retdmctl.Workspace(tmp_path / "bench")
    result = run_variant(ws, base, "bce")
    assert 0.0 <= result["val_mAP"] <= 1.0 and set(result["test"]) == {"per_class", "global", "fixed"}
    assert ws.evaluation()["split"] == "test" and ws.layout.read_manifest("classifier") is not None
    assert not (ws.root / "retdm.toml").exists()
