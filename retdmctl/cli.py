"""The ``retdmctl`` command line: a thin layer over ``stages`` and ``retdmctl.pipeline``.

Every option that changes a result is saved into the workspace's ``retdm.toml``, so a
later ``retdmctl run`` runs with the same values. Errors a user can cause are
:class:`~retdmctl.errors.RetdmError`: caught once here, printed on one line, exit 1.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from retdmctl import __version__
from retdmctl.config import Config, parse_set
from retdmctl.errors import RetdmError
from retdmctl.workspace import Workspace

console = Console(highlight=False)


class _Group(TyperGroup):
    """Turns every RetdmError into ``error: <message>`` on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RetdmError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="RETDM multi-label image classification as a resumable pipeline:\n\n"
    "ingest -> knn -> train (classifier, metric, joint) -> eval.\n\n"
    "Example: retdmctl quickstart",
)
ingest_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Read a dataset in its native format into data/images.lmdb and data/dataset.h5.",
)
app.add_typer(ingest_app, name="ingest")


class StageName(str, Enum):
    classifier = "classifier"
    metric = "metric"
    joint = "joint"


# --- shared state and helpers ------------------------------------------------
class State:
    workdir: Path = Path("retdm-work")
    config: Path | None = None


STATE = State()


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
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"retdmctl {__version__}")
        raise typer.Exit()
    STATE.workdir, STATE.config = workdir, config


def _workspace() -> Workspace:
    return Workspace(STATE.workdir.resolve())


def _configure(overrides: dict[str, dict[str, Any]], sets: list[str] | None = None) -> tuple[Workspace, Config]:
    """Resolve the config (retdm.toml < --config < --set < flags) and save it back."""
    ws = _workspace()
    merged = parse_set(sets or [])
    for section, values in overrides.items():
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    cfg = ws.load_config(STATE.config, merged)
    ws.save_config(cfg)
    return ws, cfg


def _run_stages(ws: Workspace, cfg: Config, names: list[str], force: bool) -> None:
    from retdmctl.pipeline import Context, run_stage
    from stages import BY_NAME, PIPELINE

    ctx = Context(ws, cfg, console, force=force)
    for name in names:
        run_stage(ctx, BY_NAME[name], PIPELINE)
    if "eval" in names:
        _print_metrics(ws)


def _print_metrics(ws: Workspace) -> None:
    import json

    from stages.evaluate import metrics_table

    result = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    title = f"{result['checkpoint']} on the {result['split']} split ({result['images']} images)"
    console.print(metrics_table(result["metrics"], title))


Force = Annotated[bool, typer.Option("--force", help="Run even when up to date.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Any option as SECTION.KEY=VALUE (repeatable).")]


# --- ingest ------------------------------------------------------------------
def _ingest(source: str, path: str, images: str, opts: dict[str, Any], force: bool) -> None:
    ws, cfg = _configure({"ingest": {"source": source, "path": path, "images": images, **opts}})
    _run_stages(ws, cfg, ["ingest"], force)


def _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction=None) -> dict:
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "short_side": short_side,
        "keep_original": keep_original,
        "workers": workers,
        "strict": strict,
        "test_fraction": test_fraction,
    }


Seed = Annotated[Optional[int], typer.Option(help="Seed of the random splits.")]
ValFraction = Annotated[Optional[float], typer.Option(help="Fraction of train held out for validation.")]
ShortSide = Annotated[Optional[int], typer.Option(help="Re-encode images to this shorter side (px).")]
KeepOriginal = Annotated[
    Optional[bool], typer.Option("--keep-original/--reencode", help="Store the original bytes.")
]
Workers = Annotated[Optional[int], typer.Option(help="Encoding processes (0 = one per core).")]
Strict = Annotated[Optional[bool], typer.Option("--strict/--lenient", help="A bad image is an error, not a skip.")]


@ingest_app.command("demo")
def ingest_demo(
    images: Annotated[Optional[int], typer.Option("--images", help="Number of images.")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help="Number of classes (2-12).")] = None,
    seed: Seed = None,
    val_fraction: ValFraction = None,
    workers: Workers = None,
    force: Force = False,
) -> None:
    """Generate the built-in procedural demo set (seconds; no download).

    Example: retdmctl ingest demo --images 2000 --classes 10
    """
    opts = _split_opts(seed, val_fraction, None, None, workers, None)
    opts.update({"demo_images": images, "demo_classes": classes})
    _ingest("demo", "", "", opts, force)


@ingest_app.command("scene")
def ingest_scene(
    path: Annotated[Path, typer.Argument(help="The scene folder (labels.csv, images/).", exists=True, file_okay=False)],
    seed: Seed = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    force: Force = False,
) -> None:
    """Read the MIML natural-scene set with the reference 80/20 split.

    Example: retdmctl ingest scene ../shared/data/scene --seed 0
    """
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, 0.2)
    _ingest("scene", str(path.resolve()), "", opts, force)


@ingest_app.command("csv")
def ingest_csv(
    labels: Annotated[Path, typer.Argument(help="CSV lines: relative/path.jpg,label1|label2", exists=True, dir_okay=False)],
    images: Annotated[Path, typer.Option("--images", help="Folder the paths are relative to.", exists=True, file_okay=False)],
    seed: Seed = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Fraction of images for the test split.")] = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    force: Force = False,
) -> None:
    """Read your own images and a label CSV (random test split).

    Example: retdmctl ingest csv labels.csv --images photos/
    """
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction)
    _ingest("csv", str(labels.resolve()), str(images.resolve()), opts, force)


# --- knn / train / eval -------------------------------------------------------
@app.command()
def knn(
    k: Annotated[Optional[int], typer.Option("--k", help="Neighbouring label sets per label set (paper: 10).")] = None,
    force: Force = False,
) -> None:
    """Build the label-set kNN graph of the training split (knn.h5).

    Example: retdmctl knn --k 10
    """
    ws, cfg = _configure({"knn": {"k": k}})
    _run_stages(ws, cfg, ["knn"], force)


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
    ws, cfg = _configure(overrides, sets)
    _run_stages(ws, cfg, [name], force)


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
    ws, cfg = _configure(overrides)
    _run_stages(ws, cfg, ["eval"], force)


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
    ws, cfg = _configure({"model": {"frozen_backbone": frozen_backbone}}, sets)
    _run_stages(ws, cfg, names[: names.index(until) + 1] if until else names, force)
    console.print(f"pipeline finished in {time.perf_counter() - started:.1f}s")


@app.command()
def status() -> None:
    """Show each stage as done, stale or missing, and why.

    Example: retdmctl status
    """
    from retdmctl.pipeline import producer_of
    from retdmctl.pipeline import status as stage_status
    from stages import PIPELINE

    ws = _workspace()
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
        "model": {"backbone": "efficientnet_lite0", "frozen_backbone": True},
    }
    ws, cfg = _configure(overrides)
    from stages import PIPELINE

    _run_stages(ws, cfg, [s.name for s in PIPELINE], force)
    console.print(f"quickstart finished in {time.perf_counter() - started:.1f}s; report: {ws.stage_dir('eval') / 'report.html'}")


def entry() -> None:
    app()
