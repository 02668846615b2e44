"""Cost of the CLML term (retdmctl.losses.clml) relative to a training step.

Times one CLML forward+backward at batch 64, 80 classes, D = 512 (median and min of 30 runs
after warm-up), for the default Gram/eigvalsh method and for the batched-SVD cross-check, and
compares it with (a) a training step of the frozen-backbone head (RETDM embed
Linear 1280->512 + heads, batch 64, BCE, Adam), (c) a step of the middle way
(model.tune_blocks = 1: the last block of EfficientNet-Lite0, its head convolution and
the same heads on cached trunk activations at 224 px) and (b) a full training step of
EfficientNet-Lite0 + the same head at 224 px, batch 64 (a few steps only: seconds each
on the CPU). Runs on the CPU with 2 threads, and on CUDA too when available. (a) is also
timed over blocks of ``--lazy-every`` k steps with the term on one step of each block
(loss.clml_every = k, lazy regularisation): the last column of that row is the term's
share of the block, min of each figure in the second place.

    python bench/clml_step.py [--full-steps 3] [--no-full] [--lazy-every 16]
    (PYTHONPATH=. when the installed retdmctl is another checkout)

Label density: 4 % per entry (COCO has 2.9 of 80 labels per image) plus one label present
in half the images (COCO's "person"), so the largest label block is about 32 rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from retdmctl.allocator import tune_allocator
from retdmctl.losses.clml import clml_loss
from retdmctl.models.retdm import RETDM

N, C, D, FEAT = 64, 80, 512, 1280


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, runs: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) in ms; on a shared machine the min is the less disturbed figure."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _labels(device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(N, C, generator=g) < 0.04).float()
    y[: N // 2, 0] = 1.0
    return y.to(device)


def clml_ms(device: str, method: str, runs: int) -> tuple[float, float]:
    f = torch.randn(N, D, device=device, requires_grad=True)
    logits = torch.randn(N, C, device=device)
    y = _labels(device)

    def step():
        loss = clml_loss(f, logits, y, epoch=2, lam=1.0, method=method)
        loss.backward()
        f.grad = None

    return _median_ms(step, device, runs)


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()

    return step


def head_ms(device: str, runs: int) -> tuple[float, float]:
    model = RETDM(C, FEAT, D).to(device).train()
    x = torch.randn(N, FEAT, device=device)
    return _median_ms(_train_step_fn(model, x, _labels(device)), device, runs)


def head_lazy_block_ms(device: str, runs: int, every: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(a) measured over blocks of ``every`` steps, as loss.clml_every = k trains them:
    (ms per block without the term, ms per block with it on the block's first step at
    k times its weight). Blocks alternate, so load on the shared CPU hits both alike."""
    model = RETDM(C, FEAT, D).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(N, FEAT, device=device), _labels(device)

    def block(with_clml: bool) -> float:
        _sync(device)
        t = time.perf_counter()
        for i in range(every):
            opt.zero_grad(set_to_none=True)
            f, f_dropped = model.embed_pair(x)
            logits = model.classify(f_dropped)
            loss = F.binary_cross_entropy_with_logits(logits, y)
            if with_clml and i == 0:
                loss = loss + clml_loss(f, logits, y, epoch=2, lam=float(every))
            loss.backward()
            opt.step()
        _sync(device)
        return (time.perf_counter() - t) * 1e3

    for _ in range(2):
        block(False), block(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        times[False].append(block(False))
        times[True].append(block(True))
    return ((statistics.median(times[False]), min(times[False])), (statistics.median(times[True]), min(times[True])))


def tune_ms(device: str, runs: int) -> tuple[float, float]:
    """The middle way (model.tune_blocks = 1, with --views the best CPU variant of
    docs/bench-scene-views.md): the last MBConv block, the head convolution and the heads
    trained on cached trunk activations of 224 px images."""
    from retdmctl.models.backbones import build_backbone

    backbone, spec = build_backbone("efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        acts = backbone.eval().forward_trunk(torch.randn(N, 3, 224, 224), 1)
    model = RETDM(C, spec.out_dim, D, backbone=backbone, tune_blocks=1).to(device).train()
    backbone.requires_grad_(False)
    for module in backbone.tail_modules(1):
        module.requires_grad_(True)
    return _median_ms(_train_step_fn(model, acts.to(device), _labels(device)), device, runs)


def full_ms(device: str, runs: int) -> tuple[float, float]:
    from retdmctl.models.backbones import build_backbone

    backbone, spec = build_backbone("efficientnet_lite0", pretrained=False)
    model = RETDM(C, spec.out_dim, D, backbone=backbone).to(device).train()
    x = torch.randn(N, 3, 224, 224, device=device)
    return _median_ms(_train_step_fn(model, x, _labels(device)), device, runs, warmup=1)


def _pct(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{100 * a[0] / b[0]:.1f} %, {100 * a[1] / b[1]:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--svd-runs", type=int, default=10, help="the SVD method is slow on the CPU")
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the EfficientNet-Lite0 step")
    ap.add_argument("--lazy-every", type=int, default=16, help="(a) also timed with loss.clml_every = K")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tune_allocator()  # as the CLI does

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"CLML term forward+backward: batch {N}, {C} classes, D={D}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes inflate every figure)", flush=True)
    print(f"{'device':<6} {'what':<44} {'median ms':>10} {'min ms':>9} {'CLML(gram) % (median, min)':>27}",
          flush=True)
    for device in devices:
        gram = clml_ms(device, "gram", args.runs)
        svd = clml_ms(device, "svd", args.svd_runs)
        head = head_ms(device, args.runs)
        rows = [("CLML term, gram/eigvalsh (default)", gram, None),
                ("CLML term, batched svdvals (cross-check)", svd, None),
                ("(a) head train step (1280->512 + heads)", head, _pct(gram, head))]
        base_block, lazy_block = head_lazy_block_ms(device, args.runs, args.lazy_every)
        k = args.lazy_every
        lazy_share = (f"{100 * (lazy_block[0] - base_block[0]) / lazy_block[0]:.1f} %, "
                      f"{100 * (lazy_block[1] - base_block[1]) / lazy_block[1]:.1f} %")
        rows += [(f"(a) {k} head steps", base_block, None),
                 (f"(a) {k} head steps, CLML on one (clml_every {k})", lazy_block, lazy_share)]
        tune = tune_ms(device, args.runs)
        rows.append(("(c) tune_blocks=1 step (last block + heads)", tune, _pct(gram, tune)))
        if not args.no_full:
            full = full_ms(device, args.full_steps if device == "cpu" else args.runs)
            rows.append(("(b) EfficientNet-Lite0 224px full train step", full, _pct(gram, full)))
        for what, (med, lo), frac in rows:
            frac_s = "" if frac is None else frac
            print(f"{device:<6} {what:<44} {med:>10.1f} {lo:>9.1f} {frac_s:>27}", flush=True)


if __name__ == "__main__":
    main()
