"""Pieces the training and evaluation stages share: building the model, choosing the
image source for the mode, scoring a split, and the metric-loss batch sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retdmctl.config import Config
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.errors import BackboneError
from retdmctl.knn import KnnGraph, knn_search
from retdmctl.losses.retdm import reconstruction_loss, two_way_metric_loss
from retdmctl.metrics import compute_metrics
from retdmctl.models.backbones import BackboneSpec, build_backbone, get_backbone_spec
from retdmctl.models.retdm import RETDM
from retdmctl.progress import track
from retdmctl.training.runtime import (
    autocast,
    pick_device,
    save_checkpoint,
    seed_everything,
    set_threads,
    to_device,
)
from retdmctl.training.sources import CachedSource, PixelSource, read_features
from retdmctl.workspace import Workspace


def backbone_problem(cfg: Config) -> str | None:
    """Why ``model.backbone`` cannot be used, or None (checked by every stage that builds the model)."""
    try:
        get_backbone_spec(cfg.model.backbone)
    except BackboneError as exc:
        return str(exc)
    return None


def begin_training(ctx, stage: str, seed: int) -> tuple[torch.device, DatasetInfo, Path]:
    """Threads, seed, device, the dataset and the stage's folder; ``--force`` discards a
    resume point so that the stage starts over."""
    set_threads()
    seed_everything(seed)
    device = pick_device(ctx.cfg.runtime.device)
    stage_dir = ctx.ws.stage_dir(stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if ctx.force:
        (stage_dir / "resume.pt").unlink(missing_ok=True)
    return device, read_dataset(ctx.ws.dataset), stage_dir


def finish_training(stage_dir: Path, state: dict, history: list[dict]) -> dict:
    """Write the stage's checkpoint, drop its resume point, return the stage summary."""
    save_checkpoint(stage_dir / "checkpoint.pt", {**state, "history": history})
    (stage_dir / "resume.pt").unlink(missing_ok=True)
    last = history[-1] if history else {}
    return {"epochs": len(history), **{k: last.get(k) for k in ("val_loss", "val_mAP") if k in last}}


def backbone_cache_path(ws: Workspace) -> Path:
    return ws.stage_dir("classifier") / "backbone.h5"


def build_model(cfg: Config, num_classes: int, *, pretrained: bool) -> tuple[RETDM, BackboneSpec]:
    """The RETDM model for this config: with a backbone, or heads only when frozen."""
    m = cfg.model
    spec = get_backbone_spec(m.backbone)
    backbone = None
    if not m.frozen_backbone:
        weights = Path(m.weights_file) if m.weights_file else None
        backbone, spec = build_backbone(m.backbone, pretrained=pretrained and m.pretrained, weights_file=weights)
    model = RETDM(num_classes, spec.out_dim, m.embed_dim, m.dropout, backbone=backbone)
    return model, spec


def image_source(ws: Workspace, cfg: Config, info: DatasetInfo, spec: BackboneSpec):
    """Pixels from LMDB, or the cached backbone features in frozen-backbone mode."""
    if cfg.model.frozen_backbone:
        return CachedSource(read_features(backbone_cache_path(ws)), info, cfg.model.batch_size)
    return PixelSource(ws.lmdb, info, spec, cfg.model.image_size, cfg.model.batch_size, cfg.runtime.workers)


@torch.no_grad()
def predict_scores(model: RETDM, source, rows: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and labels for ``rows``, in the order of ``rows``."""
    model.eval()
    scores, labels = [], []
    for x, y, r in track(source.eval_batches(rows), source.num_batches(rows), "scoring"):
        with autocast(device):
            logits = model(to_device(x, device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(scores), np.concatenate(labels)


@torch.no_grad()
def embed_all(model: RETDM, source, n: int, device: torch.device) -> np.ndarray:
    """f = phi(x) for every image (eval mode, centre crop)."""
    model.eval()
    out = np.zeros((n, model.cls_head.in_features), dtype=np.float32)
    for x, _, r in track(source.eval_batches(np.arange(n)), source.num_batches(np.arange(n)), "embedding"):
        with autocast(device):
            out[r] = model.embed_images(to_device(x, device)).float().cpu().numpy()
    return out


def val_bce_and_map(model: RETDM, source, rows: np.ndarray, device: torch.device) -> dict[str, float]:
    scores, labels = predict_scores(model, source, rows, device)
    eps = 1e-7
    p = np.clip(scores, eps, 1 - eps)
    bce = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    return {"val_loss": bce, "val_mAP": compute_metrics(labels, scores)["mAP"]}


@dataclass
class MetricSampler:
    """Builds the metric-loss inputs for a batch of dataset rows.

    Training rows use the graph's label sets and neighbours. Validation rows may carry a
    label set unseen in training, so their neighbours are searched among the training
    label sets once, up front (``for_rows``).
    """

    graph: KnnGraph
    label_sets: torch.Tensor  # (S, L) float
    row_neighbors: dict[int, np.ndarray]  # dataset row -> (k,) neighbour set indices

    @classmethod
    def build(cls, graph: KnnGraph, info: DatasetInfo, extra_rows: np.ndarray) -> MetricSampler:
        row_neighbors: dict[int, np.ndarray] = {}
        train_rows = np.flatnonzero(graph.image_set >= 0)
        for row, s in zip(train_rows, graph.image_set[train_rows]):
            row_neighbors[int(row)] = graph.neighbors[s]
        if len(extra_rows):
            nbrs, _ = knn_search(graph.label_sets, info.labels[extra_rows], graph.k)
            for row, nb in zip(extra_rows, nbrs):
                row_neighbors[int(row)] = nb
        return cls(graph, torch.from_numpy(graph.label_sets.astype(np.float32)), row_neighbors)

    def neighbors(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self.row_neighbors[int(r)] for r in rows])

    def way2_images(self, neighbor_sets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each neighbour set, a random training image whose label set is exactly it."""
        start = self.graph.set_ptr[neighbor_sets]
        count = self.graph.set_ptr[neighbor_sets + 1] - start
        pick = start + (rng.random(neighbor_sets.shape) * count).astype(np.int64)
        return self.graph.set_members[pick]


def metric_and_rec(model: RETDM, f, y, rows, sampler: MetricSampler, f_bank: torch.Tensor, rng, loss_cfg):
    """(alpha-free) L_metric and L_rec for a batch; f_{i_j} taken from ``f_bank``."""
    neighbors = sampler.neighbors(rows)  # (B, k) label-set indices
    g_pos = model.label_net(y)
    # psi once per distinct neighbour set in the batch, not once per (image, neighbour)
    uniq, inverse = np.unique(neighbors, return_inverse=True)
    g_uniq = model.label_net(sampler.label_sets.to(y.device)[torch.from_numpy(uniq).long()])
    g_neg = g_uniq[torch.from_numpy(inverse.reshape(neighbors.shape)).to(y.device)]
    picks = torch.from_numpy(sampler.way2_images(neighbors, rng)).to(y.device)
    f_neg = f_bank[picks]
    metric = two_way_metric_loss(f, g_pos, g_neg, f_neg, loss_cfg.lam, loss_cfg.margin)
    rec = reconstruction_loss(model.rec_head(g_pos), y)
    return metric, rec
