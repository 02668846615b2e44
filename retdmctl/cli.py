"""The ``retdmctl`` command line: a thin layer over ``stages`` and ``retdmctl.pipeline``.

Every option that changes a result is saved into the workspace's ``retdm.toml``, so a
later ``retdmctl run`` runs with the same values. Errors a user can cause are
:class:`~retdmctl.errors.RetdmError`: caught once here, printed on one line, exit 1.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from retdmctl import __version__
from retdmctl.cli_ingest import ingest_app
from retdmctl.cli_support import (
    STATE,
    ErrorCatchingGroup,
    Force,
    Sets,
    configure,
    console,
    run_stages,
    workspace,
)
from retdmctl.errors import RetdmError

app = typer.Typer(
    cls=ErrorCatchingGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="RETDM multi-label image classification as a resumable pipeline:\n\n"
    "ingest -> knn -> train (classifier, metric, joint) -> eval.\n\n"
    "Example: retdmctl quickstart",
)
app.add_typer(ingest_app, name="ingest")


class StageName(str, Enum):
    classifier = "classifier"
    metric = "metric"
    joint = "joint"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retdmctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    workdir: Annotated[
        Path,
        typer.Option("--workdir", "-w", envvar="RETDM_WORKDIR", help="Where artifacts live.", file_okay=False),
    ] = Path("retdm-work"),
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="A TOML config file; flags override it.", exists=True, dir_okay=False),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    STATE.workdir, STATE.config = workdir, config


# --- knn / train / eval -------------------------------------------------------
@app.command()
def knn(
    k: Annotated[Optional[int], typer.Option("--k", help="Neighbouring label sets per label set (paper: 10).")] = None,
    index: Annotated[
        Optional[str], typer.Option("--index", help="exact, ivf, hnsw or auto (exact below 50,000 label sets).")
    ] = None,
    force: Force = False,
) -> None:
    """Build the label-set kNN graph of the training split (knn.h5).

    Example: retdmctl knn --k 10
    """
    ws, cfg = configure({"knn": {"k": k, "index": index}})
    run_stages(ws, cfg, ["knn"], force)


@app.command()
def train(
    stage: Annotated[StageName, typer.Option("--stage", help="classifier, metric or joint.")],
    backbone: Annotated[Optional[str], typer.Option(help="efficientnet_lite0, resnet50, vgg16, tiny_cnn.")] = None,
    frozen_backbone: Annotated[
        Optional[bool],
        typer.Option("--frozen-backbone/--finetune-backbone", help="Train from cached backbone features (CPU-friendly)."),
    ] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights.")] = None,
    weights_file: Annotated[
        Optional[Path], typer.Option(help="Backbone weights file (torch state dict).", exists=True, dir_okay=False)
    ] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input side in px.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of this stage.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of this stage.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Weight of the metric loss.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Weight of the reconstruction loss.")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Weight of way 2 (0 = one-way).")] = None,
    margin: Annotated[Optional[float], typer.Option(help="Hinge margin m.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    sets: Sets = None,
    force: Force = False,
) -> None:
    """Train one stage: classifier (L_cls), metric (psi and W_r on cached features) or
    joint (everything with L = L_cls + alpha L_metric + beta L_rec).

    Example: retdmctl train --stage classifier --frozen-backbone --epochs 20
    """
    name = stage.value
    overrides = {
        "model": {
            "backbone": backbone,
            "frozen_backbone": frozen_backbone,
            "pretrained": pretrained,
            "weights_file": str(weights_file.resolve()) if weights_file else None,
            "image_size": image_size,
            "batch_size": batch_size,
        },
        "loss": {"alpha": alpha, "beta": beta, "lam": lam, "margin": margin},
        name: {"epochs": epochs, "lr": lr},
        "runtime": {"device": device},
    }
    ws, cfg = configure(overrides, sets)
    run_stages(ws, cfg, [name], force)


class ReportKind(str, Enum):
    html = "html"
    none = "none"


@app.command("eval")
def eval_(
    checkpoint: Annotated[Optional[StageName], typer.Option(help="Evaluate the classifier or joint model.")] = None,
    split: Annotated[Optional[str], typer.Option(help="train, val or test.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Score threshold for the thresholded metrics.")] = None,
    report: Annotated[Optional[ReportKind], typer.Option(help="Write eval/report.html (html) or not (none).")] = None,
    force: Force = False,
) -> None:
    """Score the test split, write scores.h5, metrics.json and report.html.

    Example: retdmctl eval --report html
    """
    overrides = {
        "eval": {
            "checkpoint": checkpoint.value if checkpoint else None,
            "split": split,
            "threshold": threshold,
            "report": report.value if report else None,
        }
    }
    ws, cfg = configure(overrides)
    run_stages(ws, cfg, ["eval"], force)


# --- whole pipeline -------------------------------------------------------------
@app.command()
def run(
    frozen_backbone: Annotated[
        Optional[bool],
        typer.Option("--frozen-backbone/--finetune-backbone", help="Train from cached backbone features (CPU-friendly)."),
    ] = None,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage.")] = None,
    sets: Sets = None,
    force: Force = False,
) -> None:
    """Run every stage in order, skipping those already up to date.

    Example: retdmctl run --frozen-backbone --set knn.k=5
    """
    from stages import PIPELINE

    names = [s.name for s in PIPELINE]
    if until is not None and until not in names:
        raise RetdmError(f"--until must be one of {', '.join(names)}, got {until!r}")
    started = time.perf_counter()
    ws, cfg = configure({"model": {"frozen_backbone": frozen_backbone}}, sets)
    run_stages(ws, cfg, names[: names.index(until) + 1] if until else names, force)
    console.print(f"pipeline finished in {time.perf_counter() - started:.1f}s")


@app.command()
def status() -> None:
    """Show each stage as done, stale or missing, and why.

    Example: retdmctl status
    """
    from retdmctl.pipeline import producer_of
    from retdmctl.pipeline import status as stage_status
    from stages import PIPELINE

    ws = workspace()
    cfg = ws.load_config(STATE.config)
    table = Table(title=f"retdmctl status ({ws.root})")
    for col in ("stage", "state", "reason", "command"):
        table.add_column(col)
    states: dict[str, str] = {}
    for stage in PIPELINE:
        st = stage_status(ws, cfg, stage)
        state, reason = st.state, st.reason
        upstream = [p.name for p in (producer_of(i, ws, cfg, PIPELINE) for i in stage.inputs(ws, cfg)) if p]
        behind = [u for u in dict.fromkeys(upstream) if states.get(u) != "done"]
        if state == "done" and behind:
            state, reason = "stale", f"upstream {', '.join(behind)} not up to date"
        states[stage.name] = state
        color = {"done": "green", "stale": "yellow", "missing": "red"}[state]
        table.add_row(stage.name, f"[{color}]{state}[/]", reason, stage.command)
    console.print(table)


@app.command()
def quickstart(
    images: Annotated[int, typer.Option(help="Demo images.")] = 2000,
    force: Force = False,
) -> None:
    """Every stage on the built-in demo set (frozen EfficientNet-Lite0 on the CPU), then
    the metrics table. Takes a few minutes on a laptop.

    Example: retdmctl quickstart
    """
    started = time.perf_counter()
    overrides = {
        "ingest": {"source": "demo", "path": "", "images": "", "demo_images": images},
        # The demo images are 96-128 px: 128 px input keeps every pixel and costs a third
        # of 224 px.
        "model": {"backbone": "efficientnet_lite0", "frozen_backbone": True, "image_size": 128},
    }
    ws, cfg = configure(overrides)
    from stages import PIPELINE

    run_stages(ws, cfg, [s.name for s in PIPELINE], force)
    console.print(f"quickstart finished in {time.perf_counter() - started:.1f}s; report: {ws.stage_dir('eval') / 'report.html'}")


def entry() -> None:
    app()
