"""The ``retdmctl`` command line: a thin layer over ``stages`` and ``retdmctl.pipeline``.

Every option that changes a result is saved into the workspace's ``retdm.toml``, so a
later ``retdmctl run`` runs with the same values. Errors a user can cause are
:class:`~retdmctl.errors.RetdmError`: caught once here, printed on one line, exit 1.
"""

from __future__ import annotations

import json
import os
import sys

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from retdmctl import __version__
from retdmctl.allocator import tune_allocator
from retdmctl.cli_ingest import ingest_app
from retdmctl.cli_support import (
    STATE,
    ConfigFile,
    ErrorCatchingGroup,
    Force,
    Sets,
    Workdir,
    choice_enum,
    console,
    option,
    read_workspace,
    resolve,
    run_stages,
    set_config,
    set_workdir,
    workspace,
)
from retdmctl.config import TRAINED_STAGES
from retdmctl.errors import RetdmError
from retdmctl.models.backbones import BACKBONES

app = typer.Typer(
    cls=ErrorCatchingGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="RETDM multi-label image classification as a resumable pipeline:\n\n"
    "ingest -> knn -> train (classifier, metric, joint) -> eval.\n\n"
    "Example: retdmctl quickstart\n\n"
    "Exit codes: 0 done; 1 error; 2 usage error (bad option, value, argument or --set); "
    "3 predict skipped some inputs; 130 interrupted (docs/cli.md).",
)
app.add_typer(ingest_app, name="ingest")


# The choices of the options below are the config's (retdmctl.config.CHOICES).
StageName = choice_enum("StageName", TRAINED_STAGES)
EvalCheckpoint = choice_enum("EvalCheckpoint", "eval.checkpoint")
Split = choice_enum("Split", "eval.split")
KnnIndex = choice_enum("KnnIndex", "knn.index")
Device = choice_enum("Device", "runtime.device")
LabelProtocol = choice_enum("LabelProtocol", "labels.protocol")
ReportKind = choice_enum("ReportKind", "eval.report")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retdmctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    workdir: Annotated[
        Path,
        typer.Option("--workdir", "-w", envvar="RETDM_WORKDIR", metavar="DIR", help="Where artifacts live.", file_okay=False),
    ] = Path("retdm-work"),
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", metavar="FILE", help="A TOML config file; flags override it.", exists=True, dir_okay=False),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    from stages.ingest import forget_parsed

    tune_allocator()
    forget_parsed()  # each command reads the dataset's labels afresh
    STATE.workdir, STATE.config = workdir, config
    source = ctx.get_parameter_source("workdir")
    STATE.workdir_given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
    STATE.workdir_from_env = source is not None and source.name == "ENVIRONMENT"


# --- knn / train / eval -------------------------------------------------------
@app.command()
def knn(
    k: Annotated[Optional[int], option("--k", metavar="N", default="knn.k", help="Neighbouring label sets per label set (paper: 10).")] = None,
    index: Annotated[
        Optional[KnnIndex], option("--index", default="knn.index", help="Search: exact, approximate (ivf, hnsw), or auto (exact below 50,000 label sets).")
    ] = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Build the label-set kNN graph of the training split (knn.h5).

    Example: retdmctl knn --k 10
    """
    set_workdir(workdir)
    set_config(config)
    cfg = resolve({"knn": {"k": k, "index": index.value if index else None}}, sets)
    run_stages(cfg, ["knn"], force)


_BACKBONE_NAMES = ", ".join(BACKBONES)
TUNE_BLOCKS = option(metavar="N", default="model.tune_blocks",
                     help="With --frozen-backbone: also train the backbone's last N blocks and head, on cached activations of the rest "
                          "(0 = none; -1 = auto: 1 with --frozen-backbone, the best CPU variant of docs/bench-scene-views.md).")
VIEWS = option(metavar="V", default="model.views",
               help="With --frozen-backbone: cache V views of each image (1 = centre crop, up to 10 = five crops and their flips); "
                    "training draws one per epoch (0 = auto: 10 with --frozen-backbone).")


@app.command()
def train(
    stage: Annotated[StageName, typer.Option("--stage", help="The stage to train; the stages it reads from run first when they are not up to date.")],
    backbone: Annotated[Optional[str], option(metavar="NAME", default="model.backbone", help=f"Image backbone: {_BACKBONE_NAMES}, or timm:NAME (any timm model; weights from --weights-file or the local Hugging Face cache, never downloaded).")] = None,
    frozen_backbone: Annotated[
        Optional[bool],
        option("--frozen-backbone/--finetune-backbone", default="model.frozen_backbone",
               help="Train from cached backbone features (CPU-friendly), or fine-tune the CNN."),
    ] = None,
    pretrained: Annotated[Optional[bool], option("--pretrained/--no-pretrained", default="model.pretrained", help="Start from ImageNet weights.")] = None,
    weights_file: Annotated[
        Optional[Path], option(metavar="FILE", help="Backbone weights file (a torch state dict or .safetensors); its content is part of the fingerprint.", exists=True, dir_okay=False)
    ] = None,
    image_size: Annotated[Optional[int], option(metavar="PX", default="model.image_size", help="Input side in px.")] = None,
    batch_size: Annotated[Optional[int], option(metavar="N", default="model.batch_size", help="Images per batch.")] = None,
    tune_blocks: Annotated[Optional[int], TUNE_BLOCKS] = None,
    views: Annotated[Optional[int], VIEWS] = None,
    epochs: Annotated[Optional[int], option(metavar="N", help="Epochs of this stage.  [default: 20 (joint: 10), or STAGE.epochs in retdm.toml]")] = None,
    lr: Annotated[Optional[float], option(metavar="LR", help="Learning rate of this stage.  [default: classifier 0.1, metric 0.01, joint 0.001, or STAGE.lr in retdm.toml]")] = None,
    alpha: Annotated[Optional[float], option(metavar="W", default="loss.alpha", help="Weight of the metric loss (>= 0).")] = None,
    beta: Annotated[Optional[float], option(metavar="W", default="loss.beta", help="Weight of the reconstruction loss (>= 0).")] = None,
    lam: Annotated[Optional[float], option("--lambda", metavar="W", default="loss.lam", help="Weight of way 2 (>= 0; 0 = one-way).")] = None,
    margin: Annotated[Optional[float], option(metavar="M", default="loss.margin", help="Hinge margin m (>= 0).")] = None,
    labels: Annotated[
        Optional[LabelProtocol],
        option("--labels", default="labels.protocol",
               help="Which training labels the models see: full, keep (--labels-fraction of each image's positives), single (one positive per image), hide (--labels-fraction of all entries hidden). Val and test keep every label."),
    ] = None,
    labels_fraction: Annotated[Optional[float], option(metavar="P", default="labels.fraction", help="keep: fraction of positives kept; hide: fraction of entries hidden (in (0, 1]).")] = None,
    clml: Annotated[Optional[float], option(metavar="W", default="loss.clml", help="Weight of the CLML label-structure term (classifier and joint stages; 0 = off).")] = None,
    clml_every: Annotated[Optional[int], option(metavar="K", default="loss.clml_every", help="Run the CLML term on every K-th step at K times its weight (lazy regularisation; 1 = every step).")] = None,
    device: Annotated[Optional[Device], option(default="runtime.device", help="Where to train.")] = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Train one stage: classifier (L_cls), metric (psi and W_r on cached features) or
    joint (everything with L = L_cls + alpha L_metric + beta L_rec).

    Example: retdmctl train --stage classifier --frozen-backbone --epochs 20
    """
    set_workdir(workdir)
    set_config(config)
    name = stage.value
    overrides = {
        "model": {
            "backbone": backbone,
            "frozen_backbone": frozen_backbone,
            "pretrained": pretrained,
            "weights_file": str(weights_file.resolve()) if weights_file else None,
            "image_size": image_size,
            "batch_size": batch_size,
            "tune_blocks": tune_blocks,
            "views": views,
        },
        "loss": {"alpha": alpha, "beta": beta, "lam": lam, "margin": margin, "clml": clml, "clml_every": clml_every},
        "labels": {"protocol": labels.value if labels else None, "fraction": labels_fraction},
        name: {"epochs": epochs, "lr": lr},
        "runtime": {"device": device.value if device else None},
    }
    cfg = resolve(overrides, sets)
    run_stages(cfg, [name], force)


@app.command("eval")
def eval_(
    checkpoint: Annotated[Optional[EvalCheckpoint], option(default="eval.checkpoint", help="The model to evaluate.")] = None,
    split: Annotated[Optional[Split], option(default="eval.split", help="The split to score.")] = None,
    threshold: Annotated[
        Optional[float], option(metavar="T", help="One score threshold in (0, 1) for every class, instead of the thresholds chosen on validation.")
    ] = None,
    report: Annotated[Optional[ReportKind], option(default="eval.report", help="Write eval/report.html or not.")] = None,
    fusion: Annotated[
        Optional[bool],
        option("--fusion/--no-fusion", default="eval.fusion",
               help="Fuse the scores with the vote of the nearest training images, as chosen on validation "
                    "when the model was trained (--no-fusion: the classifier's scores alone)."),
    ] = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Score a split with a trained model; write scores.h5, metrics.json and report.html.

    The options here (--set included) are for this evaluation only: they are not saved
    to retdm.toml, so a later `retdmctl run` still evaluates what the config says.

    Example: retdmctl eval --checkpoint classifier --split val
    """
    set_workdir(workdir)
    set_config(config)
    overrides = {
        "eval": {
            "checkpoint": checkpoint.value if checkpoint else None,
            "split": split.value if split else None,
            "threshold": threshold,
            "thresholds": "fixed" if threshold is not None else None,
            "report": report.value if report else None,
            "fusion": fusion,
        }
    }
    cfg = resolve(overrides, sets)
    run_stages(cfg, ["eval"], force, persist=False)


# --- whole pipeline -------------------------------------------------------------
class Until(str, Enum):
    ingest = "ingest"
    knn = "knn"
    classifier = "classifier"
    metric = "metric"
    joint = "joint"
    eval = "eval"


@app.command()
def run(
    frozen_backbone: Annotated[
        Optional[bool],
        option("--frozen-backbone/--finetune-backbone", default="model.frozen_backbone",
               help="Train from cached backbone features (CPU-friendly), or fine-tune the CNN."),
    ] = None,
    tune_blocks: Annotated[Optional[int], TUNE_BLOCKS] = None,
    views: Annotated[Optional[int], VIEWS] = None,
    until: Annotated[Optional[Until], typer.Option(help="Stop after this stage.  [default: eval]", show_default=False)] = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Run every stage in order, skipping those already up to date.

    Example: retdmctl run --frozen-backbone --set knn.k=5
    """
    from stages import PIPELINE

    set_workdir(workdir)
    set_config(config)
    names = [s.name for s in PIPELINE]
    started = time.perf_counter()
    cfg = resolve({"model": {"frozen_backbone": frozen_backbone, "tune_blocks": tune_blocks, "views": views}}, sets)
    run_stages(cfg, names[: names.index(until.value) + 1] if until else names, force)
    console.print(f"pipeline finished in {time.perf_counter() - started:.1f}s")


@app.command()
def status(
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print JSON instead of the table: the workspace, each stage's name, state, reason "
                                    "and command, and the labels line (null when every label is read); see docs/cli.md."),
    ] = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Show each stage as done, stale or missing, and why. Reads only: works while
    another command is writing the workspace.

    Example: retdmctl status --json
    """
    from retdmctl.api import Workspace as ApiWorkspace

    set_workdir(workdir)
    set_config(config)
    ws = read_workspace()
    cfg = ws.load_config(STATE.config)
    states = ApiWorkspace(ws.root, config_file=STATE.config).status()  # pipeline.status, the one definition
    line = _labels_line(ws, cfg)
    if as_json:
        stages = [{"name": name, **st} for name, st in states.items()]
        typer.echo(json.dumps({"workspace": str(ws.root), "stages": stages, "labels": line}, indent=2))
        return
    table = Table(title=escape(f"retdmctl status ({ws.root})"))
    for col in ("stage", "state", "reason", "command"):
        table.add_column(col)
    for name, st in states.items():
        color = {"done": "green", "stale": "yellow", "missing": "red"}[st["state"]]
        table.add_row(name, f"[{color}]{st['state']}[/]", escape(st["reason"]), st["command"])
    console.print(table)
    if line is not None:
        console.print(escape(line))


class CompareFormat(str, Enum):
    table = "table"
    json = "json"
    md = "md"


@app.command()
def compare(
    workdirs: Annotated[list[Path], typer.Argument(metavar="WORKDIR", show_default=False,
                                                   help="The workspaces to compare, each evaluated.")],
    format: Annotated[Optional[CompareFormat], typer.Option(
        "--format", metavar="table|json|md", show_default=False,
        help="A table on the terminal (the default), JSON or Markdown.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE", dir_okay=False,
        help="Write to FILE instead of printing: JSON for a FILE ending in .json, else Markdown, unless --format says.")] = None,
) -> None:
    """Show runs side by side: each workspace's eval metrics and the config keys whose
    values differ between them. Reads only.

    Example: retdmctl compare retdm-work retdm-views1 --format md -o compare.md
    """
    from retdmctl.compare import compare as compare_runs
    from retdmctl.compare import to_json, to_markdown, to_table

    if format in (None, CompareFormat.table) and output is not None:
        format = CompareFormat.json if output.suffix.lower() == ".json" else CompareFormat.md
    result = compare_runs(workdirs)
    if format in (None, CompareFormat.table):
        console.print(to_table(result))
        return
    text = to_json(result) if format == CompareFormat.json else to_markdown(result)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {escape(str(output))}")


def _labels_line(ws, cfg) -> str | None:
    """How the training stages read the labels, when not every label is there: a
    protocol hides some, or the dataset has unknown (?name) ones. None otherwise."""
    import h5py

    unknown = 0
    if ws.dataset.exists():
        with h5py.File(ws.dataset, "r") as h5:
            unknown = int((~h5["known"][()]).sum()) if "known" in h5 else 0
    lab, loss = cfg.labels, cfg.loss
    if lab.protocol == "full" and not unknown:
        return None
    fraction = f" {lab.fraction:g}" if lab.protocol in ("keep", "hide") else ""
    if loss.base == "llr":  # labels.unknown does not apply: LL-R rejects some of them
        reading = f"unknown read as negative, the largest-loss ones rejected (LL-R, {100 * loss.llr_delta_rel:g} % more each epoch)"
    else:
        reading = f"unknown read as {lab.unknown}"
    clml = ""
    if loss.clml > 0:
        clml = f"; CLML weight {loss.clml:g}" + (f", every {loss.clml_every} steps" if loss.clml_every > 1 else "")
    validation = ""
    if lab.protocol != "full":
        validation = ("; validation under the same protocol (hidden read as negative): epoch, thresholds and vote "
                      "chosen on it" if lab.val_protocol == "same" else "; validation on full labels")
    dataset = f"; the dataset has {unknown} unknown labels (?name), left out of validation and test metrics" if unknown else ""
    return f"training labels: protocol {lab.protocol}{fraction} (seed {lab.seed}), {reading}{clml}{validation}{dataset}"

QUICKSTART_WORKDIR = Path("retdm-quickstart")
QuickstartWorkdir = Annotated[
    Optional[Path],
    typer.Option("--workdir", "-w", metavar="DIR", file_okay=False, show_default=False,
                 help=f"Where the demo's artifacts live (also accepted before the command; $RETDM_WORKDIR is ignored).  "
                      f"[default: ./{QUICKSTART_WORKDIR}]"),
]


@app.command()
def quickstart(
    images: Annotated[int, typer.Option(metavar="N", help="Demo images.")] = 2000,
    force: Force = False,
    workdir: QuickstartWorkdir = None,
    config: ConfigFile = None,
) -> None:
    """Every stage on the built-in demo set (frozen EfficientNet-Lite0 on the CPU, pooled
    features: --tune-blocks 0 --views 1), then the metrics table. Takes about half a
    minute on a laptop. Uses its own workdir, ./retdm-quickstart, unless -w/--workdir is
    given ($RETDM_WORKDIR is ignored), so that the demo's settings (128 px images) never
    leak into your own datasets; it refuses a workdir that holds another dataset.

    Example: retdmctl quickstart
    """
    set_workdir(workdir)
    set_config(config)
    if not STATE.workdir_given or (STATE.workdir_from_env and workdir is None):  # $RETDM_WORKDIR is not -w
        STATE.workdir = QUICKSTART_WORKDIR
    _refuse_another_dataset(workspace())
    started = time.perf_counter()
    overrides = {
        "ingest": {"source": "demo", "path": "", "images": "", "demo_images": images},
        # The demo images are 96-128 px: 128 px input keeps every pixel and costs a third
        # of 224 px. Pooled features of the centre crop (not the tuned, ten-view default
        # of --frozen-backbone): a first look at every stage in about a minute.
        "model": {"backbone": "efficientnet_lite0", "frozen_backbone": True, "image_size": 128,
                  "tune_blocks": 0, "views": 1},
    }
    cfg = resolve(overrides)
    from stages import PIPELINE

    ws = run_stages(cfg, [s.name for s in PIPELINE], force)
    console.print(escape(f"quickstart finished in {time.perf_counter() - started:.1f}s; report: {ws.stage_dir('eval') / 'report.html'}"))


def _refuse_another_dataset(ws) -> None:
    """Quickstart writes the demo's dataset, models and retdm.toml: never over a workspace
    that holds another dataset."""
    if not ws.root.is_dir():
        return
    source = ws.load_config().ingest.source
    if source not in ("", "demo") or (not source and ws.dataset.exists()):
        raise RetdmError(
            f"{ws.root} holds another dataset ({source or 'data/dataset.h5'}): quickstart would replace it "
            "with the demo's; give it an empty folder with -w DIR"
        )


def entry() -> None:
    from retdmctl import distributed

    try:
        distributed.setup()  # under torchrun: join the other processes (else nothing)
    except RetdmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    if not distributed.is_main():
        console.quiet = True  # rank 0 speaks for every rank
    if not distributed.launched():
        app()
        return
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    finally:
        distributed.shutdown()
    # Under torchrun the interpreter's own exit runs torch's C++ destructors, which on busy
    # cores sometimes find a gloo thread still joinable and abort the process ("terminate
    # called without an active exception", SIGABRT): a finished run then fails. Everything
    # is written and the process group is gone by now, so leave without them.
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


# --- predict / export (retdmctl.cli_predict) ------------------------------------
from retdmctl.cli_predict import export as _export  # noqa: E402
from retdmctl.cli_predict import predict as _predict  # noqa: E402

app.command("predict")(_predict)
app.command("export")(_export)

# --- the shared cache (retdmctl.cli_cache) ---------------------------------------
from retdmctl.cli_cache import cache as _cache  # noqa: E402

app.command("cache")(_cache)
