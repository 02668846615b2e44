"""Ingest throughput against the plain PIL rate, measured in the same run.

Generates N realistic JPEGs (500x375, shapes + gradients + sensor-like noise, so they are
not trivially compressible), then measures

* plain: a ``multiprocessing.Pool`` of P processes doing PIL open + RGB + resize to the
  target shorter side + JPEG encode, nothing else (run before and after ingest; the mean
  of the two is the reference);
* ingest: the real ``run_ingest`` on a csv source with the same P, short side and
  quality, everything included (reading the labels, worker start, LMDB writes with
  their commits, dataset.h5, the final rename).

Usage: python bench/ingest.py [--images 3000] [--processes P] [--short-side 256] [--quality 90]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETDM_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from rich.console import Console

from retdmctl.config import IngestConfig
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.csvfile import read_csv_labels
from retdmctl.workspace import Workspace

SIZE = (500, 375)
TARGET = 0.80


_NOISE: list[np.ndarray] = []  # filled in the parent, shared with the forked workers


def _noise_bank() -> None:
    rng = np.random.default_rng(12345)
    w, h = SIZE
    _NOISE[:] = [rng.normal(0, 10, (h + 64, w + 64, 3)).astype(np.int16) for _ in range(4)]


def make_image(args: tuple[Path, int]) -> int:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = SIZE
    base = rng.uniform(40, 200, 3).astype(np.float32)
    sx, sy = rng.uniform(-0.25, 0.25, (2, 3)).astype(np.float32)
    bg = base + np.arange(w, dtype=np.float32)[None, :, None] * sx + np.arange(h, dtype=np.float32)[:, None, None] * sy
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-50, w), rng.uniform(-50, h)
        x1, y1 = x0 + rng.uniform(20, 220), y0 + rng.uniform(20, 180)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    img = img.filter(ImageFilter.BoxBlur(1))
    dy, dx = (int(v) for v in rng.integers(0, 64, 2))
    noise = _NOISE[seed % len(_NOISE)][dy : dy + h, dx : dx + w]
    noisy = np.asarray(img, dtype=np.int16) + noise
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def plain(args: tuple[Path, int, int]) -> int:
    """The reference: decode, convert, resize, encode. No draft mode, no bookkeeping."""
    path, short_side, quality = args
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if min(w, h) > short_side:
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return len(out.getvalue())


def time_plain(paths: list[Path], processes: int, short_side: int, quality: int) -> float:
    tasks = [(p, short_side, quality) for p in paths]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(processes) as pool:
        chunk = max(1, min(16, len(tasks) // (processes * 8)))
        total = sum(pool.imap_unordered(plain, tasks, chunksize=chunk))
    elapsed = time.perf_counter() - start
    assert total > 0
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--short-side", type=int, default=IngestConfig.short_side)
    ap.add_argument("--quality", type=int, default=IngestConfig.jpeg_quality)
    args = ap.parse_args()
    n, p = args.images, args.processes

    with tempfile.TemporaryDirectory(prefix="retdm-bench-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        paths = [images / f"{i:05d}.jpg" for i in range(n)]
        t = time.perf_counter()
        _noise_bank()
        with mp.get_context("fork").Pool(p) as pool:
            sizes = pool.map(make_image, [(path, i) for i, path in enumerate(paths)], chunksize=16)
        print(
            f"generated {n} JPEGs of {SIZE[0]}x{SIZE[1]} (mean {np.mean(sizes) / 1024:.0f} KiB) "
            f"in {time.perf_counter() - t:.1f}s; {p} processes, short side {args.short_side}, "
            f"quality {args.quality}"
        )
        rng = np.random.default_rng(0)
        classes = [f"c{i}" for i in range(10)]
        labels = root / "labels.csv"
        labels.write_text(
            "".join(f"{path.name},{'|'.join(rng.choice(classes, 2, replace=False))}\n" for path in paths)
        )

        plain_before = time_plain(paths, p, args.short_side, args.quality)
        cfg = IngestConfig(
            source="csv", path=str(labels), images=str(images), workers=p,
            short_side=args.short_side, jpeg_quality=args.quality,
        )  # fmt: skip
        t = time.perf_counter()
        summary = run_ingest(read_csv_labels(labels, images), Workspace(root / "work"), cfg, Console(file=io.StringIO()))
        ingest_s = time.perf_counter() - t
        assert summary["images"] == n and summary["skipped"] == 0, summary
        plain_after = time_plain(paths, p, args.short_side, args.quality)

    plain_s = (plain_before + plain_after) / 2
    rows = [
        ("plain PIL (before)", plain_before),
        ("plain PIL (after)", plain_after),
        ("plain PIL (mean)", plain_s),
        ("retdmctl ingest", ingest_s),
    ]
    print()
    print(f"| {'method':<20} | {'processes':>9} | {'images':>6} | {'seconds':>7} | {'images/s':>8} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
    for name, sec in rows:
        print(f"| {name:<20} | {p:>9} | {n:>6} | {sec:>7.2f} | {n / sec:>8.1f} |")
    ratio = plain_s / ingest_s
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(f"\ningest / plain = {ratio:.2f} (target >= {TARGET:.2f}): {verdict}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
