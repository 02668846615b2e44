"""Variants of the method compared split by split on the MIML scene set.

For each seed (an 80/20 split of the 2,000 images, a validation split carved from the
training part) every variant runs through the product's own stages, in one workspace, so
the images are encoded once and the frozen backbone's features are extracted once:

    bce         stage 1 alone with BCE (the baseline)
    asl         stage 1 alone with ASL (Ridnik et al. 2021)
    retdm       classifier -> metric -> joint, alpha = beta = lambda = 1
    one_way     RETDM with lambda = 0 (the paper's ablation)
    no_rec      RETDM with beta = 0
    retdm_asl   RETDM on ASL
    retdm_val   RETDM with (alpha, beta) chosen per seed on validation mAP from a grid
    tune1       stage 1 alone, the backbone's last block and head trained on cached
                activations of the centre crop (model.tune_blocks = 1)
    retdm_tune1 RETDM on the same
    bce_knn     bce's scores fused with a vote of the image's nearest training images in
                embedding space: p = (1 - w) p_cls + w sum_j softmax(cos_j / t) y_j,
                with k, t and w chosen on validation mAP (the product's eval.fusion,
                retdmctl/fusion.py; every other variant is scored with it off)
    tune1_views tune1 on ten cached views per image (model.views = 10; not run by
                default: extraction runs the trunk ten times per image)
    retdm_tune1_views  RETDM on the same (not run by default)
    tune1_views_knn    tune1_views' scores fused with the same neighbour vote (not run
                by default)
    retdm_tune1_views_knn  retdm_tune1_views with the vote over its own embeddings: the
                product's frozen-mode default (not run by default)
    tune1_views_ema    tune1_views with a weight EMA, decay from {0.95, 0.99} on validation
                mAP (not run by default)

The product's frozen-mode default (model.tune_blocks and model.views on auto, eval.fusion
on) is retdm_tune1_views_knn; here every variant starts from pooled features
of the centre crop (tune_blocks 0, views 1) unless it sets otherwise.

Every choice inside a variant is made on validation: the epoch kept (best validation
mAP), the decision thresholds (per class, or one global one), and for retdm_val the loss
weights. Test is read once per variant, at the end. The table gives each of the 12
metrics as mean +- std over the seeds, each variant's paired difference from bce (mean
+- std of the per-seed differences, and on how many seeds it is better), and wall time.

    python bench/scene.py --seeds 0 1 2 3 4               # frozen backbone, CPU
    python bench/scene.py --seeds 0 1 2 --finetune        # fine-tune the CNN (GPU)

Writes ``docs/bench-scene.md`` and ``docs/bench-scene.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RETDM_NO_PROGRESS", "1")

import retdmctl  # noqa: E402
from retdmctl.allocator import tune_allocator  # noqa: E402
from retdmctl.config import Config, apply, parse_set, validate  # noqa: E402
from retdmctl.data.dataset import read_dataset  # noqa: E402
from retdmctl.metrics import HIGHER_IS_BETTER, METRIC_NAMES, compute_metrics  # noqa: E402
from retdmctl.model_io.checkpoint import decision_rule  # noqa: E402
from retdmctl.runtime import load_checkpoint  # noqa: E402
from stages.evaluate import read_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUNE_SCHEDULE = ["classifier.epochs=10", "classifier.stop_after=3"]
VARIANTS: dict[str, dict] = {
    "bce": {"stage": "classifier", "set": ["loss.base=bce"]},
    "asl": {"stage": "classifier", "set": ["loss.base=asl"]},
    "retdm": {"stage": "joint", "set": ["loss.base=bce"]},
    "one_way": {"stage": "joint", "set": ["loss.base=bce", "loss.lam=0"]},
    "no_rec": {"stage": "joint", "set": ["loss.base=bce", "loss.beta=0"]},
    "retdm_asl": {"stage": "joint", "set": ["loss.base=asl"]},
    "retdm_val": {"stage": "joint", "set": ["loss.base=bce"], "grid": {"loss.alpha": [0.1, 1.0], "loss.beta": [0.1, 1.0]}},
    # the middle way: the last block and head of the backbone trained on cached
    # activations of the centre crop, or of ten views (five crops, each flipped)
    # (10 epochs, early stop after 3 without a better val mAP: one epoch runs a CNN block)
    "tune1": {"stage": "classifier", "set": ["loss.base=bce", "model.tune_blocks=1", *TUNE_SCHEDULE]},
    "retdm_tune1": {"stage": "joint", "set": ["loss.base=bce", "model.tune_blocks=1", *TUNE_SCHEDULE]},
    "tune1_views": {"stage": "classifier", "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE]},
    "retdm_tune1_views": {"stage": "joint",
                          "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE]},
    # decoding from embedding-space neighbours fused with the classifier (the product's
    # eval.fusion: k, temperature and weight chosen on validation when the stage trained;
    # every other variant is scored with eval.fusion off)
    "bce_knn": {"stage": "classifier", "set": ["loss.base=bce"], "knn_fusion": True},
    # weight EMA of the tuned classifier, its decay chosen on validation mAP
    "tune1_views_ema": {"stage": "classifier", "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE],
                        "grid": {"classifier.ema": [0.95, 0.99]}},
    # the same fusion on top of the best variant (the product's frozen-mode default)
    "tune1_views_knn": {"stage": "classifier", "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE],
                        "knn_fusion": True},
    # RETDM on the middle way, with the vote over its own (metric-trained) embeddings:
    # what `retdmctl run --frozen-backbone` runs by default
    "retdm_tune1_views_knn": {"stage": "joint",
                              "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE],
                              "knn_fusion": True},
}
RULES = ("per_class", "global", "fixed")


def run_until(ws: retdmctl.Workspace, cfg: Config, last: str) -> float:
    """Train ``last`` and the stages it reads from (skipping what is up to date) with
    ``cfg``, retdm.toml left alone; wall seconds."""
    started = time.perf_counter()
    ws.train(last, config=cfg, save=False)
    return time.perf_counter() - started


def kept_val_map(ws: retdmctl.Workspace, cfg: Config, stage: str) -> float:
    """Validation mAP of the model as eval scores it: of the kept epoch, or of the fused
    scores where eval applies the checkpoint's neighbour vote."""
    ckpt = load_checkpoint(ws.layout.stage_dir(stage) / "checkpoint.pt")
    if cfg.eval.fusion and ckpt.get("fusion") is not None and ckpt["fusion"]["w"] > 0:
        return float(ckpt["fusion"]["val_mAP"])
    return float(next(r["val_mAP"] for r in ckpt["history"] if r.get("kept")))


def test_metrics(ws: retdmctl.Workspace, cfg: Config, stage: str) -> tuple[dict[str, dict[str, float]], dict]:
    """Test scores through the product's eval stage, scored under each threshold rule, and
    the neighbour vote eval applied (empty: none)."""
    cfg.eval.checkpoint, cfg.eval.report, cfg.eval.split = stage, "none", "test"
    ws.evaluate(config=cfg)
    layout = ws.layout
    saved = read_scores(layout.stage_dir("eval") / "scores.h5", read_dataset(layout.dataset))
    labels, scores = saved["labels"], saved["scores"]
    applied = ws.evaluation().get("fusion") or {}
    path = layout.stage_dir(stage) / "checkpoint.pt"
    decision = decision_rule(load_checkpoint(path), str(path), num_classes=labels.shape[1],
                             embed_dim=cfg.model.embed_dim, apply_vote=bool(applied))
    return {
        rule: compute_metrics(labels, scores, threshold=decision.cut(rule, 0.5, labels.shape[1]))
        for rule in RULES
    }, applied


def configure(base: Config, settings: list[str], fused: bool = False) -> Config:
    cfg = Config()
    apply(cfg, base.to_dict(), "base")
    apply(cfg, parse_set(settings + [f"eval.fusion={str(fused).lower()}"]), "variant")
    validate(cfg)
    return cfg


def run_variant(ws: retdmctl.Workspace, base: Config, name: str) -> dict:
    spec = VARIANTS[name]
    started = time.perf_counter()
    chosen: dict[str, float] = {}
    if "grid" in spec:  # every grid point trained, the best on validation mAP kept
        keys = list(spec["grid"])
        best = None
        for values in np.array(np.meshgrid(*spec["grid"].values())).T.reshape(-1, len(keys)):
            settings = spec["set"] + [f"{k}={v}" for k, v in zip(keys, values)]
            cfg = configure(base, settings, spec.get("knn_fusion", False))
            run_until(ws, cfg, spec["stage"])
            score = kept_val_map(ws, cfg, spec["stage"])
            if best is None or score > best[0]:
                best = (score, settings, dict(zip(keys, map(float, values))))
        settings, chosen = best[1], best[2]
    else:
        settings = spec["set"]
    cfg = configure(base, settings, spec.get("knn_fusion", False))
    run_until(ws, cfg, spec["stage"])  # up to date when the grid just trained it
    test, applied = test_metrics(ws, cfg, spec["stage"])
    out = {"val_mAP": kept_val_map(ws, cfg, spec["stage"]), "test": test, "chosen": {**chosen, **applied}}
    out["seconds"] = time.perf_counter() - started
    return out


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def table(results: dict, variants: list[str], seeds: list[int], rule: str) -> str:
    lines = [f"### Test metrics, thresholds: {rule.replace('_', ' ')} (mean ± std over seeds {', '.join(map(str, seeds))})", ""]
    lines.append("| variant | val mAP | " + " | ".join(METRIC_NAMES) + " | time (s) |")
    lines.append("|---|" + "---|" * (len(METRIC_NAMES) + 2))
    for v in variants:
        row = [mean_std([results[s][v]["val_mAP"] for s in seeds])]
        row += [mean_std([results[s][v]["test"][rule][m] for s in seeds]) for m in METRIC_NAMES]
        row.append(f"{statistics.mean(results[s][v]['seconds'] for s in seeds):.0f}")
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    lines += ["", f"### Paired difference from bce (variant − bce; thresholds: {rule.replace('_', ' ')})", ""]
    keys = ("mAP", "C-F1", "O-F1", "one_error", "ranking_loss")
    lines.append("| variant | " + " | ".join(f"{k} (better on)" for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for v in variants:
        if v == "bce":
            continue
        cells = []
        for k in keys:
            diffs = [results[s][v]["test"][rule][k] - results[s]["bce"]["test"][rule][k] for s in seeds]
            better = sum((d > 0) == HIGHER_IS_BETTER[k] and d != 0 for d in diffs)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.mean(diffs):+.4f} ± {sd:.4f} ({better}/{len(diffs)})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scene"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in ("tune1_views", "retdm_tune1", "retdm_tune1_views",
                                                                                       "tune1_views_knn", "tune1_views_ema",
                                                                                       "retdm_tune1_views_knn")],
                        choices=list(VARIANTS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--finetune", action="store_true", help="fine-tune the CNN (needs a GPU to be quick)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="applied to every variant")
    parser.add_argument("--workdir", help="reuse this workspace (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench-scene"))
    args = parser.parse_args()
    tune_allocator()  # as the CLI does: the CNN runs 2.5-3x faster on the CPU
    if "bce" not in args.variants:
        args.variants.insert(0, "bce")

    base = Config()
    base.ingest.source, base.ingest.path = "scene", str(Path(args.data).resolve())
    base.model.backbone, base.model.image_size = args.backbone, args.image_size
    base.model.frozen_backbone = not args.finetune
    # every variant from pooled features of the centre crop unless it says otherwise (the
    # product's frozen-mode default is the tune1_views variant)
    base.model.tune_blocks, base.model.views = 0, 1
    base.metric.epochs = 40
    apply(base, parse_set(args.set), "--set")
    validate(base)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-scene-"))
    ws = retdmctl.Workspace(workdir)
    results: dict[int, dict] = {}
    started = time.perf_counter()
    for seed in args.seeds:
        base.ingest.seed = seed  # a new split; the image store and the backbone features are reused
        results[seed] = {}
        for name in args.variants:
            results[seed][name] = run_variant(ws, base, name)
            r = results[seed][name]
            print(f"seed {seed} {name:10s} val mAP {r['val_mAP']:.4f} test mAP {r['test']['per_class']['mAP']:.4f} "
                  f"C-F1 {r['test']['per_class']['C-F1']:.4f} (global {r['test']['global']['C-F1']:.4f}, "
                  f"0.5 {r['test']['fixed']['C-F1']:.4f}) {r['seconds']:.0f}s {r['chosen'] or ''}", flush=True)
        write(args, base, results, time.perf_counter() - started)  # after every seed: partial results survive


def write(args, base: Config, results: dict, total: float) -> None:
    seeds = list(results)
    mode = "fine-tuned" if args.finetune else "frozen backbone"
    md = [
        f"# scene: variants compared over seeds {', '.join(map(str, seeds))}",
        "",
        f"`python bench/scene.py --seeds {' '.join(map(str, args.seeds))}`: {args.backbone} at {args.image_size} px, "
        f"{mode}; classifier {base.classifier.epochs} epochs, metric {base.metric.epochs}, joint {base.joint.epochs}; "
        f"epoch kept and thresholds chosen on validation; {total / 60:.1f} min in all"
        + ("" if len(seeds) == len(args.seeds) else f" (seeds {', '.join(map(str, seeds))} of {len(args.seeds)} so far)") + ".",
        "",
    ]
    for rule in RULES:
        md += [table(results, args.variants, seeds, rule), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
