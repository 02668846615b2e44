"""Benchmark the label-set kNN search: build + query time and tie-aware recall@k of each
index kind (retdmctl.knn) on synthetic distinct label sets.

Generator (``label_sets``): label j has frequency weight 1/(j+1)^s (Zipf, s = 1.0 by
default); each row draws m ~ Uniform{2..6} positives without replacement with
probabilities proportional to those weights (Gumbel top-m trick up to 256 labels,
sequential draws skipping repeats beyond: the same distribution); rows are drawn in
batches and deduplicated, keeping the first n distinct rows in draw order. This mimics
multi-label datasets (a few labels per image, a long tail of rare labels) whose distinct
label sets grow with the image count.

Recall@k: on a seeded sample of queries, the exact k-th neighbour distance d_k (other
than the query itself) is computed by brute force (FAISS IndexBinaryFlat over the packed
bits: Hamming == squared Euclidean on 0/1 vectors). A returned neighbour counts as
correct when its distance is <= d_k, so a neighbour tied with the exact k-th one counts.
Exact search itself is only run up to --exact-max rows (it grows quadratically).

    python bench/knn.py                               # the full grid (several minutes)
    python bench/knn.py --sizes 10000 --labels 80     # a quick run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch  # noqa: F401  (imported up front: retdmctl.knn uses it, the pipeline has it loaded)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retdmctl.knn import AUTO_EXACT_MAX, hnsw_params, ivf_params, make_searcher, pack_bits, _exact, _rerank  # noqa: E402


def label_sets(n: int, num_labels: int, *, zipf_s: float = 1.0, min_pos: int = 2, max_pos: int = 6, seed: int = 0) -> np.ndarray:
    """n distinct 0/1 rows (uint8) with min_pos..max_pos positives from a Zipf-like label frequency."""
    rng = np.random.default_rng(seed)
    logw = -zipf_s * np.log(np.arange(1, num_labels + 1, dtype=np.float64))
    distinct = np.zeros((0, (num_labels + 7) // 8), dtype=np.uint8)  # packed, in first-draw order
    batch = max(4096, min(250_000, 2 * n))
    cum = np.cumsum(np.exp(logw))
    cum /= cum[-1]
    for _ in range(1000):
        m = rng.integers(min_pos, max_pos + 1, size=batch)
        if num_labels <= 256:
            # Gumbel top-m: m labels without replacement, probabilities proportional to the weights
            keys = (logw[None, :] + rng.gumbel(size=(batch, num_labels))).astype(np.float32)
            top = np.argpartition(-keys, max_pos - 1, axis=1)[:, :max_pos]  # the max_pos largest keys
            order = np.argsort(-np.take_along_axis(keys, top, 1), axis=1)
            top = np.take_along_axis(top, order, 1)
            x = np.zeros((batch, num_labels), dtype=np.uint8)
            rows = np.repeat(np.arange(batch), m)
            cols = top[np.arange(max_pos)[None, :] < m[:, None]]
            x[rows, cols] = 1
        else:
            # The same distribution without an (n, L) key matrix: draw labels one at a time
            # from the weights, skipping repeats, until m distinct; rows that run out of
            # draws are dropped (rejection keeps the distribution exact).
            x = np.zeros((batch, num_labels), dtype=np.uint8)
            count = np.zeros(batch, dtype=np.int64)
            draws = np.searchsorted(cum, rng.random((batch, 4 * max_pos)))
            for j in range(draws.shape[1]):
                need = np.flatnonzero((count < m) & (x[np.arange(batch), draws[:, j]] == 0))
                x[need, draws[need, j]] = 1
                count[need] += 1
            x = x[count == m]
        both = np.concatenate([distinct, np.packbits(x, axis=1)])
        _, first = np.unique(both, axis=0, return_index=True)
        distinct = both[np.sort(first)]
        if len(distinct) >= n:
            return np.unpackbits(distinct[:n], axis=1, count=num_labels)
    raise RuntimeError(f"could not draw {n} distinct label sets over {num_labels} labels")


def exact_kth(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact k-th smallest squared distance to a row other than the query itself."""
    codes = pack_bits(base)
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    dist, _ = index.search(pack_bits(queries), k + 1)  # rows are distinct: one 0 (itself)
    return dist[:, k].astype(np.int64)


def recall(base: np.ndarray, qrows: np.ndarray, nbrs: np.ndarray, kth: np.ndarray) -> float:
    q = base[qrows].astype(np.int16)
    ok = 0
    for i, row in enumerate(qrows):
        valid = nbrs[i] >= 0
        d = (np.abs(base[nbrs[i][valid]].astype(np.int16) - q[i]) ).sum(1)
        ok += int((d <= kth[i]).sum())
    return ok / nbrs.size


def run_kind(kind: str, base: np.ndarray, k: int, overrides: dict) -> tuple[np.ndarray, float, float, dict]:
    n = len(base)
    t0 = time.perf_counter()
    if kind == "exact":
        nbrs, _ = _exact(base, base, k)
        t = time.perf_counter() - t0
        return nbrs, 0.0, t, {}
    params = (ivf_params if kind == "ivf" else hnsw_params)(n, k, base.shape[1])
    params.update({key: v for key, v in overrides.items() if key in params})
    searcher = make_searcher(base, params)
    t1 = time.perf_counter()
    idx, dist = searcher.search(base, min(n, params["window"]))
    nbrs, _ = _rerank(idx, dist, k)
    t2 = time.perf_counter()
    return nbrs, t1 - t0, t2 - t1, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--labels", type=int, nargs="+", default=[80, 1000])
    ap.add_argument("--kinds", nargs="+", default=["exact", "ivf", "hnsw"], choices=["exact", "ivf", "hnsw"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000, help="recall sample size")
    ap.add_argument("--exact-max", type=int, default=AUTO_EXACT_MAX, help="skip exact search above this size")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="skip hnsw above this size")
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--ef-search", type=int, default=None)
    ap.add_argument("--window", type=int, default=None, help="candidates re-ranked per query")
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="folder to keep generated label sets in between runs")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    overrides = {key: v for key, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search), ("window", args.window)) if v}

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, k = {args.k}, recall sample {args.queries}")
    header = f"{'labels':>6} {'n':>9} {'kind':>5} {'build s':>8} {'query s':>8} {'total s':>8} {'cpu s':>8} {'recall@k':>8}  params"
    print(header)
    print("-" * len(header))
    for num_labels in args.labels:
        for n in args.sizes:
            t0 = time.perf_counter()
            cached = Path(args.cache) / f"label_sets_{num_labels}_{n}_{args.seed}.npy" if args.cache else None
            if cached and cached.exists():
                base = np.load(cached)
            else:
                base = label_sets(n, num_labels, seed=args.seed)
                if cached:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.save(cached, base)
            gen_s = time.perf_counter() - t0
            rng = np.random.default_rng(args.seed + 1)
            qrows = np.sort(rng.choice(n, min(n, args.queries), replace=False))
            kth = exact_kth(base, base[qrows], args.k)
            pos = base.sum(1)
            print(f"# {num_labels} labels, {n} distinct sets (generated in {gen_s:.1f}s; positives per set "
                  f"mean {pos.mean():.2f}; labels used {int((base.sum(0) > 0).sum())})", flush=True)
            for kind in args.kinds:
                if (kind == "exact" and n > args.exact_max) or (kind == "hnsw" and n > args.hnsw_max):
                    print(f"{num_labels:>6} {n:>9} {kind:>5} {'skipped':>8}")
                    continue
                cpu0 = time.process_time()
                nbrs, build_s, query_s, params = run_kind(kind, base, args.k, overrides)
                cpu_s = time.process_time() - cpu0
                r = recall(base, qrows, nbrs[qrows], kth)
                shown = {key: v for key, v in params.items() if key != "kind"}
                print(f"{num_labels:>6} {n:>9} {kind:>5} {build_s:>8.2f} {query_s:>8.2f} {build_s + query_s:>8.2f} {cpu_s:>8.1f} {r:>8.4f}  {shown}", flush=True)


if __name__ == "__main__":
    main()
