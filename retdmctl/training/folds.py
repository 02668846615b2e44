"""Out-of-fold scores: how the decision (the neighbour vote and the thresholds) sees
more images than the validation split without seeing one that trained its model.

With ``decision.folds = K`` the training split is dealt into K seeded folds
(:func:`assign`). For each fold a copy of the stage, and of every stage it builds on, is
trained in ``folds/fold-<k>/`` of the workspace on a dataset where that fold's images
moved from train to test (:func:`fold_info`): the fold's model never trains on them,
never on the real test split either, and validation stays what it is. It trains for the
epochs the full run kept (:func:`fold_config`), and then scores the held-out fold, whose
neighbours it looks up in its own bank (its embeddings of its own training images). The
K parts and the validation split scored by the full model are the images the decision is
chosen on (:func:`retdmctl.training.decision.choose_decision`).

The fold copies run the stages' own code on a workspace that shares the parent's image
store and backbone cache (:class:`FoldWorkspace`); ``stages.folds`` drives them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from retdmctl import fusion
from retdmctl.config import Config
from retdmctl.data.dataset import DatasetInfo
from retdmctl.inputs import image_source
from retdmctl.model_io.checkpoint import build_model, restore_image_model
from retdmctl.model_io.scoring import predict_with_embeddings
from retdmctl.runtime import load_checkpoint, prepare_model
from retdmctl.workspace import Workspace


def assign(train_rows: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds - 1) of each training row: a permutation drawn from its own
    generator (``decision.seed``), dealt out in turn, so fold sizes differ by at most one
    and the folds depend on nothing but the rows, ``folds`` and ``seed``."""
    order = np.random.default_rng([seed, 22, folds]).permutation(len(train_rows))
    out = np.empty(len(train_rows), np.int64)
    out[order] = np.arange(len(train_rows)) % folds
    return out


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class FoldWorkspace(Workspace):
    """A fold's workspace: its own dataset.h5, stage folders and resume points, the
    parent's image store (and, as every workspace, the shared backbone cache)."""

    images: Path = Path()

    @property
    def lmdb(self) -> Path:
        return self.images


def fold_workspace(ws: Workspace, k: int) -> FoldWorkspace:
    return FoldWorkspace(root=ws.root / "folds" / f"fold-{k}", images=ws.lmdb)


def fold_info(info: DatasetInfo, held: np.ndarray) -> DatasetInfo:
    """``info`` with the rows ``held`` moved from train to test: what the fold's stages
    read (they train on train, select on val, and never read test)."""
    return dataclasses.replace(info, splits={
        "train": np.setdiff1d(info.split("train"), held),
        "val": info.split("val"),
        "test": np.union1d(info.split("test"), held),
    })


def fold_config(cfg: Config, epochs: dict[str, int]) -> Config:
    """The fold copies' config: the run's, each stage in ``epochs`` trained for that many
    epochs (the full run's kept epoch) and keeping the last, no folds of its own."""
    out = copy.deepcopy(cfg)
    out.decision.folds = 0
    for name, n in epochs.items():
        schedule = getattr(out, name)
        schedule.epochs, schedule.select, schedule.stop_after = int(n), "last", 0
    return out


def kept_epoch(history: list[dict]) -> int:
    """The epoch whose weights a stage kept (``fit`` marks it)."""
    return int(next((h["epoch"] for h in history if h.get("kept")), history[-1]["epoch"]))


def held_out(ws: FoldWorkspace, cfg: Config, info: DatasetInfo, stage: str, rows: np.ndarray,
             labels: np.ndarray, known: np.ndarray | None, device: torch.device) -> fusion.Scored:
    """The fold's ``stage`` model's scores of its held-out ``rows`` (whose ``labels`` and
    ``known`` are the parent's training view), with their nearest neighbours in the fold
    model's own bank (its checkpoint's ``fusion``: the embeddings of its training rows)."""
    path = ws.stage_dir(stage) / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    restore_image_model(model, ckpt, cfg, ws.rel(path))
    prepare_model(model, device)
    source = image_source(ws, cfg, info, spec, device, None)
    try:
        p, _, f = predict_with_embeddings(model, source, rows, device)
    finally:  # the store is shared with the parent stage: closed again (it reopens when read)
        if getattr(source, "reader", None) is not None:
            source.reader.close()
    saved = ckpt["fusion"]
    k_max = min(max(fusion.GRID["k"]), len(saved["labels"]))
    bank = fusion.NeighbourVote(saved["bank"], saved["labels"], saved["rows"], k_max, 1.0, 1.0, saved.get("search"))
    cos, idx = fusion.neighbours(bank, f, k_max)
    return fusion.Scored(p, labels, known, cos, idx, saved["labels"].to(torch.uint8))
