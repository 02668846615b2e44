"""The label-set kNN graph (docs/method.md).

U is the set of distinct label vectors of the training split, sorted lexicographically
(``np.unique``). For each u in U, the k nearest *other* label sets by Euclidean distance
on the 0/1 vectors. Distances between 0/1 vectors are square roots of integers, so ties
are the rule: FAISS returns candidates, and ties are broken by (distance, index in U).

Index kinds (``knn.index``):

- ``exact``: FAISS IndexFlatL2, with the candidate window widened until the k-th
  neighbour's tie group is complete: the result is exactly the (distance, index) order.
  Cost grows with the square of |U| (12.6 s at 61,066 sets of 80 labels on 2 cores).
- ``ivf``: an inverted file over the label sets packed as bits. For 0/1 vectors the
  Hamming distance *is* the squared Euclidean distance, so the lists hold 1 bit per label
  (FAISS IndexBinaryIVF) and every candidate distance is exact. The coarse centroids come
  from a seeded k-means on the sparse label sets (numpy/scipy, single-threaded, so the
  result does not depend on the thread count); nlist ~ 4 sqrt(|U|). Each label set is
  searched in the ``nprobe`` lists whose centroids are nearest.
- ``hnsw``: FAISS IndexBinaryHNSW over the same packed bits (built single-threaded, so
  deterministic), ``efSearch`` candidates per query.
- ``auto``: ``exact`` below :data:`AUTO_EXACT_MAX` distinct label sets, ``ivf`` beyond.

The approximate kinds return a candidate window (k + 1 + margin) whose distances are
exact; it is re-ranked by (squared distance, index) and the identical vector is dropped,
as for ``exact``. What they can miss is a neighbour outside the window; inside a tie group
at the k-th distance they may pick other members than ``exact`` would (any of them is an
equally near neighbour). The graph records the kind and its parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import h5py
import numpy as np

from retdmctl import __version__
from retdmctl.config import CHOICES
from retdmctl.data.dataset import ids_mismatch
from retdmctl.errors import InputError
from retdmctl.workspace import atomic_path, now_iso

# Below this many distinct label sets, ``auto`` searches exactly (deterministic ties, and
# exact stays in seconds: 12.6 s at 61,066 sets of 80 labels on 2 cores).
# Exact grows quadratically and with the size of the tie groups (bench/knn.py: 5.4 CPU-s
# already at 10,000 Zipf-distributed sets), while ivf is near-linear with recall@10 ~0.98
# (3 CPU-s at 10^5, 74 CPU-s at 10^6, 80 labels).
AUTO_EXACT_MAX = 50_000
SEED = 1234  # FAISS/k-means seeding: the approximate graphs are reproducible


@dataclass
class KnnGraph:
    label_sets: np.ndarray  # (S, L) uint8, the distinct training label vectors
    neighbors: np.ndarray  # (S, k) int32 indices into label_sets
    distances: np.ndarray  # (S, k) float32 Euclidean distances
    set_ptr: np.ndarray  # (S+1,) int64: members of set s are set_members[set_ptr[s]:set_ptr[s+1]]
    set_members: np.ndarray  # dataset row indices of the training images, grouped by set
    image_set: np.ndarray  # (N,) int32: each dataset row's set index, -1 outside train
    index: dict = field(default_factory=lambda: {"kind": "exact"})  # which search built it

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]


_ARRAYS = ("label_sets", "neighbors", "distances", "set_ptr", "set_members", "image_set")


def resolve_index(kind: str, n: int) -> str:
    """The index kind actually used for ``n`` distinct label sets."""
    if kind not in CHOICES["knn.index"]:
        raise ValueError(f"knn.index must be one of {', '.join(CHOICES['knn.index'])}, got {kind!r}")
    if kind == "auto":
        return "exact" if n < AUTO_EXACT_MAX else "ivf"
    return kind


# --- exact -----------------------------------------------------------------------------


def _exact(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(base)
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
    return _rerank(idx, dist, k)


def _rerank(idx: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: drop missing (-1) and identical (distance 0) candidates, order by
    (squared distance, index), keep k. Rows with fewer than k candidates are padded with
    -1 / inf (only possible for approximate search). Vectorised: one int64 sort key
    distance * (max index + 2) + index per candidate (candidates in a row are distinct)."""
    idx = idx.astype(np.int64)
    dist = dist.astype(np.int64)
    base = int(idx.max(initial=0)) + 2
    valid = (idx >= 0) & (dist > 0)
    key = np.where(valid, dist * base + idx, np.iinfo(np.int64).max)
    take = min(k, key.shape[1])
    part = np.sort(key, axis=1)[:, :take] if key.shape[1] > 0 else key
    ok = part != np.iinfo(np.int64).max
    nbrs = np.full((len(idx), k), -1, dtype=np.int32)
    dsts = np.full((len(idx), k), np.inf, dtype=np.float32)
    nbrs[:, :take] = np.where(ok, part % base, -1)
    dsts[:, :take] = np.where(ok, np.sqrt(part // base), np.inf)
    return nbrs, dsts


# --- approximate: packed bits, Hamming == squared Euclidean ----------------------------


def pack_bits(vectors: np.ndarray) -> np.ndarray:
    """0/1 rows packed 8 labels a byte, padded with zero bytes to a multiple of 8 bytes
    (FAISS's fast Hamming kernels); padding changes no distance."""
    packed = np.packbits(np.asarray(vectors, dtype=np.uint8) != 0, axis=1)
    width = -(-max(packed.shape[1], 1) // 8) * 8
    if width != packed.shape[1]:
        packed = np.pad(packed, ((0, 0), (0, width - packed.shape[1])))
    return np.ascontiguousarray(packed)


def _sparse(vectors: np.ndarray):
    from scipy import sparse

    return sparse.csr_matrix(np.asarray(vectors, dtype=np.float32))


def _sparse_chunks(vectors: np.ndarray, chunk: int):
    for start in range(0, len(vectors), chunk):
        yield start, _sparse(vectors[start : start + chunk])


def _nearest_centroids(vectors: np.ndarray, centroids: np.ndarray, nprobe: int, chunk: int = 8192) -> np.ndarray:
    """(n, nprobe) indices of the nearest centroids (squared L2), nearest first, ties by
    centroid index. ||x||^2 is constant per row, so ||c||^2 - 2 x.c ranks them; x.c
    touches only the nonzeros of x (scipy), the selection is torch.topk (threaded)."""
    import torch

    c_t = np.ascontiguousarray(-2.0 * centroids.T, dtype=np.float32)
    c_norm = (centroids.astype(np.float32) ** 2).sum(1)
    out = np.empty((len(vectors), nprobe), dtype=np.int64)
    for start, xs in _sparse_chunks(vectors, chunk):
        score = np.asarray(xs @ c_t)
        score += c_norm
        stop = start + xs.shape[0]
        if nprobe == 1:
            out[start:stop, 0] = score.argmin(1)
            continue
        vals, part = torch.topk(torch.from_numpy(score), nprobe, dim=1, largest=False, sorted=False)
        vals, part = vals.numpy(), part.numpy()
        order = np.lexsort((part, vals), axis=1)
        out[start:stop] = np.take_along_axis(part, order, 1)
    return out


def sparse_kmeans(vectors: np.ndarray, nlist: int, *, niter: int = 6, sample: int = 32, seed: int = SEED) -> np.ndarray:
    """Lloyd's k-means on (a seeded sample of) sparse 0/1 rows; centroids (nlist, L) float32.

    Single-threaded numpy/scipy with a fixed seed, so the result is reproducible; the
    products touch only the nonzeros, so 1,000 labels cost about what 80 do."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    take = min(n, sample * nlist)
    rows = np.sort(rng.choice(n, take, replace=False)) if take < n else np.arange(n)
    x = vectors[rows]
    xs = _sparse(x)
    centroids = x[rng.choice(len(x), nlist, replace=False)].astype(np.float32)
    for _ in range(niter):
        assign = _nearest_centroids(x, centroids, 1)[:, 0]
        counts = np.bincount(assign, minlength=nlist).astype(np.float32)
        from scipy import sparse

        member = sparse.csr_matrix(
            (np.ones(len(assign), dtype=np.float32), (assign, np.arange(len(assign)))), shape=(nlist, len(assign))
        )
        sums = np.asarray((member @ xs).todense(), dtype=np.float32)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():  # re-seed empty clusters on random rows
            centroids[empty] = x[rng.choice(len(x), int(empty.sum()), replace=False)]
    return centroids


def ivf_params(n: int, k: int, labels: int = 0) -> dict:
    """IVF lists and probes for n label sets of ``labels`` labels. Wide label vectors are
    searched with fewer probes (bench/knn.py, 10^6 distinct sets, 2 cores: at 1,000
    labels nprobe 5 gives recall@10 0.980 in 97 s, nprobe 8 0.989 in 122 s; at 80 labels
    nprobe 5 would give 0.963, 8 gives 0.978 in 29 s)."""
    nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 16)))
    nprobe = 8 if labels <= 256 else 5
    return {"kind": "ivf", "nlist": nlist, "nprobe": int(min(nlist, nprobe)), "window": int(k + 1 + 32), "seed": SEED}


def hnsw_params(n: int, k: int, labels: int = 0) -> dict:
    return {"kind": "hnsw", "M": 16, "efConstruction": 40, "efSearch": 64, "window": int(k + 1 + 32)}


class IvfSearcher:
    def __init__(self, base: np.ndarray, nlist: int, nprobe: int, seed: int = SEED, **_) -> None:
        self.base, self.nprobe = base, nprobe
        self.codes = pack_bits(base)
        self.centroids = sparse_kmeans(base, nlist, seed=seed)
        dbits = self.codes.shape[1] * 8
        self.index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dbits), dbits, nlist)
        self.index.is_trained = True  # assignments are computed here, not by FAISS
        self.index.nprobe = nprobe
        # Each label set goes to its nearest list; the nprobe nearest are kept for a self-search.
        self.base_lists = _nearest_centroids(base, self.centroids, nprobe)
        assign = np.ascontiguousarray(self.base_lists[:, 0])
        self.index.add_core(len(base), faiss.swig_ptr(self.codes), None, faiss.swig_ptr(assign))

    def search(self, queries: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        if queries is self.base:
            codes, lists = self.codes, self.base_lists
        else:
            codes, lists = pack_bits(queries), _nearest_centroids(queries, self.centroids, self.nprobe)
        dist, idx = self.index.search_preassigned(codes, window, lists, None)
        return idx, dist.astype(np.int64)


class HnswSearcher:
    def __init__(self, base: np.ndarray, M: int, efConstruction: int, efSearch: int, **_) -> None:
        self.codes = pack_bits(base)
        self.index = faiss.IndexBinaryHNSW(self.codes.shape[1] * 8, M)
        self.index.hnsw.efConstruction = efConstruction
        self.index.hnsw.efSearch = efSearch
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a parallel build depends on thread timing
        try:
            self.index.add(self.codes)
        finally:
            faiss.omp_set_num_threads(threads)

    def search(self, queries: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self.index.search(pack_bits(queries), window)
        return idx, dist.astype(np.int64)


def make_searcher(base: np.ndarray, params: dict):
    return (IvfSearcher if params["kind"] == "ivf" else HnswSearcher)(base, **params)


def search(base: np.ndarray, queries: np.ndarray, k: int, index: str = "exact") -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`knn_search` that also returns the index used and its parameters."""
    n = len(base)
    k = min(k, n - 1)
    kind = resolve_index(index, n)
    if kind == "exact":
        nbrs, dsts = _exact(base, queries, k)
        return nbrs, dsts, {"kind": "exact"}
    params = (ivf_params if kind == "ivf" else hnsw_params)(n, k, base.shape[1])
    window = min(n, params["window"])
    searcher = make_searcher(base, params)
    idx, dist = searcher.search(queries, window)
    nbrs, dsts = _rerank(idx, dist, k)
    return nbrs, dsts, params


def knn_search(base: np.ndarray, queries: np.ndarray, k: int, index: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """For each query, the k nearest rows of ``base`` (distinct rows) other than an
    identical one; ties broken by row index."""
    nbrs, dsts, _ = search(base, queries, k, index)
    return nbrs, dsts


def build_graph(labels: np.ndarray, train_idx: np.ndarray, k: int, index: str = "exact") -> KnnGraph:
    train_labels = labels[train_idx]
    label_sets, inverse = np.unique(train_labels, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(label_sets) < 2:
        raise ValueError("the training split has fewer than 2 distinct label sets")
    neighbors, distances, params = search(label_sets, label_sets, k, index)
    if (neighbors < 0).any():
        raise ValueError(
            f"the {params['kind']} index found fewer than {neighbors.shape[1]} neighbours for some label sets; "
            "use knn.index = exact"
        )
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
        index={"requested": index, **params},
    )


def write_graph(path: Path, graph: KnnGraph, config: dict, ids: str | None = None) -> None:
    """``ids``: the :func:`~retdmctl.data.dataset.ids_digest` of the dataset whose rows
    ``image_set`` and ``set_members`` index."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for name in _ARRAYS:
            h5.create_dataset(name, data=getattr(graph, name), compression="gzip")
        h5.attrs.update(
            {"config": json.dumps(config), "index": json.dumps(graph.index), "version": __version__, "created": now_iso()}
        )
        if ids is not None:
            h5.attrs["ids_digest"] = ids


def read_graph(path: Path, ids: str | None = None, source: str | None = None) -> KnnGraph:
    """The graph; with ``ids`` (the dataset's ids digest) only where it was built for
    that ordered image list, else an InputError naming ``source`` (its rows index images)."""
    with h5py.File(path, "r") as h5:
        if ids is not None and (why := ids_mismatch(h5.attrs.get("ids_digest"), ids)):
            raise InputError(f"{source or path} {why}: re-run retdmctl knn")
        index = json.loads(h5.attrs["index"]) if "index" in h5.attrs else {"kind": "exact"}
        return KnnGraph(**{name: h5[name][()] for name in _ARRAYS}, index=index)
