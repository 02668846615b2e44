"""The neighbour vote's search: the k bank rows of highest cosine to each query.

Two kinds, recorded in the checkpoint's ``fusion["search"]``:

- ``exact``: blocked matmul + top-k in PyTorch. At most :data:`BLOCK_BYTES` of
  similarities exist at a time (query rows x at most :data:`BANK_BLOCK` bank rows; the
  top-k of each bank block is merged into a running top-k): their memory grows with
  neither the batch nor the bank. Traced (the export), it is one MatMul + TopK per batch.
- ``ivf``: a FAISS inverted file over the unit rows stored as float16
  (IndexIVFScalarQuantizer QT_fp16, inner product, not by residual), with ~sqrt(N) lists,
  ``nprobe`` of them scanned per query. Its cosines are those of the float16-rounded
  unit rows (within ~1e-3 of exact); what it can miss is a neighbour in a list it does
  not scan. Scanning lists is bound by memory bandwidth, hence float16: half the bytes
  of IndexIVFFlat, and 2.4x faster at 10^5 (nprobe 32, measured on 2 cores). Used from :data:`EXACT_MAX` bank images on
  (bench/vote_scale.py, docs/predict-export.md).

The IVF's k-means depends on the thread count, so it is run once, when the vote is
chosen, and its result is saved, not re-run: the centroids (nlist x D float32) and
each bank row's list (int32). The lists are rebuilt from the saved bank by adding each
row to its saved list, in bank order, which is deterministic: eval, predict and the
report search the very index validation chose (k, t, w) with. Saving the lists'
vectors too (faiss.serialize_index) would store the bank a second time.

Both kinds leave a bank position out of a query's result where asked (``exclude``), so
a training image never votes for itself; the IVF searches k + 1 and drops it.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

EXACT = {"kind": "exact"}
KINDS = ("exact", "ivf")
BLOCK_BYTES = 64 << 20  # float32 similarities alive at a time
BANK_BLOCK = 65_536  # bank rows per similarity block (the query rows fill the rest)
# Bank size from which the vote searches an IVF (bench/vote_scale.py, 2 cores, 512-d):
# exact costs 3.5 ms per query at 10^5, 8.9 at 3 x 10^5, 30 at 10^6; the IVF 0.6, 1.2
# and 2.1 ms at recall@40 0.96-0.97. Below it: all of MS-COCO (123k) or NUS-WIDE (270k).
EXACT_MAX = 300_000
TRAIN_PER_LIST = 64  # k-means sample: this many bank rows per list
NITER = 10
SEED = 1234
ADD_CHUNK = 65_536  # bank rows normalised and added at a time


def normalize(f: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(f.float(), dim=1, eps=1e-12)


def plan(n: int) -> str:
    """The search kind for a bank of ``n`` images."""
    return "exact" if n < EXACT_MAX else "ivf"


# --- exact ---------------------------------------------------------------------------


def _block_top(q: torch.Tensor, part: torch.Tensor, offset: int, k: int,
               exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    sim = q @ part.T
    if exclude is not None:
        hit = (exclude >= offset) & (exclude < offset + part.shape[0])
        sim[hit, exclude[hit] - offset] = float("-inf")
    top, idx = sim.topk(min(k, part.shape[0]), dim=1)
    return top, idx + offset


def exact_top(q: torch.Tensor, bank: torch.Tensor, k: int,
              exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sims, positions), each (B, k), nearest first: the k bank rows of highest
    ``q @ bank.T`` (unit rows: cosine), ``exclude[i]`` (>= 0) left out of row i's."""
    n = bank.shape[0]
    if torch.jit.is_tracing():  # exported: a loop count fixed by the tracing batch would be wrong
        return _block_top(q, bank, 0, k, exclude)
    cols = min(n, BANK_BLOCK)
    rows = max(1, BLOCK_BYTES // (4 * max(cols, 1)))
    sims, idxs = [], []
    for r in range(0, q.shape[0], rows):
        qb = q[r : r + rows]
        ex = None if exclude is None else exclude[r : r + rows]
        best_s, best_i = _block_top(qb, bank[:cols], 0, k, ex)
        for c in range(cols, n, cols):  # merge each further bank block into the running top-k
            s, i = _block_top(qb, bank[c : c + cols], c, k, ex)
            s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
            best_s, at = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i.gather(1, at)
        sims.append(best_s)
        idxs.append(best_i)
    if not sims:
        return q.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.int64, device=q.device)
    return torch.cat(sims), torch.cat(idxs)


# --- IVF -----------------------------------------------------------------------------


def ivf_lists(n: int) -> int:
    return max(1, min(n, round(math.sqrt(n))))


def ivf_nprobe(nlist: int) -> int:
    """Lists scanned per query (bench/vote_scale.py: recall@40 0.96-0.97 from 10^4 to 10^6)."""
    return min(nlist, max(32, nlist // 32))


def _unit_chunks(bank: torch.Tensor):
    for start in range(0, bank.shape[0], ADD_CHUNK):
        yield start, np.ascontiguousarray(normalize(bank[start : start + ADD_CHUNK]).numpy())


def train_ivf(bank: torch.Tensor) -> dict:
    """The IVF of ``bank`` (N, D), as saved: a seeded k-means on a sample of the unit
    rows, then each row's nearest centroid (inner product)."""
    n, d = bank.shape
    nlist = ivf_lists(n)
    sample = np.sort(np.random.default_rng(SEED).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))
    x = np.ascontiguousarray(normalize(bank[torch.from_numpy(sample)]).numpy())
    km = faiss.Kmeans(d, nlist, niter=NITER, seed=SEED, spherical=True, max_points_per_centroid=TRAIN_PER_LIST,
                      min_points_per_centroid=1, verbose=False)
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    assign = np.empty(n, dtype=np.int32)
    for start, unit in _unit_chunks(bank):
        assign[start : start + len(unit)] = quantizer.search(unit, 1)[1][:, 0]
    return {"kind": "ivf", "nlist": nlist, "nprobe": ivf_nprobe(nlist),
            "centroids": torch.from_numpy(centroids), "assign": torch.from_numpy(assign)}


def check(search: dict, n: int, d: int) -> str | None:
    """Why a saved search does not fit a bank of ``n`` x ``d`` (None: it does)."""
    if not isinstance(search, dict) or search.get("kind") not in KINDS:
        kind = search.get("kind") if isinstance(search, dict) else type(search).__name__
        return f"its neighbour vote's search kind {kind!r} is not one of {', '.join(KINDS)}"
    if search["kind"] == "exact":
        return None
    nlist, nprobe = search.get("nlist"), search.get("nprobe")
    centroids, assign = search.get("centroids"), search.get("assign")
    if not (isinstance(nlist, int) and isinstance(nprobe, int) and 1 <= nprobe <= nlist <= n):
        return f"its neighbour vote's IVF index is malformed (nlist {nlist!r}, nprobe {nprobe!r}, {n} bank images)"
    if not (isinstance(centroids, torch.Tensor) and centroids.dtype == torch.float32
            and tuple(centroids.shape) == (nlist, d) and bool(torch.isfinite(centroids).all())):
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        return f"its neighbour vote's IVF index is malformed (centroids {shape}, want ({nlist}, {d}) finite float32)"
    if not (isinstance(assign, torch.Tensor) and assign.dtype == torch.int32 and tuple(assign.shape) == (n,)
            and (n == 0 or (int(assign.min()) >= 0 and int(assign.max()) < nlist))):
        shape = tuple(assign.shape) if isinstance(assign, torch.Tensor) else type(assign).__name__
        return f"its neighbour vote's IVF index is malformed (list of each bank image {shape}, want ({n},) in 0..{nlist - 1})"
    return None


def ivf_index(bank: torch.Tensor, search: dict) -> faiss.IndexIVFScalarQuantizer:
    """The saved IVF rebuilt: its centroids, each bank row added to its saved list."""
    from faiss.contrib.ivf_tools import add_preassigned

    d = bank.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(search["centroids"].numpy()))
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, int(search["nlist"]), faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT, False)
    index.is_trained = True  # float16 codes need no training, the centroids are saved
    assign = search["assign"].numpy().astype(np.int64)
    for start, unit in _unit_chunks(bank):
        add_preassigned(index, unit, np.ascontiguousarray(assign[start : start + len(unit)]))
    index.nprobe = int(search["nprobe"])
    return index


def ivf_top(index: faiss.IndexIVF, q: torch.Tensor, k: int,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`exact_top`, searched in ``index`` (k + 1 where a position is excluded,
    which is then dropped, else the (k + 1)-th)."""
    x = np.ascontiguousarray(q.detach().float().cpu().numpy())
    want = k + (exclude is not None)
    sims, idx = index.search(x, want)
    short = (idx < 0).any(axis=1)  # fewer candidates in the scanned lists: scan them all
    if short.any():
        every = faiss.SearchParametersIVF(nprobe=index.nlist)
        sims[short], idx[short] = index.search(np.ascontiguousarray(x[short]), want, params=every)
    sims[idx < 0] = -np.inf  # only where the bank has fewer than k + 1 images: weight 0
    if exclude is not None:
        ex = exclude.cpu().numpy()[:, None]
        drop = (idx == ex) & (ex >= 0)
        drop[~drop.any(axis=1), -1] = True  # one dropped per row: itself, else the last
        keep = ~drop
        sims, idx = sims[keep].reshape(len(x), k), idx[keep].reshape(len(x), k)
    idx = np.where(idx < 0, 0, idx).astype(np.int64)
    return torch.from_numpy(sims).to(q.device), torch.from_numpy(idx).to(q.device)
