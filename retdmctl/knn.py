"""The label-set kNN graph (DESIGN.md section 2).

U is the set of distinct label vectors of the training split, sorted lexicographically
(``np.unique``). For each u in U, the k nearest *other* label sets by Euclidean distance
on the 0/1 vectors. Distances between 0/1 vectors are square roots of integers, so ties
are the rule: FAISS returns candidates, and ties are broken by (distance, index in U),
with the candidate window widened until the k-th neighbour's tie group is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import h5py
import numpy as np

from retdmctl import __version__
from retdmctl.workspace import atomic_path, now_iso


@dataclass
class KnnGraph:
    label_sets: np.ndarray  # (S, L) uint8, the distinct training label vectors
    neighbors: np.ndarray  # (S, k) int32 indices into label_sets
    distances: np.ndarray  # (S, k) float32 Euclidean distances
    set_ptr: np.ndarray  # (S+1,) int64: members of set s are set_members[set_ptr[s]:set_ptr[s+1]]
    set_members: np.ndarray  # dataset row indices of the training images, grouped by set
    image_set: np.ndarray  # (N,) int32: each dataset row's set index, -1 outside train

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]


def knn_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the k nearest rows of ``base`` (distinct rows) other than an
    identical one; ties broken by row index."""
    n = len(base)
    k = min(k, n - 1)
    xb = np.ascontiguousarray(base, dtype=np.float32)
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    window = min(n, k + 1 + 8)
    while True:
        dist, idx = index.search(xq, window)  # squared L2: exact small integers here
        dist = np.rint(dist).astype(np.int64)
        # Wide enough when, for every query, a retrieved candidate lies strictly beyond
        # the (k+1)-th entry (k neighbours plus a possible identical row): then the
        # k-th neighbour's whole tie group is among the candidates.
        if window == n or np.all(dist[:, -1] > dist[:, k]):
            break
        window = min(n, window * 2)
    nbrs = np.empty((len(xq), k), dtype=np.int32)
    dsts = np.empty((len(xq), k), dtype=np.float32)
    for row in range(len(xq)):
        keep = (idx[row] >= 0) & (dist[row] > 0)
        cand, d = idx[row][keep], dist[row][keep]
        order = np.lexsort((cand, d))[:k]
        nbrs[row] = cand[order]
        dsts[row] = np.sqrt(d[order])
    return nbrs, dsts


def build_graph(labels: np.ndarray, train_idx: np.ndarray, k: int) -> KnnGraph:
    train_labels = labels[train_idx]
    label_sets, inverse = np.unique(train_labels, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(label_sets) < 2:
        raise ValueError("the training split has fewer than 2 distinct label sets")
    neighbors, distances = knn_search(label_sets, label_sets, k)
    order = np.lexsort((train_idx, inverse))  # group by set, then by dataset row
    counts = np.bincount(inverse, minlength=len(label_sets))
    set_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    image_set = np.full(len(labels), -1, dtype=np.int32)
    image_set[train_idx] = inverse
    return KnnGraph(
        label_sets=label_sets.astype(np.uint8),
        neighbors=neighbors,
        distances=distances,
        set_ptr=set_ptr,
        set_members=train_idx[order].astype(np.int64),
        image_set=image_set,
    )


def write_graph(path: Path, graph: KnnGraph, config: dict) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for name in ("label_sets", "neighbors", "distances", "set_ptr", "set_members", "image_set"):
            h5.create_dataset(name, data=getattr(graph, name), compression="gzip")
        h5.attrs.update({"config": json.dumps(config), "version": __version__, "created": now_iso()})


def read_graph(path: Path) -> KnnGraph:
    with h5py.File(path, "r") as h5:
        return KnnGraph(**{name: h5[name][()] for name in KnnGraph.__dataclass_fields__})
