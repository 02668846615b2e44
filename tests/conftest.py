"""What many test files share: the real-data guard, the in-process CLI (``invoke``), the
tiny TOML config and the tiny Config, and running stages on them.

The tiny set-ups train a tiny CNN on the generated demo set in seconds:
- :data:`TINY_TOML`: a ``retdm.toml`` for the CLI (frozen tiny CNN, 60 images, 5 classes);
  :func:`tiny_pipeline` writes it (or a variant) into a workspace, ingests the demo set
  and runs the whole pipeline there (module-scoped fixtures build on it).
- :func:`tiny_config`: a tiny CNN (fine-tuned, or frozen) on 80 demo images as a Config,
  for running stages in-process
  with :func:`run_stages` / :func:`run_all`; :func:`trained_workspace` saves the config
  and runs the stages (ingest + classifier by default).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("RETDM_NO_PROGRESS", "1")
# The shared backbone cache of this test session: never the user's ~/.cache/retdmctl.
# Set at import, so subprocesses (torchrun) inherit it; removed when the session ends.
# This module is imported twice (as pytest's conftest and as tests.conftest): one folder.
if os.environ.get("RETDM_TEST_CACHE_PID") != str(os.getpid()):
    os.environ["RETDM_CACHE_DIR"] = tempfile.mkdtemp(prefix="retdm-test-cache-")
    os.environ["RETDM_TEST_CACHE_PID"] = str(os.getpid())
TEST_CACHE = Path(os.environ["RETDM_CACHE_DIR"])


@pytest.fixture(scope="session", autouse=True)
def _session_cache():
    yield TEST_CACHE
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache directory of this test's own (for tests that count its files)."""
    path = tmp_path / "retdm-cache"
    monkeypatch.setenv("RETDM_CACHE_DIR", str(path))
    return path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


# --- the CLI, in-process -----------------------------------------------------------------

runner = CliRunner()


def invoke(*args: str | Path, **kwargs):
    """``retdmctl *args`` through Typer's CliRunner (paths given as they are); its result.
    ``kwargs`` go to ``CliRunner.invoke`` (``terminal_width=...``)."""
    from retdmctl.cli import app

    return runner.invoke(app, [str(a) for a in args], **kwargs)


# --- the tiny pipeline through the CLI ---------------------------------------------------

TINY_TOML = """
[decision]
folds = 0
[ingest]
demo_images = 60
demo_classes = 5
workers = 1
[model]
backbone = "tiny_cnn"
pretrained = false
frozen_backbone = true
tune_blocks = 0
views = 1
image_size = 32
batch_size = 16
[runtime]
workers = 0
device = "cpu"
[classifier]
epochs = 2
[metric]
epochs = 1
[joint]
epochs = 1
"""


def tiny_pipeline(root: Path, toml: str = TINY_TOML) -> Path:
    """``root`` with ``toml`` as its retdm.toml, the demo set ingested and ``retdmctl run``
    finished; returns ``root``."""
    (root / "retdm.toml").write_text(toml)
    assert invoke("--workdir", root, "ingest", "demo").exit_code == 0
    result = invoke("--workdir", root, "run")
    assert result.exit_code == 0, result.output
    return root


# --- the tiny model in-process -----------------------------------------------------------


def tiny_config(frozen: bool = False):
    """A Config for a tiny CNN on 80 generated demo images (6 classes), CPU, 3/2/2 epochs."""
    from retdmctl.config import Config

    cfg = Config()
    cfg.ingest.source, cfg.ingest.demo_images, cfg.ingest.demo_classes, cfg.ingest.workers = "demo", 80, 6, 1
    cfg.knn.k = 4
    m = cfg.model
    m.backbone, m.pretrained, m.frozen_backbone, m.image_size, m.batch_size = "tiny_cnn", False, frozen, 32, 16
    m.tune_blocks, m.views = 0, 1  # pooled features when frozen (the tuned default has tests of its own)
    cfg.runtime.workers, cfg.runtime.device = 0, "cpu"
    cfg.classifier.epochs, cfg.metric.epochs, cfg.joint.epochs = 3, 2, 2
    cfg.decision.folds = 0  # choices on validation alone: fold copies have tests of their own (test_folds.py)
    return cfg


def run_stages(ws, cfg, *names: str, force: bool = False, out: io.StringIO | None = None) -> dict[str, bool]:
    """Run the named stages in order in one Context (console to ``out``, or nowhere);
    whether each ran."""
    from rich.console import Console

    from retdmctl.pipeline import Context, run_stage
    from stages import BY_NAME, PIPELINE

    ctx = Context(ws, cfg, Console(file=out or io.StringIO()), force=force)
    return {name: run_stage(ctx, BY_NAME[name], PIPELINE) for name in names}


def run_all(ws, cfg, force: bool = False) -> dict[str, bool]:
    """Every stage of the pipeline, in order; whether each ran."""
    from stages import PIPELINE

    return run_stages(ws, cfg, *(s.name for s in PIPELINE), force=force)


def trained_workspace(root: Path, cfg, *names: str):
    """A workspace at ``root`` with ``cfg`` saved as its config and the named stages run
    (ingest + classifier: a trained checkpoint in a few seconds)."""
    from retdmctl.workspace import Workspace

    ws = Workspace(root)
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.save_config(cfg)
    run_stages(ws, cfg, *(names or ("ingest", "classifier")))
    return ws
