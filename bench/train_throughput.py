"""Training / extraction throughput: the data pipeline against the model alone.

Prints, for one backbone, image size and batch size (each row with the median 1-minute
load average while it was measured):
  (a) training img/s on synthetic tensors (model only) vs end-to-end from an LMDB store
      through the project's loader (retdmctl.sources.PixelSource, one DataLoader
      per epoch as the training loop uses it) and the same training step; their ratio;
  (b) feature extraction through the product's own function
      (retdmctl.sources.extract_backbone_features: PixelSource.eval_batches, the
      backbone, the float16 HDF5 cache) vs model-only inference on synthetic tensors;
  (c) a metric-stage epoch as the stage runs it (retdmctl.training.loop.fit, one epoch:
      the training steps of metric_and_rec on psi and W_r, the validation pass and the
      resume point; 1 torch thread, set_threads(cnn=False)) on the cache of f, vs the
      same epoch with the frozen CNN computing f from pixels in the loop (all cores), at
      the metric stage's batch size (metric.batch_size = 256) and at --batch-size.
Loader variants for (a) and (b): PixelSource with workers 0 (runtime.workers = auto on
the CPU) and 2; for (a) also retdmctl.data.prefetch.ThreadedPixelSource.

It builds its own LMDB store in a temp dir from /work/shared/data/scene/images when
present (the first --images files), else from generated JPEGs (384x256, like scene).
Timings: median over --repeats runs (of --steps batches each for (a) and (b), of a whole
epoch over the store for (c)), after a warm-up; the variants are run interleaved so that
they share the background load of a shared machine.

    python bench/train_throughput.py                      # Lite0, 224 px, batch 32, CPU
    python bench/train_throughput.py --backbone tiny_cnn --image-size 64 --steps 2 --images 96
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
from retdmctl.config import MetricConfig  # noqa: E402
from retdmctl.model_io.checkpoint import load_state  # noqa: E402
from retdmctl.training.sampler import MetricSampler, metric_and_rec  # noqa: E402
from retdmctl.training.loop import fit  # noqa: E402
from retdmctl.allocator import tune_allocator  # noqa: E402
from retdmctl.runtime import autocast, decode_threads, prepare_model, set_threads, to_device  # noqa: E402
from retdmctl.sources import CachedSource, PixelSource, extract_backbone_features  # noqa: E402

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


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
    """(median seconds, median 1-minute load average after a run, fastest run's seconds) of each function, the
    runs interleaved (A B C A B C ...) so that every variant sees the same background
    load on a shared machine. A value (fn, n) runs fn n times per round (cheap variants)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    loads: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn, n = fn if isinstance(fn, tuple) else (fn, 1)
            for _ in range(n):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                loads[name].append(os.getloadavg()[0])
    return {name: (statistics.median(times[name]), statistics.median(loads[name]), min(times[name])) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="batches per timed run (an 'epoch' of steps*batch images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="images in the store; (c)'s epoch runs over all of them")
    ap.add_argument("--metric-batch-sizes", type=int, nargs="+", default=None,
                    help="batch sizes of (c) (default: metric.batch_size's default and --batch-size)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="PixelSource worker counts to try")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "extract", "metric"])
    args = ap.parse_args()

    os.environ.setdefault("RETDM_NO_PROGRESS", "1")  # extract_backbone_features' bar: noise in a log
    allocator = tune_allocator()  # as the CLI does: it speeds up the model alone too (RETDM_MALLOC=system: off)
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
          f"load average {os.getloadavg()[0]:.1f}, malloc {'tuned (retdmctl.allocator)' if allocator else 'system'}")
    cores = args.threads or os.cpu_count() or 1

    def report(med: dict[str, tuple[float, float, float]], images: int) -> None:
        """Per variant: img/s of the median run, its ratio to the first variant (the
        model alone), the same ratio for the fastest runs, the load average."""
        print(f"  {'':<70} {'img/s':>9}  {'ratio':>7}  {'(best)':>7}")
        ref = None
        for name, (t, load, best) in med.items():
            ratio = f"{ref[0] / t:7.1%}  {ref[1] / best:7.1%}" if ref else " " * 16
            print(f"  {name:<70} {images / t:9.1f}  {ratio}  load {load:4.1f}", flush=True)
            ref = ref or (t, best)

    # One LMDB environment per process: py-lmdb refuses to open the same path twice.
    reader = ImageReader(data.lmdb)

    def shared(src):
        src.reader = reader
        return src

    def pixel_sources():
        for w in args.workers:
            default = " (default on the CPU)" if w == 0 else ""
            src = shared(PixelSource(data.lmdb, data, spec, args.image_size, bs, w))
            src.decode_threads = decode_threads(device)  # as the product sets it
            yield f"PixelSource workers={w}{default}", src

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

        print("(a) training step")
        fns = {"model only (synthetic tensors)": synth}
        variants = [*pixel_sources(), ("ThreadedPixelSource (1 thread)",
                                       shared(ThreadedPixelSource(data.lmdb, data, spec, args.image_size, bs)))]
        for name, src in variants:
            def epoch(src=src):
                for x, y, _ in src.train_batches(rows, 0):
                    step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            fns[f"end-to-end, {name}"] = epoch
        report(interleaved(fns, args.repeats), n_img)

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
        print("(b) feature extraction (inference)")
        fns = {"model only (synthetic tensors)": synth_inf}
        sub = SimpleNamespace(ids=data.ids[:n_img], labels=data.labels[:n_img])  # the timed images
        for name, src in pixel_sources():
            src.info = sub

            def extract(src=src):
                out = Path(tmp.name) / "features.h5"
                extract_backbone_features(out, feats, src, {"bench": 1}, device, autocast(device))
                out.unlink()
            fns[f"extract_backbone_features, {name}"] = extract
        report(interleaved(fns, args.repeats), n_img)

    if "metric" not in args.skip:
        metric_stage(args, data, model, spec, device, Path(tmp.name), shared, cores)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
    reader.close()
    tmp.cleanup()


def metric_stage(args, data, model: RETDM, spec, device, tmp: Path, shared, cores: int) -> None:
    """(c): one metric-stage epoch through ``fit`` on the cache of f vs with the CNN in the loop."""
    import io

    from rich.console import Console

    model.eval()
    n_all = len(data.ids)
    all_rows = np.arange(n_all)
    val_rows = all_rows[4::5]  # a fifth for validation, as the stage has its val split
    train_rows = np.setdiff1d(all_rows, val_rows)
    info = SimpleNamespace(ids=data.ids, labels=data.labels)
    torch.set_num_threads(cores)
    pixels = shared(PixelSource(data.lmdb, info, spec, args.image_size, args.batch_size, 0))
    # f = phi(x) of every image, kept as classifier/features.h5 keeps it (float16)
    with torch.no_grad():
        f_all = torch.cat([model.embed_images(to_device(x, device)).float().cpu() for x, _, _ in pixels.eval_batches(all_rows)])
    features = f_all.half().float().numpy()
    f_bank = torch.from_numpy(features).to(device)
    k = min(10, len(np.unique(data.labels[train_rows], axis=0)) - 1)
    graph = build_graph(data.labels, train_rows, k=k)
    sampler = MetricSampler.build(graph, info, val_rows)
    loss_cfg = SimpleNamespace(alpha=1.0, beta=1.0, lam=1.0, margin=0.0)
    heads = RETDM(data.num_classes, spec.out_dim).to(device)
    load_state(heads, {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}, "bench heads")
    initial = {k: v.clone() for k, v in heads.state_dict().items()}
    console = Console(file=io.StringIO())

    def phi(x):  # the frozen CNN in the loop
        with torch.no_grad(), autocast(device):
            return model.embed_images(x).float()

    def run_epoch(batch_size: int, cnn: bool) -> None:
        # the stage's own step and validation (stages/metric.py), f from the cache or the CNN
        source = PixelSource(data.lmdb, info, spec, args.image_size, batch_size, 0) if cnn else CachedSource(features, info, batch_size)
        if cnn:
            shared(source)
        a, b = loss_cfg.alpha, loss_cfg.beta

        def step(x, y, r, rng):
            f = phi(x) if cnn else x
            metric, rec = metric_and_rec(heads, f, y, r, sampler, f_bank, rng, loss_cfg)
            loss = a * metric + b * rec
            return loss, {"total": float(loss.detach()), "metric": float(metric.detach()), "rec": float(rec.detach())}

        def validate():
            rng = np.random.default_rng([0, 999])
            total, n = 0.0, 0
            for x, y, r in source.eval_batches(val_rows):
                x, y = to_device(x, device), y.to(device)
                metric, rec = metric_and_rec(heads, phi(x) if cnn else x, y, r, sampler, f_bank, rng, loss_cfg)
                total += float(a * metric + b * rec) * len(r)
                n += len(r)
            return {"val_loss": total / max(n, 1)}

        if cnn:
            torch.set_num_threads(cores)
        else:
            set_threads(cnn=False)  # what the metric stage runs with
        heads.load_state_dict(initial)
        stage_dir = tmp / "metric"
        stage_dir.mkdir(exist_ok=True)
        (stage_dir / "resume.pt").unlink(missing_ok=True)
        fit(name="metric", stage_dir=stage_dir, model=heads, params=heads.label_parameters(),
            schedule=MetricConfig(epochs=1, batch_size=batch_size), source=source, train_rows=train_rows,
            step=step, validate=validate, device=device, resume_key={}, console=console)
        torch.set_num_threads(cores)

    print(f"(c) metric-stage epoch over {n_all} images ({len(train_rows)} train, {len(val_rows)} val; "
          "psi and W_r trained, phi frozen)")
    for mb in args.metric_batch_sizes or [MetricConfig().batch_size, args.batch_size]:
        run_epoch(mb, cnn=False)  # warm-up
        med = interleaved({"cache": (lambda mb=mb: run_epoch(mb, cnn=False), 5),
                           "cnn": lambda mb=mb: run_epoch(mb, cnn=True)}, max(2, args.repeats - 1))
        (t_cache, l_cache, _), (t_cnn, l_cnn, _) = med["cache"], med["cnn"]
        print(f"  batch {mb:>3}: epoch on the cache of f (1 thread)      {t_cache * 1000:9.1f} ms {n_all / t_cache:9.1f} img/s  load {l_cache:4.1f}")
        print(f"  batch {mb:>3}: epoch with the CNN in the loop ({cores} threads) {t_cnn * 1000:9.1f} ms {n_all / t_cnn:9.1f} img/s  load {l_cnn:4.1f}")
        print(f"  batch {mb:>3}: cache speed-up {t_cnn / t_cache:,.0f}x", flush=True)

if __name__ == "__main__":
    main()
