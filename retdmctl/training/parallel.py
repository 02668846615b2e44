"""Training on several processes (torchrun): the sharded sampler, the DDP-wrapped step
and the feature bank kept identical on every rank.

``model.batch_size`` (``metric.batch_size``) is the GLOBAL batch. Each epoch every rank
draws the same permutation of the training rows from the epoch's seed, cuts it into global
batches as one process would, and takes its contiguous part of each: per-rank batch =
global batch / world size (parts differ by at most one row). Every rank runs the same
number of steps; a last global batch smaller than the world size is padded with rows from
the start of the permutation, so that no rank ever gets an empty batch (a DDP step needs
every rank). DDP averages the ranks' gradients; each rank's loss (a mean over its rows)
is weighted by its share of the global batch, so that the average is the global batch's
mean gradient even when the parts differ in size: N processes with the same global batch
train as one does, up to float rounding (and dropout and crops, drawn per rank). Losses
that read the whole batch (LL-R's ranking, the CLML term) would see only a rank's share:
the classifier and joint stages refuse them under torchrun
(:func:`retdmctl.training.labels.batch_terms_problem`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from retdmctl import distributed


def epoch_batches(rows: np.ndarray, seed: int, global_batch: int, world: int, rank: int) -> list[tuple[np.ndarray, float]]:
    """This rank's batches of one epoch, each with the weight of its loss (its share of
    the global batch times the world size). With ``world == 1``: the batches of one
    process (``CachedSource.train_batches`` draws the same permutation), weights 1."""
    perm = np.random.default_rng(seed).permutation(rows)
    batches = []
    for start in range(0, len(perm), global_batch):
        chunk = perm[start : start + global_batch]
        if len(chunk) < world:
            chunk = np.concatenate([chunk, np.resize(perm, world - len(chunk))])
        part = np.array_split(chunk, world)[rank]
        batches.append((part, len(part) * world / len(chunk)))
    return batches


class _Step(torch.nn.Module):
    """The stage's step as a module's forward: DDP syncs the gradients of what runs
    inside its forward, and a stage's step calls several parts of the model."""

    def __init__(self, model: torch.nn.Module, step: Callable) -> None:
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, x, y, rows, rng):
        return self.step(x, y, rows, rng)


class DistributedStep:
    """``step`` under DistributedDataParallel. Parameters the stage does not train are
    frozen while it lives (DDP waits for a gradient of every parameter that wants one)."""

    def __init__(self, model: torch.nn.Module, step: Callable, trained: list[torch.nn.Parameter]) -> None:
        ids = {id(p) for p in trained}
        self.frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        for p in self.frozen:
            p.requires_grad_(False)
        self.ddp = DistributedDataParallel(_Step(model, step), device_ids=None)

    def __call__(self, x, y, rows, rng):
        return self.ddp(x, y, rows, rng)

    def close(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)


def refresh_bank(bank: torch.Tensor, rows: np.ndarray, f: torch.Tensor) -> None:
    """``bank[rows] = f``, with every rank's rows and f of this step, so that the bank
    stays the same on every rank (a row padded in twice keeps its first value)."""
    if not distributed.active():
        bank[torch.from_numpy(rows).to(bank.device)] = f.detach().float()
        return
    all_rows = distributed.all_gather_padded(torch.from_numpy(rows).to(bank.device)).cpu().numpy()
    all_f = distributed.all_gather_padded(f.detach().float())
    uniq, first = np.unique(all_rows, return_index=True)
    bank[torch.from_numpy(uniq).to(bank.device)] = all_f[torch.from_numpy(first).to(all_f.device)]
