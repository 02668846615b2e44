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
(:class:`WeightEMA`); validation, model selection and the kept weights use it, training
goes on from the live weights, and ``resume.pt`` holds both. Every rank holds the same
parameters, so every rank holds the same average without any communication.
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
    # SGD with momentum and weight decay; lr divided by 10 when the val loss plateaus.
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{"params": g["params"], "lr": schedule.lr * g.get("lr_mult", 1.0)} for g in groups]
    # fused: one kernel for the whole update on CUDA (the CPU keeps the default)
    optimizer = torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay,
                                fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=schedule.patience, min_lr=[g["lr"] * 1e-3 for g in groups]
    )
    history: list[dict[str, float]] = []
    start_epoch = 1
    best: dict[str, Any] = {"epoch": 0, "score": -float("inf"), "model": None}

    resume_path = stage_dir / "resume.pt"
    state = _resume_point(resume_path, name, console, resume_key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best = state["best"]
        for key, tensor in buffers.items():
            tensor.copy_(state["buffers"][key])
        start_epoch = int(state["epoch"]) + 1
        restore_rng(state)
        console.print(f"{name}: resuming after epoch {state['epoch']} of {schedule.epochs}")

    # Several processes: the step runs under DDP, on this rank's shard of each batch.
    runner = DistributedStep(model, step, [p for g in groups for p in g["params"]]) if distributed.active() else None
    # The weight average starts from the weights as DDP synchronised them (or as resumed).
    ema = WeightEMA(model, [p for g in groups for p in g["params"]], schedule.ema) if schedule.ema > 0 else None
    if ema is not None and state is not None:
        ema.load_state_dict(state["ema"])
    # Bars are transient; the log keeps one line per epoch.
    with make_progress(transient=True, console=console) as progress, _closing(runner):
        epochs_task = progress.add_task(f"{name} epochs", total=schedule.epochs, completed=start_epoch - 1, info="")
        for epoch in range(start_epoch, schedule.epochs + 1):
            model.train()
            if on_epoch is not None:
                on_epoch(epoch)
            rng = epoch_rng(schedule.seed, epoch)
            # Dropout and the crops/flips drawn in the main process (workers=0) take
            # their own per-epoch seeds: an epoch draws the same numbers whether it runs
            # in one go, after a resume, or after anything else consumed the global RNG.
            # (ranks > 0 draw their own dropout and crops: they see other images)
            random.seed(int(rng.integers(2**31)) + distributed.rank())
            torch.manual_seed(derive_seed(schedule.seed, "epoch", epoch, *([distributed.rank()] if runner else [])))
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

            model.eval()
            # validation and model selection see the averaged weights (with ema > 0)
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                with torch.no_grad():
                    val = distributed.broadcast(validate())  # rank 0's figures decide on every rank
                scheduler.step(val["val_loss"])
                record = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()}, **val}
                record["lr"] = optimizer.param_groups[0]["lr"]
                history.append(record)
                # Model selection on validation: val mAP where the stage measures it, else
                # the val loss. The best epoch's weights are what the stage keeps.
                score = record["val_mAP"] if "val_mAP" in record else -record["val_loss"]
                if score > best["score"]:
                    best = {"epoch": epoch, "score": score, "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            progress.update(epochs_task, advance=1, info=_describe(record))
            console.print(f"{name} epoch {epoch}/{schedule.epochs}: {_describe(record)}")
            resume = {
                "resume_key": resume_key,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "epoch": epoch,
                "best": best,
                "buffers": {key: t.detach().cpu() for key, t in buffers.items()},
            }
            if ema is not None:  # the live weights are under "model": training goes on from them
                resume["ema"] = ema.state_dict()
            distributed.on_main(lambda: save_checkpoint(resume_path, resume, defer=False))
            if schedule.stop_after and epoch - best["epoch"] >= schedule.stop_after:
                console.print(f"{name}: no better validation score for {schedule.stop_after} epochs, stopping")
                break
    if schedule.select == "best" and best["model"] is not None:
        model.load_state_dict(best["model"])
        console.print(f"{name}: keeping epoch {best['epoch']} (best on validation)")
    elif ema is not None:  # the last epoch's averaged weights
        ema.copy_to_model()
    for record in history:
        record["kept"] = record["epoch"] == (best["epoch"] if schedule.select == "best" else history[-1]["epoch"])
    return history


class WeightEMA:
    """An exponential moving average of the trained parameters: a float32 shadow of
    each, ``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.
    Buffers (BatchNorm's running statistics) are not averaged: the averaged weights run
    with the model's own. The shadow is keyed by parameter name (``resume.pt``)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], decay: float) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = list(params)
        self.names = [names.get(id(p), f"param.{i}") for i, p in enumerate(self.params)]
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the live ones back after it."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().to("cpu", copy=True) for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise CheckpointError("resume.pt: its weight average does not match the parameters trained")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state[n])


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
