"""The epoch loop shared by the three training stages.

Read top to bottom: resume if a matching ``resume.pt`` exists, then for each epoch train
on shuffled batches, validate, step the plateau scheduler, append to the history and save
``resume.pt`` (atomically). A stage calls :func:`fit` with its own ``step`` (the loss of
one batch) and ``validate`` (metrics on the validation split).

Under torchrun each rank trains on its shard of every global batch through
DistributedDataParallel (``retdmctl.training.parallel``). Rank 0 decides whether to
resume and its validation figures drive model selection, the LR schedule and early
stopping on every rank; only rank 0 writes ``resume.pt``, which every rank loads.

With ``<stage>.ema`` > 0 a float32 average of the trained weights follows every step
(:class:`retdmctl.training.ema.WeightEMA`); validation, model selection and the kept
weights use it, training goes on from the live weights, and ``resume.pt`` holds both.
Every rank holds the same parameters, so every rank holds the same average without any
communication.

The pieces :func:`fit` reads as, in the order it uses them: :func:`_optimiser` (SGD and
the plateau schedule), :class:`ResumePoint` (``resume.pt``: find, restore, save),
:func:`_seed_epoch` (an epoch's seeds), :func:`_train_epoch` (one pass over the training
batches, with its progress bar), :func:`_validate` (validation, the LR schedule's step and
the epoch's history record), :class:`Selection` (the best epoch, its weights, the kept
weights and ``kept`` flags) and :func:`_stop_early`. After each epoch the history so far
goes to the experiment log (:class:`retdmctl.tracking.EpochLog`: ``<stage>/history.partial.csv``
and, with tensorboard installed, ``runs/<stage>/``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from retdmctl import distributed
from retdmctl.config import TrainConfig
from retdmctl.errors import CheckpointError
from retdmctl.progress import make_progress
from retdmctl.tracking import EpochLog
from retdmctl.training.ema import WeightEMA
from retdmctl.training.parallel import DistributedStep, epoch_batches
from retdmctl.runtime import (
    autocast,
    derive_seed,
    epoch_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    to_device,
)

Step = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.random.Generator], tuple[torch.Tensor, dict[str, float]]]


def fit(
    *,
    name: str,
    stage_dir: Path,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter] | list[dict],
    schedule: TrainConfig,
    source,
    train_rows: np.ndarray,
    step: Step,
    validate: Callable[[], dict[str, float]],
    device: torch.device,
    resume_key: dict[str, Any],
    console,
    buffers: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``params`` for ``schedule.epochs``; returns the per-epoch history.

    ``buffers`` are tensors the stage updates in place during training (the joint
    stage's feature bank): they are saved with every resume point and restored on resume.
    ``on_epoch(epoch)`` is called before each epoch's first step (1-based, resumed runs
    included): for losses on a schedule (LL-R, CLML's label correction).
    With ``schedule.ema`` > 0 the weights validated, selected and left in ``model`` are
    the exponential moving average of the trained parameters (:class:`WeightEMA`).
    """
    buffers = buffers or {}
    groups, optimizer, scheduler = _optimiser(params, schedule, device)
    trained = [p for g in groups for p in g["params"]]
    history: list[dict[str, float]] = []
    selection = Selection()
    start_epoch = 1

    resume = ResumePoint(stage_dir / "resume.pt", name, resume_key, console)
    state = resume.find()
    if state is not None:
        history, selection = resume.restore(state, model, optimizer, scheduler, buffers)
        start_epoch = int(state["epoch"]) + 1
        console.print(f"{name}: resuming after epoch {state['epoch']} of {schedule.epochs}")
    # the experiment log (retdmctl.tracking): the partial CSV and TensorBoard; rank 0
    # writes, the other ranks hold an inert log
    log = EpochLog(stage_dir, name, history)

    # Several processes: the step runs under DDP, on this rank's shard of each batch.
    runner = DistributedStep(model, step, trained) if distributed.active() else None
    # The weight average starts from the weights as DDP synchronised them (or as resumed).
    ema = WeightEMA(model, trained, schedule.ema) if schedule.ema > 0 else None
    if ema is not None and state is not None:
        ema.load_state_dict(state["ema"])
    # Bars are transient; the log keeps one line per epoch.
    with make_progress(transient=True, console=console) as progress, _closing(runner), contextlib.closing(log):
        epochs_task = progress.add_task(f"{name} epochs", total=schedule.epochs, completed=start_epoch - 1, info="")
        for epoch in range(start_epoch, schedule.epochs + 1):
            model.train()
            if on_epoch is not None:
                on_epoch(epoch)
            rng = _seed_epoch(schedule.seed, epoch, runner)
            sums, seen = _train_epoch(epoch, model, optimizer, step, runner, ema, source, train_rows, rng, device, progress)

            model.eval()
            # validation and model selection see the averaged weights (with ema > 0)
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                record = _validate(epoch, validate, scheduler, optimizer, sums, seen)
                history.append(record)
                selection.consider(record, model)
            progress.update(epochs_task, advance=1, info=_describe(record))
            console.print(f"{name} epoch {epoch}/{schedule.epochs}: {_describe(record)}")
            # logged before the resume point: a kill in between re-runs the epoch, whose
            # rows and scalars then replace these
            distributed.on_main(lambda: log.epoch(history))
            resume.save(epoch, model, optimizer, scheduler, history, selection, buffers, ema)
            if _stop_early(schedule, epoch, selection):
                console.print(f"{name}: no better validation score for {schedule.stop_after} epochs, stopping")
                break
    selection.keep(model, ema, schedule.select, name, console)
    selection.mark_kept(history, schedule.select)
    return history


def _optimiser(params: list[torch.nn.Parameter] | list[dict], schedule: TrainConfig, device: torch.device):
    """The parameter groups (each with its lr), SGD with momentum and weight decay, and
    the schedule that divides the lr by 10 when the val loss plateaus."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{"params": g["params"], "lr": schedule.lr * g.get("lr_mult", 1.0)} for g in groups]
    # fused: one kernel for the whole update on CUDA (the CPU keeps the default)
    optimizer = torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay,
                                fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=schedule.patience, min_lr=[g["lr"] * 1e-3 for g in groups]
    )
    return groups, optimizer, scheduler


def _seed_epoch(seed: int, epoch: int, runner: DistributedStep | None) -> np.random.Generator:
    """The epoch's generator (the shuffle and the stage's sampling draw from it), after
    seeding Python's and torch's global RNGs for the epoch."""
    rng = epoch_rng(seed, epoch)
    # Dropout and the crops/flips drawn in the main process (workers=0) take
    # their own per-epoch seeds: an epoch draws the same numbers whether it runs
    # in one go, after a resume, or after anything else consumed the global RNG.
    # (ranks > 0 draw their own dropout and crops: they see other images)
    random.seed(int(rng.integers(2**31)) + distributed.rank())
    torch.manual_seed(derive_seed(seed, "epoch", epoch, *([distributed.rank()] if runner else [])))
    return rng


def _train_epoch(epoch, model, optimizer, step: Step, runner: DistributedStep | None, ema: WeightEMA | None,
                 source, train_rows: np.ndarray, rng: np.random.Generator, device: torch.device,
                 progress) -> tuple[dict[str, float], int]:
    """One pass over the shuffled training batches (this rank's shard of each under
    torchrun), with its progress bar. Returns the sums of the step's items over the
    epoch's rows (every rank's, under torchrun) and the number of rows."""
    sums: dict[str, float] = {}
    seen = 0
    shuffle_seed = int(rng.integers(2**31))
    if runner is None:
        batches = source.train_batches(train_rows, shuffle_seed)
        weights = itertools.repeat(None)
        total = source.num_batches(train_rows)
    else:
        mine = epoch_batches(train_rows, shuffle_seed, source.batch_size, distributed.world_size(), distributed.rank())
        batches = source.batches_of([part for part, _ in mine], shuffle_seed)
        weights, total = iter([w for _, w in mine]), len(mine)
    batch_task = progress.add_task(f"epoch {epoch}", total=total, info="")
    for i, ((x, y, rows), weight) in enumerate(zip(batches, weights), 1):
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device):
            loss, items = (runner or step)(x, y, rows, rng)
        if weight is not None:  # this rank's share of the global batch
            loss = loss * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update()
        for key, value in items.items():  # device tensors: no host sync per step
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64) * len(rows)
        seen += len(rows)
        if i % 25 == 0 or i == total:  # the bar's running loss costs a sync: now and then
            progress.update(batch_task, advance=1, info=f"loss {float(sums['total']) / seen:.4f}")
        else:
            progress.update(batch_task, advance=1)
    progress.remove_task(batch_task)
    sums = {key: float(value) for key, value in sums.items()}
    if runner is not None:  # the epoch's means over every rank's rows
        totals = distributed.sum_over_ranks({**sums, "_seen": float(seen)})
        seen = int(totals.pop("_seen"))
        sums = totals
    return sums, seen


def _validate(epoch: int, validate: Callable[[], dict[str, float]], scheduler, optimizer,
              sums: dict[str, float], seen: int) -> dict[str, float]:
    """Validate (rank 0's figures decide on every rank), step the plateau schedule on
    the val loss, and return the epoch's history record."""
    with torch.no_grad():
        val = distributed.broadcast(validate())  # rank 0's figures decide on every rank
    scheduler.step(val["val_loss"])
    record = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}, **val}
    record["lr"] = optimizer.param_groups[0]["lr"]
    return record


class Selection:
    """Model selection on validation: val mAP where the stage measures it, else the val
    loss. Tracks the best epoch and a copy of its weights; at the end, with
    ``select = "best"`` those are what the stage keeps, with ``"last"`` the last epoch's
    (averaged, with ema > 0). Saved in ``resume.pt`` as ``"best"``:
    ``{"epoch", "score", "model"}``."""

    def __init__(self, best: dict[str, Any] | None = None) -> None:
        self.best: dict[str, Any] = best if best is not None else {"epoch": 0, "score": -float("inf"), "model": None}

    @property
    def epoch(self) -> int:
        """The best epoch so far (0 before any)."""
        return self.best["epoch"]

    def consider(self, record: dict[str, float], model: torch.nn.Module) -> None:
        """Copy the model's weights if this epoch's record is the best so far."""
        score = record["val_mAP"] if "val_mAP" in record else -record["val_loss"]
        if score > self.best["score"]:
            self.best = {"epoch": record["epoch"], "score": score,
                         "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}

    def keep(self, model: torch.nn.Module, ema: WeightEMA | None, select: str, name: str, console) -> None:
        """Leave the kept weights in ``model``: the best epoch's, or the last epoch's
        average (with ema > 0; the live weights are the last epoch's otherwise)."""
        if select == "best" and self.best["model"] is not None:
            model.load_state_dict(self.best["model"])
            console.print(f"{name}: keeping epoch {self.best['epoch']} (best on validation)")
        elif ema is not None:  # the last epoch's averaged weights
            ema.copy_to_model()

    def mark_kept(self, history: list[dict[str, float]], select: str) -> None:
        """Each record's ``kept`` flag: True for the epoch whose weights were kept."""
        for record in history:
            record["kept"] = record["epoch"] == (self.best["epoch"] if select == "best" else history[-1]["epoch"])


def _stop_early(schedule: TrainConfig, epoch: int, selection: Selection) -> bool:
    """``stop_after`` epochs in a row without a better validation score."""
    return bool(schedule.stop_after) and epoch - selection.epoch >= schedule.stop_after


class ResumePoint:
    """``<stage>/resume.pt``: everything needed to go on after a kill, saved after each
    epoch. Its keys (old files must still load): ``resume_key``, ``model``, ``optimizer``,
    ``scheduler``, ``history``, ``epoch``, ``best`` (:class:`Selection`), ``buffers`` and,
    with ema > 0, ``ema`` (:meth:`WeightEMA.state_dict`)."""

    def __init__(self, path: Path, name: str, resume_key: dict[str, Any], console) -> None:
        self.path, self.name, self.resume_key, self.console = path, name, resume_key, console

    def find(self) -> dict | None:
        """The resume point made with this ``resume_key``, or None."""
        return _resume_point(self.path, self.name, self.console, self.resume_key)

    @staticmethod
    def restore(state: dict, model: torch.nn.Module, optimizer, scheduler,
                buffers: dict[str, torch.Tensor]) -> tuple[list[dict[str, float]], Selection]:
        """Load the weights, optimizer, schedule, buffers and the torch RNG from ``state``;
        return its history and selection (the weight average is loaded by :func:`fit`,
        once DDP has synchronised the weights)."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        selection = Selection(state["best"])
        for key, tensor in buffers.items():
            tensor.copy_(state["buffers"][key])
        restore_rng(state)
        return history, selection

    def save(self, epoch: int, model: torch.nn.Module, optimizer, scheduler, history: list[dict[str, float]],
             selection: Selection, buffers: dict[str, torch.Tensor], ema: WeightEMA | None) -> None:
        """Write the resume point after ``epoch`` (rank 0, atomically, at once)."""
        resume = {
            "resume_key": self.resume_key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "epoch": epoch,
            "best": selection.best,
            "buffers": {key: t.detach().cpu() for key, t in buffers.items()},
        }
        if ema is not None:  # the live weights are under "model": training goes on from them
            resume["ema"] = ema.state_dict()
        distributed.on_main(lambda: save_checkpoint(self.path, resume, defer=False))


@contextlib.contextmanager
def _closing(runner: DistributedStep | None) -> Iterator[None]:
    try:
        yield
    finally:
        if runner is not None:
            runner.close()


def _resume_point(path: Path, name: str, console, resume_key: dict[str, Any]) -> dict | None:
    """The resume point made with this ``resume_key``, or None. One that does not match
    (another config or other inputs) is deleted. Under torchrun rank 0 decides, then
    every rank loads the same file."""
    if distributed.active():
        found = distributed.on_main(lambda: _resume_point(path, name, console, resume_key) is not None)
        return load_checkpoint(path) if found else None
    state = _read_resume_point(path, name, console)
    if state is not None and state.get("resume_key") != resume_key:
        path.unlink()
        return None
    return state


def _read_resume_point(path: Path, name: str, console) -> dict | None:
    """The resume point, or None. A corrupt one is set aside (never deleted: it may be
    worth a look) and the stage starts over from its last good state, with a warning."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        console.print(f"[yellow]warning[/]: {escape(str(exc))}; set aside as {escape(aside.name)}, {name} starts over")
        return None


def _describe(record: dict[str, float]) -> str:
    keys = ("train_total", "val_loss", "val_mAP")
    return ", ".join(f"{k} {record[k]:.4f}" for k in keys if k in record and record[k] is not None)
