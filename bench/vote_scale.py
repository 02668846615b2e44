"""Benchmark the neighbour vote's search against the bank size (retdmctl.fusion.search):
time per query of the exact search (the product's blocked PyTorch matmul + top-k, and
FAISS IndexFlatIP for comparison) and of the IVF index, its build time and its
recall@40 (40 = the largest k of fusion.GRID) against the exact result; then the
checkpoint and ONNX sizes of a vote per 10^5 training images.

Embeddings (``embeddings``): 512-d, drawn like a trained model's: each image has 1-6 of
80 labels (Zipf-like frequencies, 2.9 on average), and its embedding is the normalised
sum of its labels' centres, plus a "scene" prototype (one of 2,000, Zipf-like), plus a
64-dimensional within-class variation, plus a little isotropic noise. Neighbours are
then mostly images with the same labels and scene, at cosine ~0.9, against ~0.3 for
random pairs (printed), so a miss of the IVF is a real near neighbour lost. Queries are
further images of the same world (held out from the bank). Seeded: the same numbers
every run, up to timing.

Times are per query in batches of 64 (eval's batch size), on however many threads
PyTorch and FAISS use (all cores). The IVF is the product's (``train_ivf`` +
``ivf_index``: nlist ~ sqrt(N), float16 lists); its nprobe is varied, ``*`` marks the product's.

    python bench/vote_scale.py                       # 10^3 .. 10^6 (about 3.5 minutes on 2 cores)
    python bench/vote_scale.py --sizes 1000 10000    # a quick run
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retdmctl.fusion import GRID, NeighbourVote  # noqa: E402
from retdmctl.fusion.search import EXACT_MAX, exact_top, ivf_index, ivf_nprobe, ivf_top, normalize, train_ivf  # noqa: E402

DIM, CLASSES, SCENES, RANK = 512, 80, 2000, 64
K = max(GRID["k"])
BATCH = 64


def _world(dim: int):
    rng = np.random.default_rng(12345)  # the same classes and scenes for bank and queries

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return (unit(rng.normal(size=(dim,))), unit(rng.normal(size=(CLASSES, dim))), unit(rng.normal(size=(SCENES, dim))),
            rng.normal(size=(RANK, dim)) / math.sqrt(dim))


def embeddings(n: int, seed: int, dim: int = DIM, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float16 embeddings and their (n, CLASSES) uint8 labels (see the module doc)."""
    mean, centres, scenes, basis = _world(dim)
    cls_p = 1.0 / np.arange(1, CLASSES + 1) ** 0.8
    cls_p /= cls_p.sum()
    scene_p = 1.0 / np.arange(1, SCENES // CLASSES + 1) ** 0.6
    scene_p /= scene_p.sum()
    out = np.empty((n, dim), dtype=np.float16)
    labels = np.zeros((n, CLASSES), dtype=np.uint8)
    for c, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, c])
        m = min(n - start, chunk)
        count = np.minimum(1 + rng.poisson(1.9, size=m), 6)
        # labels without replacement, by the Gumbel top-m trick: the count largest keys
        order = np.argsort(-(np.log(cls_p) + rng.gumbel(size=(m, CLASSES))), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(CLASSES)[None, :], axis=1)
        labels[start : start + m] = rank < count[:, None]
        y = labels[start : start + m].astype(np.float32)
        label_part = y @ centres
        label_part /= np.linalg.norm(label_part, axis=1, keepdims=True)
        # a scene of the image's first (most frequent) label: SCENES // CLASSES per label
        per = SCENES // CLASSES
        first = np.argmax(labels[start : start + m], axis=1)
        scene = scenes[first * per + rng.choice(per, size=m, p=scene_p)]
        within = rng.normal(size=(m, RANK)) @ basis / math.sqrt(RANK)  # norm ~1, like noise
        noise = rng.normal(size=(m, dim)) / math.sqrt(dim)
        out[start : start + m] = 0.8 * mean + label_part + 0.5 * scene + 0.35 * within + 0.15 * noise
    return out, labels


def per_query(fn, queries: torch.Tensor) -> float:
    """ms per query, in batches of :data:`BATCH`."""
    t0 = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        fn(queries[s : s + BATCH])
    return (time.perf_counter() - t0) * 1e3 / len(queries)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def bench_size(n: int, n_queries: int) -> None:
    t0 = time.perf_counter()
    bank16, _ = embeddings(n, seed=1)
    queries = normalize(torch.from_numpy(embeddings(n_queries, seed=2)[0]))
    gen = time.perf_counter() - t0
    bank = torch.from_numpy(bank16)
    unit = normalize(bank)
    with torch.no_grad():
        t_exact = per_query(lambda q: exact_top(q, unit, K), queries)
        sims, truth = exact_top(queries, unit, K)
    rand = float((queries[:256] @ unit[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]].T).mean())
    flat = faiss.IndexFlatIP(DIM)
    flat.add(np.ascontiguousarray(unit.numpy()))
    del unit
    qn = np.ascontiguousarray(queries.numpy())
    t_flat = per_query(lambda q: flat.search(q.numpy(), K), queries)
    del flat
    t0 = time.perf_counter()
    search = train_ivf(bank)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = ivf_index(bank, search)
    t_add = time.perf_counter() - t0
    truth = truth.numpy()
    probes = sorted({p for p in (4, 8, 16, 32, 64, 128, 256) if p <= search["nlist"]} | {search["nprobe"]})
    cells = []
    for p in probes:
        index.nprobe = p
        t = per_query(lambda q: ivf_top(index, q, K), queries)
        _, idx = index.search(qn, K)
        mark = "*" if p == search["nprobe"] else ""
        cells.append(f"{p}{mark}: {t:.3f} ms {recall(idx, truth):.3f}")
    print(f"| {n:,} | {t_exact:.3f} | {t_flat:.3f} | {search['nlist']} | {t_train:.1f} + {t_add:.1f} | "
          f"{'; '.join(cells)} | {float(sims[:, 0].mean()):.2f} / {float(sims[:, -1].mean()):.2f} / {rand:.2f} | {gen:.0f} |",
          flush=True)


def footprint(n: int = 100_000) -> None:
    """Checkpoint and ONNX bytes of a vote over ``n`` training images (512-d, 80 labels)."""
    bank16, labels = embeddings(n, seed=1)
    saved = {"bank": torch.from_numpy(bank16), "labels": torch.from_numpy(labels),
             "rows": torch.arange(n, dtype=torch.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vote.pt"
        torch.save(saved, path)
        exact = path.stat().st_size
        torch.save({**saved, "search": train_ivf(saved["bank"])}, path)
        ivf = path.stat().st_size
        vote = NeighbourVote(saved["bank"].float(), saved["labels"], saved["rows"], K, 0.1, 0.3)

        class Fused(torch.nn.Module):  # what the exported network adds: f, p -> fused p
            def __init__(self):
                super().__init__()
                self.vote = vote

            def forward(self, f, p):
                return self.vote(f, p)

        onnx_path = Path(tmp) / "vote.onnx"
        args = (torch.randn(2, DIM), torch.rand(2, CLASSES))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Fused(), args, str(onnx_path), input_names=["f", "p"], output_names=["q"],
                              dynamic_axes={"f": {0: "b"}, "p": {0: "b"}, "q": {0: "b"}}, opset_version=17,
                              do_constant_folding=True, dynamo=False)
        onnx_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name != "vote.pt")  # external files too
    mb = 1e6
    print(f"\nper {n:,} training images ({DIM}-d, {CLASSES} labels):")
    print(f"| checkpoint, exact (float16 bank + uint8 labels + int64 rows) | {exact / mb:.1f} MB |")
    print(f"| checkpoint, IVF (+ centroids and each image's list) | {ivf / mb:.1f} MB |")
    print(f"| ONNX, the vote's constants (float32 bank and labels) | {onnx_bytes / mb:.1f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--no-footprint", action="store_true")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads; k = {K}; queries in batches of {BATCH}; "
          f"the product searches exactly below {EXACT_MAX:,} bank images, IVF from there")
    print("| bank | exact torch ms/q | exact FAISS flat ms/q | nlist | IVF build s (k-means + lists) | "
          "IVF nprobe: ms/q recall@40 | cos top-1 / top-40 / random | generate s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        bench_size(n, args.queries)
    if not args.no_footprint:
        footprint()


if __name__ == "__main__":
    main()
