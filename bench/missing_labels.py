"""Learning from incomplete labels: losses compared under missing-label protocols.

For each dataset and seed (a new split; one workspace per dataset, so the image store
and the frozen backbone's features are made once) and each protocol of ``[labels]``,
every variant runs through the product's own stages:

    bce         stage 1 alone, BCE with unknown labels assumed negative
    llr         stage 1 alone, LL-R (Kim et al. 2022): large-loss unknowns rejected
    bce_clml    stage 1 alone, BCE + CLML (loss.clml = --clml)
    retdm       classifier -> metric -> joint (alpha = beta = lambda = 1), BCE
    retdm_clml  RETDM with the CLML term in the classifier and joint stages

Protocols: ``full`` (every label), ``keep0.75`` / ``keep0.4`` (that fraction of each
training image's positives kept, the rest unknown), ``single`` (one positive per
training image). Validation and test keep their full labels: the epoch kept and the
per-class thresholds are chosen on validation, test is read once per variant.

Datasets: ``scene`` (MIML scene, 2,000 images, 5 classes, frozen EfficientNet-Lite0 at
224 px) and ``demo`` (the built-in generator at its densest: 12 classes, 2-3 labels per
image; the demo reader has no option for more labels per image).

Also measured: the CLML term's time per step as a fraction of a frozen-mode classifier
training step (batch 64, the dataset's class count, embedding 512, 1280 backbone
features), median over repeated steps.

    PYTHONPATH=. python bench/missing_labels.py --datasets scene --seeds 0 1 2

Writes ``docs/bench-missing-labels.md`` and ``.json`` (``--out`` to change); the json is
rewritten after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETDM_NO_PROGRESS", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from bench.scene import configure, kept_val_map, run_until, test_metrics  # noqa: E402
from retdmctl.config import Config, apply, parse_set, validate  # noqa: E402
from retdmctl.data.dataset import read_dataset  # noqa: E402
from retdmctl.pipeline import Context, run_stage  # noqa: E402
from retdmctl.workspace import Workspace  # noqa: E402
from stages import BY_NAME, PIPELINE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS: dict[str, list[str]] = {
    "full": ["labels.protocol=full"],
    "keep0.75": ["labels.protocol=keep", "labels.fraction=0.75"],
    "keep0.4": ["labels.protocol=keep", "labels.fraction=0.4"],
    "single": ["labels.protocol=single"],
}
# run in this order: bce reuses retdm's classifier, bce_clml retdm_clml's
ORDER = ("retdm", "bce", "retdm_clml", "bce_clml", "llr")
REPORTED = ("bce", "llr", "bce_clml", "retdm", "retdm_clml")


def variants(clml: float) -> dict[str, dict]:
    on = f"loss.clml={clml}"
    return {
        "bce": {"stage": "classifier", "set": ["loss.base=bce", "loss.clml=0"]},
        "llr": {"stage": "classifier", "set": ["loss.base=llr", "loss.clml=0"]},
        "bce_clml": {"stage": "classifier", "set": ["loss.base=bce", on]},
        "retdm": {"stage": "joint", "set": ["loss.base=bce", "loss.clml=0"]},
        "retdm_clml": {"stage": "joint", "set": ["loss.base=bce", on]},
    }


def base_config(dataset: str, args) -> Config:
    base = Config()
    if dataset == "scene":
        base.ingest.source, base.ingest.path = "scene", str(Path(args.data).resolve())
        base.model.image_size = 224
    else:
        base.ingest.source, base.ingest.demo_images, base.ingest.demo_classes = "demo", args.demo_images, 12
        base.model.image_size = 128
    base.model.backbone, base.model.frozen_backbone = "efficientnet_lite0", True
    base.metric.epochs = 40
    apply(base, parse_set(args.set), "--set")
    validate(base)
    return base


def run_one(ws: Workspace, base: Config, settings: list[str], stage: str) -> dict:
    started = time.perf_counter()
    cfg = configure(base, settings)
    run_until(ws, cfg, stage)
    metrics = test_metrics(ws, cfg, stage)["per_class"]
    hidden = ws.read_manifest(stage)["summary"].get("labels", {})
    return {
        "val_mAP": kept_val_map(ws, stage),
        "mAP": metrics["mAP"],
        "C-F1": metrics["C-F1"],
        "O-F1": metrics["O-F1"],
        "hidden_positives": hidden.get("hidden_positives"),
        "train_positives": hidden.get("train_positives"),
        "seconds": time.perf_counter() - started,
    }


def clml_step_fraction(num_classes: int, repeats: int = 30) -> dict:
    """Median ms of a frozen-mode classifier step (heads only: 1280 -> 512 -> C, SGD)
    without and with the CLML term, and the term's share of the step with it."""
    from retdmctl.losses.base import masked_bce
    from retdmctl.losses.clml import clml_loss
    from retdmctl.models.retdm import RETDM

    torch.manual_seed(0)
    model = RETDM(num_classes, 1280, 512, 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 1280)
    y = (torch.rand(64, num_classes) < 0.3).float()

    def step(with_clml: bool) -> float:
        t0 = time.perf_counter()
        f, f_dropped = model.embed_pair(x)
        logits = model.classify(f_dropped)
        loss = masked_bce(logits, y)
        if with_clml:
            loss = loss + clml_loss(f, logits, y, epoch=2, lam=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        step(False), step(True)
    for _ in range(repeats):  # interleaved: the shared CPU's load hits both alike
        times[False].append(step(False))
        times[True].append(step(True))
    base, with_clml = statistics.median(times[False]), statistics.median(times[True])
    return {
        "step_ms": 1000 * base, "step_with_clml_ms": 1000 * with_clml,
        "clml_ms": 1000 * (with_clml - base), "fraction": (with_clml - base) / with_clml,
        "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def tables(results: dict, args, timing: dict) -> list[str]:
    md = []
    for dataset, per_seed in results.items():
        seeds = sorted(per_seed, key=int)
        md += [f"## {dataset} (seeds {', '.join(map(str, seeds))}; test, per-class thresholds from validation)", ""]
        for metric in ("mAP", "C-F1"):
            md += [f"### {metric}", "", "| variant | " + " | ".join(args.protocols) + " |",
                   "|---|" + "---|" * len(args.protocols)]
            for v in REPORTED:
                if v not in args.variants:
                    continue
                cells = []
                for p in args.protocols:
                    vals = [per_seed[s][p][v][metric] for s in seeds if v in per_seed[s].get(p, {})]
                    n = f" (n={len(vals)})" if 0 < len(vals) < len(seeds) else ""
                    cells.append(mean_std(vals) + n)
                md.append(f"| {v} | " + " | ".join(cells) + " |")
            md.append("")
        hidden = []
        for p in args.protocols:
            vals = [r.get("hidden_positives") for s in seeds for r in per_seed[s].get(p, {}).values()]
            tot = [r.get("train_positives") for s in seeds for r in per_seed[s].get(p, {}).values()]
            if vals and vals[0] is not None:
                hidden.append(f"{p}: {vals[0]} of {tot[0]}")
        md += ["Training positives hidden (first seed): " + "; ".join(hidden), ""]
    if timing:
        md += ["## CLML cost per frozen-mode training step (batch 64, embedding 512, 1280 features)", "",
               "| dataset | classes | step (ms) | step + CLML (ms) | CLML (ms) | CLML share of the step | load |",
               "|---|---|---|---|---|---|---|"]
        for dataset, t in timing.items():
            md.append(f"| {dataset} | {t['classes']} | {t['step_ms']:.1f} | {t['step_with_clml_ms']:.1f} | "
                      f"{t['clml_ms']:.1f} | {100 * t['fraction']:.0f} % | {t['load']:.1f} |")
        md.append("")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["scene", "demo"], choices=["scene", "demo"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scene"))
    parser.add_argument("--demo-images", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--variants", nargs="+", default=list(REPORTED), choices=list(REPORTED))
    parser.add_argument("--clml", type=float, default=1.0, help="loss.clml of the CLML variants (authors' lambda)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="applied to every variant")
    parser.add_argument("--workdir", help="reuse this folder for the workspaces (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench-missing-labels"), help="path without suffix; .md and .json are added")
    args = parser.parse_args()

    specs = variants(args.clml)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-missing-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    started = time.perf_counter()
    ref = base_config(args.datasets[0], args)

    def write() -> list[str]:
        md = [
            "# Missing labels: losses compared under label protocols",
            "",
            f"`PYTHONPATH=. python bench/missing_labels.py --datasets {' '.join(args.datasets)} --seeds "
            f"{' '.join(map(str, args.seeds))}`: frozen {ref.model.backbone}; classifier {ref.classifier.epochs} epochs, "
            f"metric {ref.metric.epochs}, joint {ref.joint.epochs}; "
            f"loss.clml = {args.clml:g} in the CLML variants (tau 0.75, delta 1, from epoch 1); LL-R at its published "
            f"schedule (0.2 %/epoch); mean ± std over seeds; {(time.perf_counter() - started) / 60:.1f} min so far.",
            "",
        ] + tables(results, args, timing)
        Path(f"{out}.md").write_text("\n".join(md))
        Path(f"{out}.json").write_text(json.dumps({"args": vars(args), "results": results, "clml_timing": timing}, indent=1))
        return md

    for dataset in args.datasets:
        ws = Workspace((workdir / dataset).resolve())
        base = base_config(dataset, args)
        results[dataset] = {}
        for seed in args.seeds:
            base.ingest.seed = seed  # a new split; the image store and backbone features are reused
            run_stage(Context(ws, base, Console(file=io.StringIO())), BY_NAME["ingest"], PIPELINE)
            if dataset not in timing:
                classes = read_dataset(ws.dataset).num_classes
                timing[dataset] = {"classes": classes, **clml_step_fraction(classes)}
            results[dataset][seed] = {}
            for protocol in args.protocols:
                results[dataset][seed][protocol] = {}
                for name in ORDER:
                    if name not in args.variants:
                        continue
                    spec = specs[name]
                    r = run_one(ws, base, spec["set"] + PROTOCOLS[protocol], spec["stage"])
                    results[dataset][seed][protocol][name] = r
                    print(f"{dataset} seed {seed} {protocol:9s} {name:10s} val mAP {r['val_mAP']:.4f} test mAP "
                          f"{r['mAP']:.4f} C-F1 {r['C-F1']:.4f} {r['seconds']:.0f}s", flush=True)
                    write()
    print("\n".join(write()))


if __name__ == "__main__":
    main()
