"""Stage ``eval``: score a split with a checkpoint's classification module and report.

Writes ``eval/scores.h5`` (scores, labels, ids; ``known`` where a label is unknown), ``eval/metrics.json`` (the 12 metrics
of docs/metrics.md plus per-class AP) and ``eval/report.html`` (with report = none, an earlier
report.html is removed once the stage has committed). With tensorboard installed the 12
metrics also go to ``runs/eval/<split>/`` once the stage has committed (:mod:`retdmctl.tracking`).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
from rich.table import Table

from retdmctl import __version__, distributed
from retdmctl.atomic import after_commit, remove
from retdmctl.config import Config, check
from retdmctl.data.dataset import ids_mismatch, read_dataset
from retdmctl.disk import require_room_in_workspace
from retdmctl.errors import InputError
from retdmctl.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    compute_metrics,
    per_class_average_precision,
)
from retdmctl.pipeline import Context, Stage
from retdmctl.report.build import build_report
from retdmctl.inputs import backbone_problem, model_inputs, require_splits, runs_cnn
from retdmctl.model_io.scoring import Scored, score_split
from retdmctl.runtime import pick_device, set_threads
from retdmctl.tracking import log_eval
from retdmctl.workspace import atomic_path, now_iso, write_text_atomic


def _blocked(cfg: Config) -> str | None:
    if (problem := backbone_problem(cfg)) is not None:
        return problem
    return check(cfg, "eval.checkpoint", "eval.split", "eval.report")


def split_note(cfg: Config, ckpt: dict) -> str | None:
    """Why figures on the validation split are no test result (None on train and test)."""
    if cfg.eval.split != "val":
        return None
    chose = ["the epoch"] + (["the thresholds"] if cfg.eval.thresholds != "fixed" else [])
    chose += ["the neighbour vote"] if cfg.eval.fusion and ckpt.get("fusion") is not None else []
    listed = ", ".join(chose[:-1]) + " and " + chose[-1] if len(chose) > 1 else chose[0]
    return f"validation chose {listed}: figures on the val split are optimistic, not a test result"


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better", justify="center")
    for name in METRIC_NAMES:
        table.add_row(name, f"{metrics[name]:.4f}", "higher" if HIGHER_IS_BETTER[name] else "lower")
    return table


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    set_threads(cnn=runs_cnn(cfg))
    device = pick_device(cfg.runtime.device)
    info = read_dataset(ws.dataset)
    e = cfg.eval
    require_splits(info, (e.split,), ws)
    rows = info.split(e.split)
    # room for scores.h5 before scoring: float32 scores, uint8 labels and known flags a
    # class, a row number and an id (about 40 bytes in HDF5) an image
    distributed.on_main(lambda: require_room_in_workspace(ws.stage_dir("eval"), len(rows) * (6 * info.num_classes + 48),
                                                          "eval/scores.h5"))
    # The vote applied with eval.fusion (None: the classifier's scores alone); a vote
    # built for other dataset rows is an error.
    scored = score_split(ws, cfg, info, e.checkpoint, rows, device, ctx.console)
    # Under torchrun every rank scored its shard and holds all the scores; rank 0 writes.
    return distributed.on_main(lambda: _write(ctx, info, scored, device, rows))


def _write(ctx: Context, info, scored: Scored, device, rows) -> dict:
    ws, cfg, e = ctx.ws, ctx.cfg, ctx.cfg.eval
    ckpt, model, scores, labels, vote = scored.ckpt, scored.model, scored.scores, scored.labels, scored.rule.vote
    ckpt_path, backbone_from = ws.stage_dir(e.checkpoint) / "checkpoint.pt", scored.backbone_from
    cut = scored.rule.cut(e.thresholds, e.threshold, info.num_classes)
    # Unknown labels (?name in a csv file) are neither positive nor negative: every metric
    # leaves them out rather than reading them as negative.
    known = info.known_at(rows)
    unknown, unknown_images = info.unknown_count(rows)
    if unknown:
        ctx.console.print(f"eval: {unknown} unknown labels (?name) in {unknown_images} {e.split} images: "
                          "left out of every metric")
    if note := split_note(cfg, ckpt):
        ctx.console.print(f"eval: {note}", soft_wrap=True)  # one line, however narrow the terminal
    metrics = compute_metrics(labels, scores, threshold=cut, known=known)
    ap = per_class_average_precision(labels, scores, known)

    out = ws.stage_dir("eval")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scores.h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("scores", data=scores.astype(np.float32))
        h5.create_dataset("labels", data=labels.astype(np.uint8))
        if known is not None:  # False = unknown (its label reads 0 above)
            h5.create_dataset("known", data=known)
        h5.create_dataset("rows", data=rows)
        h5.create_dataset("ids", data=np.array([info.ids[r] for r in rows], dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("class_names", data=np.array(info.class_names, dtype=object), dtype=h5py.string_dtype())
        h5.attrs.update({"checkpoint": ws.rel(ckpt_path), "split": e.split, "ids_digest": info.ids_digest,
                         "version": __version__})
    per_class = {name: (None if np.isnan(v) else float(v)) for name, v in zip(info.class_names, ap)}
    result = {
        "metrics": metrics,
        "per_class_ap": per_class,
        "checkpoint": ws.rel(ckpt_path),
        "split": e.split,
        "split_note": split_note(cfg, ckpt),  # on val: the figures are optimistic
        "images": int(len(rows)),
        "unknown_labels": {"entries": unknown, "images": unknown_images},  # left out of every metric
        "thresholds": {"rule": e.thresholds, "values": dict(zip(info.class_names, map(float, cut)))},
        # the neighbour vote fused into the scores (k, temp, w, bank size), or null
        "fusion": None if vote is None else vote.describe(),
        "config": cfg.sections(STAGE.sections),
        "backbone_from": backbone_from,
        "version": __version__,
        "created": now_iso(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=2))

    if e.report == "html":
        page = build_report(ws, cfg, info, result, scores=scores, labels=labels, rows=rows, model=model, device=device)
        write_text_atomic(out / "report.html", page)
    elif (old := out / "report.html").exists():
        # An earlier eval's report would look current: removed once this eval has committed.
        def drop_old_report() -> None:
            remove(old)
            ctx.console.print(f"eval: removed {ws.rel(old)}, an earlier evaluation's report (report = none)",
                              soft_wrap=True)

        after_commit(drop_old_report)
    # TensorBoard (with the tracking extra): runs/eval/<split>/, at the kept epoch's step
    kept = next((h["epoch"] for h in ckpt.get("history", []) if h.get("kept")), 0)
    after_commit(lambda: log_eval(ws.root, e.split, {k: metrics[k] for k in METRIC_NAMES}, step=int(kept)))
    return {"mAP": metrics["mAP"], "C-F1": metrics["C-F1"], "O-F1": metrics["O-F1"]}


def read_scores(path, info) -> dict[str, np.ndarray]:
    """``scores.h5``'s arrays (``rows`` are dataset rows), only where it was written for
    ``info``'s ordered ids; else an InputError naming the file (re-run eval)."""
    with h5py.File(path, "r") as h5:
        if why := ids_mismatch(h5.attrs.get("ids_digest"), info.ids_digest):
            raise InputError(f"{path} {why}: re-run retdmctl eval")
        return {name: h5[name][()] for name in h5}


def _inputs(ws, cfg: Config) -> list:
    paths = [ws.dataset, ws.stage_dir(cfg.eval.checkpoint) / "checkpoint.pt"] + model_inputs(ws, cfg)
    if cfg.eval.checkpoint == "joint" and cfg.eval.report == "html":  # the report shows the classifier beside it
        paths.append(ws.stage_dir("classifier") / "checkpoint.pt")
    return paths


def _outputs(ws, cfg: Config) -> list:
    out = ws.stage_dir("eval")
    return [out / "scores.h5", out / "metrics.json"] + ([out / "report.html"] if cfg.eval.report == "html" else [])


STAGE = Stage(
    name="eval",
    command="retdmctl eval",
    sections=("model", "eval"),
    inputs=_inputs,
    outputs=_outputs,
    run=run,
    blocked=_blocked,
    parallel=True,
)
