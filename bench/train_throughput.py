"""Training / extraction throughput: the data pipeline against the model alone.

Prints, for one backbone, image size and batch size:
  (a) training img/s on synthetic tensors (model only) vs end-to-end from an LMDB store
      through the project's loader (retdmctl.training.sources.PixelSource, one DataLoader
      per epoch as the training loop uses it) and the same training step; their ratio;
  (b) the same for feature extraction (eval transform, no grad) vs model-only inference;
  (c) a metric-stage epoch (RETDM label net + heads, metric_and_rec) on a feature cache
      (CachedSource) vs the same epoch with the frozen CNN computing f in the loop.
Loader variants: PixelSource with workers 0 and the configured default (2), and
retdmctl.data.prefetch.ThreadedPixelSource (a background decode thread).

It builds its own LMDB store in a temp dir from /work/shared/data/scene/images when
present (the first --images files), else from generated JPEGs (384x256, like scene).
Timings: median over --repeats runs of --steps batches each, after a warm-up batch; the
variants are run interleaved so that they share the background load of a shared machine.

    python bench/train_throughput.py                      # Lite0, 224 px, batch 32, CPU
    python bench/train_throughput.py --backbone tiny_cnn --image-size 64 --steps 2
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retdmctl.data.prefetch import ThreadedPixelSource  # noqa: E402
from retdmctl.data.store import ImageReader, ImageWriter  # noqa: E402
from retdmctl.knn import build_graph  # noqa: E402
from retdmctl.losses.retdm import reconstruction_loss, two_way_metric_loss  # noqa: F401,E402
from retdmctl.models.backbones import build_backbone  # noqa: E402
from retdmctl.models.retdm import RETDM  # noqa: E402
from retdmctl.training.common import load_state, MetricSampler, metric_and_rec  # noqa: E402
from retdmctl.training.runtime import autocast, prepare_model, to_device  # noqa: E402
from retdmctl.training.sources import CachedSource, PixelSource  # noqa: E402

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scene"
if not SCENE.exists():
    SCENE = Path("/work/shared/data/scene")


def build_store(root: Path, n: int, seed: int) -> SimpleNamespace:
    """An LMDB store of n JPEGs (scene's if available) and their labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids, blobs, labels = [], [], []
    if (SCENE / "images").is_dir() and (SCENE / "labels.csv").is_file():
        lines = (SCENE / "labels.csv").read_text().strip().splitlines()[1:]
        for line in lines[:n]:
            name, *vals = line.split(",")
            ids.append(name)
            blobs.append((SCENE / "images" / name).read_bytes())
            labels.append([int(v) for v in vals])
        source = f"scene ({len(ids)} images)"
    else:
        for i in range(n):
            arr = (rng.random((256, 384, 3)) * 64 + np.linspace(0, 190, 384)[None, :, None]).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            ids.append(f"img{i}")
            blobs.append(buf.getvalue())
            labels.append((rng.random(5) < 0.3).astype(int).tolist())
        source = f"generated ({n} JPEGs 384x256)"
    writer = ImageWriter(root / "images.lmdb")
    writer.put_many(zip(ids, blobs))
    writer.close()
    lab = np.array(labels, dtype=np.uint8)
    lab[lab.sum(1) == 0, 0] = 1
    return SimpleNamespace(ids=ids, labels=lab, lmdb=root / "images.lmdb", source=source, num_classes=lab.shape[1])


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the runs interleaved (A B C A B C ...) so that
    every variant sees the same background load on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="batches per timed run (an 'epoch' of steps*batch images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="PixelSource worker counts to try")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "extract", "metric"])
    args = ap.parse_args()

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="retdm-bench-")
    data = build_store(Path(tmp.name), max(args.images, args.batch_size * (args.steps + 1)), 0)
    backbone, spec = build_backbone(args.backbone, pretrained=False)
    model = prepare_model(RETDM(data.num_classes, spec.out_dim, backbone=backbone), device)
    bs, steps = args.batch_size, args.steps
    n_img = bs * steps
    rows = np.arange(n_img)
    print(f"{args.backbone} at {args.image_size} px, batch {bs}, {steps} steps x {args.repeats} repeats, "
          f"device {device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, store: {data.source}, "
          f"load average {os.getloadavg()[0]:.1f}")
    results: list[tuple[str, float, str]] = []

    def row(name: str, seconds: float, images: int, ref: float | None = None) -> float:
        rate = images / seconds
        ratio = f"{rate / ref:6.1%}" if ref else ""
        results.append((name, rate, ratio))
        print(f"  {name:<44} {rate:9.1f} img/s  {ratio}", flush=True)
        return rate

    # One LMDB environment per process: py-lmdb refuses to open the same path twice.
    reader = ImageReader(data.lmdb)

    def shared(src):
        src.reader = reader
        return src

    def sources():
        for w in args.workers:
            yield f"PixelSource workers={w}", shared(PixelSource(data.lmdb, data, spec, args.image_size, bs, w))
        yield "ThreadedPixelSource (1 thread)", shared(ThreadedPixelSource(data.lmdb, data, spec, args.image_size, bs))

    if "train" not in args.skip:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def step(x, y):
            with autocast(device):
                loss = loss_fn(model(to_device(x, device)).float(), to_device(y, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.train()
        xs = torch.randn(bs, 3, args.image_size, args.image_size)
        ys = torch.from_numpy(data.labels[:bs].astype(np.float32))
        step(xs, ys)  # warm-up

        def synth():
            for _ in range(steps):
                step(xs, ys)
            if device.type == "cuda":
                torch.cuda.synchronize()

        print("training step")
        fns = {"model only (synthetic tensors)": synth}
        for name, src in sources():
            def epoch(src=src):
                for x, y, _ in src.train_batches(rows, 0):
                    step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            fns[f"end-to-end, {name}"] = epoch
        med = interleaved(fns, args.repeats)
        ref = None
        for name, t in med.items():
            rate = row(name, t, n_img, ref)
            ref = ref or rate

    if "extract" not in args.skip:
        model.eval()
        feats = prepare_model(backbone, device).eval()
        xs = torch.randn(bs, 3, args.image_size, args.image_size)

        @torch.no_grad()
        def synth_inf():
            for _ in range(steps):
                with autocast(device):
                    feats(to_device(xs, device)).float().cpu()

        synth_inf()
        print("feature extraction (inference)")
        fns = {"model only (synthetic tensors)": synth_inf}
        for name, src in sources():
            @torch.no_grad()
            def extract(src=src):
                for x, _, _ in src.eval_batches(rows):
                    with autocast(device):
                        feats(to_device(x, device)).float().cpu()
            fns[f"extraction, {name}"] = extract
        med = interleaved(fns, args.repeats)
        ref = None
        for name, t in med.items():
            rate = row(name, t, n_img, ref)
            ref = ref or rate

    if "metric" not in args.skip:
        print("metric-stage epoch (label net + heads; phi frozen)")
        model.eval()
        n_all = len(data.ids)
        all_rows = np.arange(n_all)
        with torch.no_grad():
            cache = torch.cat([model.backbone(to_device(x, device)).float().cpu()
                               for x, _, _ in shared(PixelSource(data.lmdb, data, spec, args.image_size, bs, 0)).eval_batches(all_rows)])
        graph = build_graph(data.labels, all_rows, k=min(10, len(np.unique(data.labels, axis=0)) - 1))
        info = SimpleNamespace(ids=data.ids, labels=data.labels)
        sampler = MetricSampler.build(graph, info, np.array([], dtype=np.int64))
        loss_cfg = SimpleNamespace(lam=1.0, margin=0.0)
        heads = RETDM(data.num_classes, spec.out_dim).to(device)
        load_state(heads, {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}, "bench heads")
        opt = torch.optim.SGD(heads.label_parameters(), lr=1e-3, momentum=0.9)
        f_bank_raw = cache.to(device)
        with torch.no_grad():
            f_bank = heads.embed_images(f_bank_raw)

        def metric_step(f, y, r, rng):
            metric, rec = metric_and_rec(heads, f, y, r, sampler, f_bank, rng, loss_cfg)
            loss = metric + rec
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        cached = CachedSource(cache.numpy(), info, bs)

        def cached_epoch():
            rng = np.random.default_rng(0)
            for x, y, r in cached.train_batches(all_rows, 0):
                with torch.no_grad():
                    f = heads.embed_images(to_device(x, device))
                metric_step(f, to_device(y, device), r, rng)

        pixels = shared(ThreadedPixelSource(data.lmdb, data, spec, args.image_size, bs))

        def cnn_epoch():
            rng = np.random.default_rng(0)
            for x, y, r in pixels.train_batches(all_rows, 0):
                with torch.no_grad(), autocast(device):
                    f = heads.embed_images(model.backbone(to_device(x, device))).float()
                metric_step(f, to_device(y, device), r, rng)

        heads.train()
        cached_epoch()
        t_cache = timed(cached_epoch, max(args.repeats, 5))
        t_cnn = timed(cnn_epoch, 1)
        print(f"  epoch of {n_all} images on the feature cache   {t_cache * 1000:9.1f} ms ({n_all / t_cache:,.0f} img/s)")
        print(f"  epoch of {n_all} images with the CNN in the loop {t_cnn * 1000:9.1f} ms ({n_all / t_cnn:,.1f} img/s)")
        print(f"  cache speed-up: {t_cnn / t_cache:,.0f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
    reader.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
