"""A training stage's set-up and finish: threads, seed, device, the dataset and the
stage's folder before training; the checkpoint and the summary after it."""

from __future__ import annotations

from pathlib import Path

import torch

from retdmctl import distributed
from retdmctl.atomic import after_commit
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.inputs import require_splits, runs_cnn
from retdmctl.runtime import pick_device, save_checkpoint, seed_everything, set_threads
from retdmctl.tracking import remove_leftovers, write_history


def begin_training(ctx, stage: str, seed: int) -> tuple[torch.device, DatasetInfo, Path]:
    """Threads, seed, device, the dataset and the stage's folder; ``--force`` discards a
    resume point so that the stage starts over. Train and val must not be empty."""
    # The metric stage never runs the CNN; the others do unless the backbone is frozen
    # (feature extraction, when needed, sets its own threads).
    set_threads(cnn=stage != "metric" and runs_cnn(ctx.cfg))
    seed_everything(seed)
    device = pick_device(ctx.cfg.runtime.device)
    info = read_dataset(ctx.ws.dataset)
    require_splits(info, ("train", "val"), ctx.ws)
    stage_dir = ctx.ws.stage_dir(stage)

    def prepare() -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(stage_dir)  # the experiment log's files are no stage outputs
        if ctx.force:
            (stage_dir / "resume.pt").unlink(missing_ok=True)

    distributed.on_main(prepare)
    return device, info, stage_dir


def finish_training(stage_dir: Path, state: dict, history: list[dict]) -> dict:
    """Write the stage's checkpoint (rank 0; with the number of processes that trained
    it) and its ``history.csv`` beside it (:func:`retdmctl.tracking.write_history`);
    drop its resume point once the checkpoint is in place; return the summary."""
    state = {**state, "history": history, "world_size": distributed.world_size()}

    def write() -> None:
        save_checkpoint(stage_dir / "checkpoint.pt", state)
        write_history(stage_dir, history)
        after_commit(lambda: (stage_dir / "resume.pt").unlink(missing_ok=True))

    distributed.on_main(write)
    # the figures of the epoch whose weights were kept (fit marks it), not of the last one
    kept = next((h for h in history if h.get("kept")), history[-1] if history else {})
    summary = {"epochs": len(history), **{k: kept.get(k) for k in ("val_loss", "val_mAP") if k in kept}}
    if "epoch" in kept:
        summary["kept_epoch"] = kept["epoch"]
    if (vote := state.get("fusion")) is not None:  # what validation chose (the manifest's summary)
        summary["fusion"] = {k: vote[k] for k in ("k", "temp", "w", "val_mAP", "plain_val_mAP")}
    return summary

