"""Training on incomplete labels: the ``[labels]`` protocol and the classification loss
that reads it (docs/method.md).

:func:`observed_labels` is the one place that decides which training labels a model sees:
the protocol (``labels.protocol``, ``labels.fraction``, ``labels.seed``) applied to the
training split, combined with the dataset's own unknowns (``?label`` in a csv file).
Test rows keep the dataset's labels: evaluation is scored on every label the dataset
has, and leaves its own unknowns out (:mod:`retdmctl.metrics`, ``known``).

Validation rows follow ``labels.val_protocol``: ``same`` (the default) hides their labels
under the same protocol, a draw of its own from ``labels.seed`` (:data:`VAL_STREAM`), and
reads the hidden ones as negatives (assume-negative), as a user whose labels are
incomplete has them; ``full`` keeps every validation label (a ceiling a user cannot
measure). Everything chosen on validation (the epoch kept, the thresholds, the neighbour
vote) reads these labels: they are ``info.labels`` of the view.

:func:`training_view` gives the stages a copy of the dataset whose ``labels`` are, on the
training rows, the observed positives (unknown read as 0), and on the validation rows
the validation labels above: the sources, the kNN graph, the metric losses and the
validation choices all read ``info.labels``, so they all see the observed label sets.
:class:`Classification` is the classifier's loss on a batch: the base loss with the
unknown entries assumed negative or masked out (``labels.unknown``), or LL-R, plus the
CLML term when ``loss.clml`` > 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from retdmctl import distributed
from retdmctl.config import Config
from retdmctl.data.dataset import DatasetInfo
from retdmctl.data.protocols import apply_protocol, describe
from retdmctl.errors import ConfigError
from retdmctl.losses.base import base_loss
from retdmctl.losses.clml import clml_loss
from retdmctl.losses.llr import llr_loss

#: the protocol's generator stream for the validation rows (``labels.val_protocol = same``):
#: a draw of their own, the training rows' draw unchanged (part of the seed: never change)
VAL_STREAM = 1


def observed_labels(info: DatasetInfo, cfg: Config) -> np.ndarray:
    """int8 (N, L): 1 observed positive, 0 observed negative, -1 unknown. The protocol
    hides labels of the training rows only; the dataset's own unknowns stay unknown
    everywhere. Deterministic for ``labels.seed``."""
    lab = cfg.labels
    observed = info.observed()
    hidden = apply_protocol(info.labels, info.split("train"), lab.protocol, lab.fraction, lab.seed)
    observed[hidden == -1] = -1
    return observed


def validation_labels(info: DatasetInfo, cfg: Config) -> np.ndarray:
    """The 0/1 labels of the validation rows (in the order of ``info.split("val")``) that
    everything chosen on validation reads: under ``labels.val_protocol = same`` the
    protocol's own draw for them, hidden positives read as 0; else the dataset's."""
    lab, val = cfg.labels, info.split("val")
    if lab.val_protocol == "full" or lab.protocol == "full":
        return info.labels[val].copy()
    seen = apply_protocol(info.labels, val, lab.protocol, lab.fraction, lab.seed, stream=VAL_STREAM)
    return (seen[val] == 1).astype(info.labels.dtype)


def training_view(info: DatasetInfo, cfg: Config) -> tuple[DatasetInfo, np.ndarray, dict]:
    """(a copy of ``info`` whose training rows' labels are the observed positives and
    whose validation rows' are :func:`validation_labels`, the observed matrix, a summary
    for the stage's manifest)."""
    observed = observed_labels(info, cfg)
    train, val = info.split("train"), info.split("val")
    labels = info.labels.copy()
    labels[train] = (observed[train] == 1).astype(labels.dtype)
    labels[val] = validation_labels(info, cfg)
    view = dataclasses.replace(info, labels=labels)
    positives = int((info.labels[train] > 0).sum())
    kept = int((observed[train] == 1).sum())
    val_positives = int((info.labels[val] > 0).sum())
    lab = cfg.labels
    summary = {
        "labels": {
            "protocol": lab.protocol,
            **({"fraction": lab.fraction} if lab.protocol in ("keep", "hide") else {}),
            "seed": lab.seed,
            "unknown": lab.unknown,
            "train_positives": positives,
            "hidden_positives": positives - kept,
            "unknown_entries": int((observed[train] == -1).sum()),
            "val_protocol": "full" if lab.protocol == "full" else lab.val_protocol,
            "val_positives": val_positives,
            "val_hidden_positives": val_positives - int((labels[val] > 0).sum()),
        }
    }
    return view, observed, summary


def batch_terms_problem(cfg: Config, world: int) -> str | None:
    """Why ``cfg`` cannot train on ``world`` processes, or None. LL-R ranks the unknown
    entries of the batch and CLML compares the batch's rows with each other; under
    torchrun each process holds only its share of the global batch, so N processes would
    not train as one (:mod:`retdmctl.training.parallel`): refused, not gathered."""
    terms = [t for t, on in (("loss.base = llr", cfg.loss.base == "llr"), ("loss.clml > 0", cfg.loss.clml > 0)) if on]
    if world <= 1 or not terms:
        return None
    return (f"{' and '.join(terms)} read the whole batch, but each of the {world} processes sees only its share: "
            "train without torchrun (one process)")


def refuse_batch_terms_across_processes(cfg: Config) -> None:
    """Raise, at a classifier or joint stage's start, when :func:`batch_terms_problem`
    finds one: rank 0 prints the line, the other ranks exit 1 silently."""
    if (problem := batch_terms_problem(cfg, distributed.world_size())) is not None:
        distributed.barrier()  # every rank here before any leaves the process group
        raise ConfigError(problem) if distributed.is_main() else distributed.PeerError(problem)


_ANNOUNCED: set[tuple[int, str]] = set()


def announce(console, summary: dict) -> None:
    """One line, only when some training label is unknown, and once per console: a
    ``retdmctl run`` says it once, not in each of the four stages that read it."""
    line = describe(summary)
    if summary["labels"]["unknown_entries"] and (id(console), line) not in _ANNOUNCED:
        _ANNOUNCED.add((id(console), line))
        console.print(line)


class EpochCounter:
    """Passed to ``fit(on_epoch=...)``: holds the 1-based epoch being trained and, for
    ``loss.clml_every``, the 0-based index of the training step about to run. The index
    is set from the epoch at each epoch's start (``steps_per_epoch`` batches an epoch),
    so a resumed run runs the term on the same steps as an uninterrupted one."""

    def __init__(self, steps_per_epoch: int = 0) -> None:
        self.epoch = 1
        self.step = 0
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, epoch: int) -> None:
        self.epoch = epoch
        self.step = (epoch - 1) * self.steps_per_epoch


class Classification:
    """The classification loss of a training batch: ``loss(logits, y, rows, f=None)``.

    * ``loss.base`` bce/asl: unknown entries assumed negative (``labels.unknown =
      negative``: the targets y already read them as 0) or masked out (``ignore``).
    * ``loss.base = llr``: BCE with unknowns as negatives, the largest-loss unknown
      entries rejected on LL-R's schedule (needs the epoch; ``loss.llr_delta_rel`` more
      of the batch's entries each epoch); observed negatives are never rejected. ``labels.unknown`` does not apply.
    * plus ``loss.clml`` * the CLML term on ``f`` (the clean embedding) when > 0.

    Rows outside the training split (none are trained on) count as fully observed.
    """

    def __init__(self, cfg: Config, observed: np.ndarray, counter: EpochCounter, device) -> None:
        self.cfg, self.counter = cfg, counter
        self.name = cfg.loss.base
        self.base = None if self.name == "llr" else base_loss(self.name)
        self.unknown = torch.from_numpy(observed == -1).to(device)
        self.ignore = cfg.labels.unknown == "ignore"

    @property
    def uses_clml(self) -> bool:
        return self.cfg.loss.clml > 0

    def base_loss(self, logits: torch.Tensor, y: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        unknown = self.unknown[torch.from_numpy(np.asarray(rows)).to(self.unknown.device)]
        if self.base is None:
            return llr_loss(logits, y, self.counter.epoch, self.cfg.loss.llr_delta_rel, mask_unobserved=unknown)
        if self.ignore and bool(unknown.any()):
            return self.base(logits, y, ~unknown)
        return self.base(logits, y)

    def clml_term(self, f: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The weighted term on this step, or None on a step that lazy regularisation
        (``loss.clml_every`` = k > 1) skips: it runs on steps 0, k, 2k, ... with weight
        k * ``loss.clml``, so its gradient summed over k steps is, in expectation, that of
        running it on every step."""
        loss, every = self.cfg.loss, self.cfg.loss.clml_every
        if self.counter.step % every:
            return None
        return clml_loss(
            f.float(), logits.float(), y.float(), epoch=self.counter.epoch, lam=loss.clml * every,
            tau=loss.clml_tau, delta=loss.clml_delta, start_epoch=loss.clml_start_epoch,
        )

    def __call__(self, logits, y, rows, f=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the base loss, the weighted CLML term or None when off, skipped on this step,
        or ``f`` is None). One call per training step: it advances the step counter."""
        cls = self.base_loss(logits, y, rows)
        term = self.clml_term(f, logits, y) if self.uses_clml and f is not None else None
        self.counter.step += 1
        return cls, term
