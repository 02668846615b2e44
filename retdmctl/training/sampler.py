"""The metric loss's inputs for a batch: each row's label-set neighbours and the
training images of those sets (:class:`MetricSampler`), and the losses themselves
(:func:`metric_and_rec`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retdmctl.data.dataset import DatasetInfo
from retdmctl.knn import KnnGraph, knn_search
from retdmctl.losses.retdm import reconstruction_loss, two_way_metric_loss
from retdmctl.models.retdm import RETDM


@dataclass
class MetricSampler:
    """Builds the metric-loss inputs for a batch of dataset rows.

    Training rows use the graph's label sets and neighbours. Validation rows may carry a
    label set unseen in training, so their neighbours are searched among the training
    label sets once, up front (``for_rows``).
    """

    graph: KnnGraph
    label_sets: torch.Tensor  # (S, L) float
    row_neighbors: np.ndarray  # (N, k) int32: each dataset row's neighbour set indices, -1 for none

    @classmethod
    def build(cls, graph: KnnGraph, info: DatasetInfo, extra_rows: np.ndarray) -> MetricSampler:
        # One table indexed by dataset row: a batch's neighbours are one fancy index,
        # not a Python loop over a dict (the metric stage's steps are ~1 ms).
        table = np.full((max(len(info.labels), len(graph.image_set)), graph.k), -1, dtype=np.int32)
        train_rows = np.flatnonzero(graph.image_set >= 0)
        table[train_rows] = graph.neighbors[graph.image_set[train_rows]]
        if len(extra_rows):
            nbrs, _ = knn_search(graph.label_sets, info.labels[extra_rows], graph.k, graph.index.get("kind", "exact"))
            table[extra_rows] = nbrs
        return cls(graph, torch.from_numpy(graph.label_sets.astype(np.float32)), table)

    def neighbors(self, rows: np.ndarray) -> np.ndarray:
        """(B, k) neighbour set indices of ``rows``; KeyError for a row that has none."""
        out = self.row_neighbors[rows]
        if len(out) and out[:, 0].min() < 0:
            missing = np.asarray(rows)[out[:, 0] < 0]
            raise KeyError(f"dataset rows without label-set neighbours: {missing[:5].tolist()}")
        return out

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
    f_neg = f_bank[picks].float()  # the metric stage's bank is float16, as features.h5 holds it
    metric = two_way_metric_loss(f, g_pos, g_neg, f_neg, loss_cfg.lam, loss_cfg.margin)
    rec = reconstruction_loss(model.rec_head(g_pos), y)
    return metric, rec
