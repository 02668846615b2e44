"""``retdmctl predict`` and ``retdmctl export`` (registered in :mod:`retdmctl.cli`)."""

from __future__ import annotations

import contextlib

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape

from retdmctl.cli_support import EXIT_SOME_SKIPPED, STATE, ConfigFile, Sets, Workdir, console, resolve, set_config, set_workdir
from retdmctl.config import CHOICES, CLASSIFYING_STAGES
from retdmctl.errors import RetdmError, UsageError
from retdmctl import distributed
from retdmctl.lock import workspace_lock


class OutputFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


CheckpointOpt = Annotated[
    Optional[str],
    typer.Option(
        "--checkpoint", metavar="STAGE|FILE",
        help=f"{', '.join(CLASSIFYING_STAGES)}, or a checkpoint.pt file. Default: joint if trained, else classifier.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", metavar="|".join(CHOICES["runtime.device"]), show_default=False,
                 help="auto (GPU when available), cpu or cuda.  [default: runtime.device of the workspace's config: auto]"),
]
FusionOpt = Annotated[
    bool,
    typer.Option("--fusion/--no-fusion",
                 help="Fuse the scores with the vote of the nearest training images where the checkpoint has one "
                      "(chosen on validation), with its thresholds; --no-fusion: the classifier's scores alone."),
]


def _predictor(checkpoint: str | None, device: str | None, fusion: bool = True, sets: list[str] | None = None):
    """The predictor of ``checkpoint`` (a stage of the workdir or a file) on ``device``
    (None: the config's runtime.device). The workspace's config, with ``sets`` over it,
    gives the device and judges whether the model is out of date."""
    from retdmctl.inference import load_predictor

    if checkpoint is not None and checkpoint not in CLASSIFYING_STAGES:
        path = Path(checkpoint)
        if not path.is_file():
            raise UsageError(f"--checkpoint must be {', '.join(CLASSIFYING_STAGES)} or a checkpoint file; {checkpoint!r} is none of them")
        cfg = resolve({}, sets) if sets or STATE.config else None
        return load_predictor(path, device=device or (cfg.runtime.device if cfg else "auto"), fusion=fusion)
    root = STATE.workdir.resolve()
    if not root.is_dir():
        raise RetdmError(f"workdir {root} does not exist: pass -w WORKDIR (or train a model first)")
    cfg = resolve({}, sets)
    predictor = load_predictor(root, checkpoint, device=device or cfg.runtime.device, fusion=fusion)
    _warn_if_stale(root, predictor.stage, cfg)
    return predictor


def _warn_if_stale(root: Path, stage: str, cfg) -> None:
    """A model older than the workspace's config or data still predicts, but says so."""
    from retdmctl.pipeline import status
    from retdmctl.workspace import Workspace
    from stages import BY_NAME, PIPELINE

    st = status(Workspace(root), cfg, BY_NAME[stage], PIPELINE)
    if st.state != "done":
        typer.echo(f"warning: the {stage} model is out of date ({st.reason}); `retdmctl run` retrains it", err=True)


def predict(
    paths: Annotated[
        list[str],
        typer.Argument(metavar="PATH...", help="Image files, folders (searched recursively), glob patterns, or @list.txt.", show_default=False),
    ],
    fmt: Annotated[
        Optional[OutputFormat],
        typer.Option("--format", help="table, jsonl or csv. Default: table, or from --output's suffix (.csv: csv, else jsonl).",
                     show_default=False),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the results to this file instead of stdout.", dir_okay=False),
    ] = None,
    checkpoint: CheckpointOpt = None,
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", metavar="T", help="One score threshold for every class (overrides the checkpoint's per-class thresholds).",
                     show_default=False),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="At most this many labels per image, best first (0: no limit).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per forward pass.")] = 32,
    device: DeviceOpt = None,
    fusion: FusionOpt = True,
    sets: Sets = None,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Predict the labels of new images with a trained model.

    A label is predicted when its score reaches the class's threshold (chosen on the
    validation split when the checkpoint has them, else 0.5). Files that cannot be read
    or decoded are reported on stderr, one line each, and skipped.

    --set SECTION.KEY=VALUE applies to the workspace's config as read here (the device,
    and whether the model is out of date); nothing is saved.

    Exit codes: 0 every image was scored; 3 some inputs were skipped (the others were
    scored and written); 1 nothing could be scored; 2 a usage error (bad option or value).

    Example: retdmctl predict photos/ --format jsonl
    """
    distributed.single_process("predict")
    set_workdir(workdir)
    set_config(config)
    from retdmctl.predict import (
        Prediction,
        csv_header,
        csv_row,
        expand_inputs,
        jsonl_line,
        predict_files,
        stderr_line,
        table,
        write_csv,
    )
    from retdmctl.workspace import write_text_atomic

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, got {threshold}")
    if top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {top_k}")
    if fmt is None:
        fmt = OutputFormat.table if output is None else (OutputFormat.csv if output.suffix.lower() == ".csv" else OutputFormat.jsonl)
    if fmt is OutputFormat.table and output is not None:
        raise UsageError("--format table prints to the terminal; use --format jsonl or csv with --output")

    files, skipped = expand_inputs(paths)
    for s in skipped:
        stderr_line(f"skipped {s.path}: {s.reason}")
    if not files:
        raise RetdmError("no image files to score")
    predictor = _predictor(checkpoint, device, fusion, sets)
    thresholds = None if threshold is None else np.full(len(predictor.class_names), threshold)

    names = predictor.class_names
    stream_to_stdout = output is None and fmt is not OutputFormat.table
    lines: list[str] = []
    rows: list[list[str]] = [csv_header(names)]
    preds: list[Prediction] = []
    if stream_to_stdout and fmt is OutputFormat.csv:
        sys.stdout.write(write_csv(rows))
    n_skipped = len(skipped)
    for item in predict_files(predictor, files, batch_size=batch_size, thresholds=thresholds, top_k=top_k):
        if not isinstance(item, Prediction):
            stderr_line(f"skipped {item.path}: {item.reason}")
            n_skipped += 1
            continue
        preds.append(item)
        if fmt is OutputFormat.jsonl:
            line = jsonl_line(item, names)
            if stream_to_stdout:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            else:
                lines.append(line)
        elif fmt is OutputFormat.csv:
            if stream_to_stdout:
                sys.stdout.write(write_csv([csv_row(item)]))
            else:
                rows.append(csv_row(item))

    if not preds:
        raise RetdmError(f"none of the {len(files)} files could be scored")
    if fmt is OutputFormat.table:
        src = f"{predictor.stage} model ({predictor.backbone})"
        thr = f"threshold {threshold}" if threshold is not None else (
            "per-class thresholds from validation" if predictor.threshold_source == "checkpoint" else "threshold 0.5")
        console.print(table(preds, f"{len(preds)} images, {src}, {thr}"))
    elif output is not None:
        write_text_atomic(output, "\n".join(lines) + "\n" if fmt is OutputFormat.jsonl else write_csv(rows))
        stderr_line(f"wrote {len(preds)} predictions to {output}")
    if n_skipped:
        stderr_line(f"{len(preds)} scored, {n_skipped} skipped")
        raise typer.Exit(EXIT_SOME_SKIPPED)


def export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="onnx or torchscript.")] = ExportFormat.onnx,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="The file to write. Default: WORKDIR/export/STAGE.onnx (or STAGE.torchscript.pt).",
                     dir_okay=False, show_default=False),
    ] = None,
    checkpoint: CheckpointOpt = None,
    fusion: FusionOpt = True,
    sets: Sets = None,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Export the image network (backbone, embedding, classification head) for serving.

    Input ``images`` (N, 3, H, W) float32 NCHW RGB, normalised as the metadata says;
    outputs ``logits`` and ``probabilities`` (N, L); the batch dimension is dynamic.
    Where the checkpoint has a neighbour vote, ``probabilities`` are the fused scores
    and the training embeddings travel in the graph as a constant (--no-fusion: not);
    past 1.5 GB of weights ONNX keeps them in OUTPUT.data, which must travel with the
    model. A vote that searches an approximate index cannot be exported: use --no-fusion.
    ONNX uses opset 17 and keeps the labels, thresholds and the exact preprocessing as
    JSON in metadata_props["retdmctl"]; TorchScript writes them to OUTPUT.json.

    Example: retdmctl export --format onnx --output model.onnx
    """
    set_workdir(workdir)
    set_config(config)
    distributed.single_process("export")
    from retdmctl.export import EXTRA_HINT

    if fmt is ExportFormat.onnx:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise RetdmError(EXTRA_HINT) from None
    predictor = _predictor(checkpoint, "cpu", fusion, sets)
    if output is None:
        name = f"{predictor.stage}.onnx" if fmt is ExportFormat.onnx else f"{predictor.stage}.torchscript.pt"
        output = STATE.workdir.resolve() / "export" / name
    root = STATE.workdir.resolve()
    # Writing into a workspace takes its lock, like every other writer.
    with workspace_lock(root) if output.resolve().is_relative_to(root) else contextlib.nullcontext():
        _export(fmt, predictor, output)


def _export(fmt, predictor, output: Path) -> None:
    from retdmctl.export import OPSET, export_onnx, export_torchscript, onnx_parity, torchscript_parity

    if fmt is ExportFormat.onnx:
        meta = export_onnx(predictor, output)
        diff = onnx_parity(predictor, output)
        check = "" if diff is None else f"; onnxruntime vs PyTorch max |dp| = {diff:.2e}"
        console.print(escape(f"wrote {output} (ONNX opset {OPSET}, {len(predictor.class_names)} labels{check})"))
        if data := meta["external_data"]:
            console.print(escape(f"its weights are in {output.with_name(data)}: keep that file beside {output.name}, "
                                 "it must travel with the model"))
    else:
        export_torchscript(predictor, output)
        diff = torchscript_parity(predictor, output)
        console.print(escape(f"wrote {output} and {output.name}.json (TorchScript; reloaded vs PyTorch max |dp| = {diff:.2e})"))
