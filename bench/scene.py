"""Variants of the method compared split by split on the MIML scene set, on development
seeds and on confirmation seeds.

The protocol: every choice (a variant's settings, and inside a variant the epoch kept,
the neighbour vote and the decision thresholds) is made on the development seeds, on
their validation splits; a variant becomes a default only if it also wins on the
confirmation seeds, which it was not chosen on (the transfer table at the end). Test is
read once per variant per seed.

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
    retdm_tune1_views_knn  retdm_tune1_views with the vote over its own embeddings (not
                run by default)
    tune1_views_ema    tune1_views with a weight EMA, decay from {0.95, 0.99} on validation
                mAP (not run by default)

These start from pooled features of the centre crop (tune_blocks 0, views 1, metric 40
epochs) unless they set otherwise. The default_* variants are the product's own
frozen-mode default instead: what ``retdmctl ingest scene DIR --seed S && retdmctl run
--frozen-backbone`` runs (every setting at the product's default: tune_blocks and views
on auto, the product's epochs; only --set changes them), trained ONCE per seed in its own
workspace (WORKDIR/default) and scored four ways:

    default                   the joint checkpoint with eval.fusion on (the product)
    default_joint_plain       the joint checkpoint, eval.fusion off
    default_classifier_vote   the classifier checkpoint, eval.fusion on
    default_classifier_plain  the classifier checkpoint, eval.fusion off
    default_val_only          the same trained joint model, its vote and thresholds chosen
                              again on the validation split alone (what decision.folds = 0
                              chooses), scored as default (not run by default)
    default_val_map           the same, with the earlier release's rule: the vote kept
                              wherever it improves validation mAP (not run by default)

The val mAP column: of the kept epoch, or of the fused scores where the vote applies; for
default_* with out-of-fold choices, the mAP of the scores the decision was chosen on
(validation and out-of-fold images); for default_val_only and default_val_map, of their
validation scores.

Each default_* result records its checkpoint's decision: the vote chosen (k, temp, w,
val_mAP, plain_val_mAP) and how the choices were made (the checkpoint's "decision").

Every choice inside a variant is made on validation: the epoch kept (best validation
mAP), the decision thresholds (per class, or one global one), and for retdm_val the loss
weights. For each seed set the tables give each of the 12 metrics as mean +- std over the
seeds, each variant's paired difference from the baseline (``--baseline``, default bce:
mean +- std of the per-seed differences, and on how many seeds it is better), and wall
time (for a default_* variant its training plus its scoring). The transfer table puts
the paired differences on mAP and C-F1 of the development and the confirmation seeds side
by side; "holds" says yes where each confirmation mean is above 0 or within one paired sd
of it.

    python bench/scene.py                                  # dev 0-4, confirmation 10-14, frozen, CPU
    python bench/scene.py --variants default default_joint_plain default_classifier_vote \
        default_classifier_plain default_val_only default_val_map --baseline default_classifier_plain
    python bench/scene.py --seeds 0 1 2 --confirm-seeds --finetune   # no confirmation seeds (GPU)

Writes ``docs/bench-scene.md`` and ``docs/bench-scene.json`` (``--out`` to change), after
every seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RETDM_NO_PROGRESS", "1")

import retdmctl  # noqa: E402
from retdmctl.allocator import tune_allocator  # noqa: E402
from retdmctl.config import Config, apply, parse_set, validate  # noqa: E402
from retdmctl.data.dataset import read_dataset  # noqa: E402
from retdmctl.errors import RetdmError  # noqa: E402
from retdmctl.metrics import HIGHER_IS_BETTER, METRIC_NAMES, compute_metrics  # noqa: E402
from retdmctl.model_io.checkpoint import decision_rule  # noqa: E402
from retdmctl.runtime import load_checkpoint  # noqa: E402
from stages.evaluate import read_scores  # noqa: E402
import torch  # noqa: E402
from retdmctl import thresholds  # noqa: E402
from retdmctl.fusion import NeighbourVote  # noqa: E402
from retdmctl.inputs import image_source  # noqa: E402
from retdmctl.model_io.checkpoint import build_model, restore_image_model  # noqa: E402
from retdmctl.model_io.scoring import predict_with_embeddings  # noqa: E402
from retdmctl.runtime import prepare_model  # noqa: E402
from retdmctl.training.decision import choose_decision  # noqa: E402
from retdmctl.training.labels import training_view  # noqa: E402

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
    # the same fusion on top of the best variant
    "tune1_views_knn": {"stage": "classifier", "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE],
                        "knn_fusion": True},
    # RETDM on the middle way, with the vote over its own (metric-trained) embeddings: close
    # to what `retdmctl run --frozen-backbone` runs by default, on the bench's schedule (the
    # default_* variants below are the product's own)
    "retdm_tune1_views_knn": {"stage": "joint",
                              "set": ["loss.base=bce", "model.tune_blocks=1", "model.views=10", *TUNE_SCHEDULE],
                              "knn_fusion": True},
    # the product's frozen-mode default: one training per seed of its family (FAMILIES),
    # scored from a checkpoint with eval.fusion on or off
    "default": {"family": "default", "checkpoint": "joint", "fusion": True},
    "default_joint_plain": {"family": "default", "checkpoint": "joint", "fusion": False},
    "default_classifier_vote": {"family": "default", "checkpoint": "classifier", "fusion": True},
    "default_classifier_plain": {"family": "default", "checkpoint": "classifier", "fusion": False},
    # the same trained joint model, its decision chosen again on the validation split alone
    # (no out-of-fold scores): with the product's rule (the vote kept where it improves
    # validation mAP and C-F1), and with the earlier release's (the vote kept wherever it
    # improves validation mAP); scored on test like `default`
    "default_val_only": {"family": "default", "checkpoint": "joint", "fusion": True, "rechoose": "val"},
    "default_val_map": {"family": "default", "checkpoint": "joint", "fusion": True, "rechoose": "val_map"},
}
# A family's settings over the product's defaults; each trains in WORKDIR/<family>, so one
# family's training never makes another's stale.
FAMILIES: dict[str, list[str]] = {"default": []}
NOT_BY_DEFAULT = ("tune1_views", "retdm_tune1", "retdm_tune1_views", "tune1_views_knn", "tune1_views_ema",
                  "retdm_tune1_views_knn", "default_val_only", "default_val_map")
SETS = ("development", "confirmation")
TRANSFER_KEYS = ("mAP", "C-F1")
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


def checkpoint_decision(ws: retdmctl.Workspace, stage: str) -> dict:
    """What the stage's checkpoint chose: its neighbour vote (k, temp, w and the validation
    mAP with and without it; None where it has none) and, where the checkpoint says, how
    the choices were made (its "decision", as saved)."""
    ckpt = load_checkpoint(ws.layout.stage_dir(stage) / "checkpoint.pt")
    vote = ckpt.get("fusion")
    out: dict = {"fusion": None if vote is None else {k: vote.get(k) for k in ("k", "temp", "w", "val_mAP", "plain_val_mAP")}}
    if ckpt.get("decision") is not None:
        out["decision"] = ckpt["decision"]
    return out


def rechosen_metrics(ws: retdmctl.Workspace, cfg: Config, stage: str, how: str) -> tuple[dict[str, dict[str, float]], dict]:
    """Test metrics of ``stage``'s trained model with its decision chosen again on the
    validation split alone: ``how`` = "val" (the product's rule with decision.folds = 0:
    the vote kept where it improves validation mAP and C-F1) or "val_map" (the earlier
    rule: the best vote on validation mAP, kept wherever it improves it); the thresholds
    chosen on the validation scores it gives. Test is read once, here."""
    layout = ws.layout
    info = read_dataset(layout.dataset)
    path = layout.stage_dir(stage) / "checkpoint.pt"
    device = torch.device("cpu")
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    restore_image_model(model, load_checkpoint(path), cfg, str(path))
    prepare_model(model, device)
    view, _, _ = training_view(info, cfg)
    source = image_source(layout, cfg, view, spec, device, None)
    try:
        vote = choose_decision(model, source, view, device)["fusion"]  # validation only
        seen = vote["considered"]
        if how == "val_map":
            k, temp, w = seen["k"], seen["temp"], seen["w"] if seen["mAP"] > vote["plain_val_mAP"] else 0.0
        else:
            k, temp, w = vote["k"], vote["temp"], vote["w"]
        val_rows, test_rows = view.split("val"), view.split("test")
        p_val, y_val, f_val = predict_with_embeddings(model, source, val_rows, device)
        p, y, f = predict_with_embeddings(model, source, test_rows, device)
    finally:
        source.reader.close() if getattr(source, "reader", None) is not None else None
    if w > 0:
        fuse = NeighbourVote(vote["bank"], vote["labels"], vote["rows"], k, temp, w)
        with torch.no_grad():
            p_val = fuse(torch.from_numpy(f_val), torch.from_numpy(p_val)).numpy()
            p = fuse(torch.from_numpy(f), torch.from_numpy(p)).numpy()
    known = view.known_at(val_rows)
    choice = thresholds.choose(y_val, p_val, known)
    test = {rule: compute_metrics(y, p, threshold=thresholds.resolve(choice, rule, 0.5, y.shape[1])) for rule in RULES}
    test["val_mAP"] = compute_metrics(y_val, p_val, known=known)["mAP"]  # of the scores it chose on
    return test, ({"k": k, "temp": temp, "w": w} if w > 0 else {})


def run_family(workdir: Path, product: Config, family: str, names: list[str]) -> dict[str, dict]:
    """The family's one training (the product's config with the family's settings, in
    WORKDIR/<family>), then each of ``names`` scored from it: test read once per name."""
    ws = retdmctl.Workspace(workdir / family)
    settings = FAMILIES[family]
    train_seconds = run_until(ws, configure(product, settings), "joint")  # as `retdmctl run` trains
    decisions = {stage: checkpoint_decision(ws, stage) for stage in ("classifier", "joint")}
    out = {}
    for name in names:
        spec = VARIANTS[name]
        started = time.perf_counter()
        cfg = configure(product, settings, spec["fusion"])
        val_map = kept_val_map(ws, cfg, spec["checkpoint"])
        if "rechoose" in spec:
            test, applied = rechosen_metrics(ws, cfg, spec["checkpoint"], spec["rechoose"])
            val_map = test.pop("val_mAP")
        else:
            test, applied = test_metrics(ws, cfg, spec["checkpoint"])
        out[name] = {"val_mAP": val_map, "test": test, "chosen": applied,
                     "decision": decisions[spec["checkpoint"]], "train_seconds": train_seconds,
                     "seconds": train_seconds + time.perf_counter() - started}
    return out


def run_seed(workdir: Path, base: Config, product: Config, seed: int, variants: list[str], report=print) -> dict[str, dict]:
    """Every variant on one seed's split; a family's variants from its one training."""
    base.ingest.seed = product.ingest.seed = seed  # a new split; the image store and the backbone features are reused
    ws = retdmctl.Workspace(workdir)
    done: dict[str, dict] = {}
    for name in variants:
        if name not in done:
            family = VARIANTS[name].get("family")
            if family is None:
                done[name] = run_variant(ws, base, name)
            else:  # every asked variant of the family, wherever it stands in the list
                done.update(run_family(workdir, product, family, [v for v in variants if VARIANTS[v].get("family") == family]))
        r = done[name]
        report(f"seed {seed} {name:10s} val mAP {r['val_mAP']:.4f} test mAP {r['test']['per_class']['mAP']:.4f} "
               f"C-F1 {r['test']['per_class']['C-F1']:.4f} (global {r['test']['global']['C-F1']:.4f}, "
               f"0.5 {r['test']['fixed']['C-F1']:.4f}) {r['seconds']:.0f}s {r['chosen'] or ''}")
    return {name: done[name] for name in variants}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def seed_list(seeds: list[int]) -> str:
    """0-4 for 0 1 2 3 4; 0-2, 7, 8 for 0 1 2 7 8."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def paired(results: dict, variant: str, baseline: str, seeds: list[int], rule: str, key: str) -> tuple[float, float, int]:
    """The variant's paired difference from the baseline over ``seeds``: (mean, sd, on how
    many seeds it is better)."""
    diffs = [results[s][variant]["test"][rule][key] - results[s][baseline]["test"][rule][key] for s in seeds]
    better = sum((d > 0) == HIGHER_IS_BETTER[key] and d != 0 for d in diffs)
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, better


def holds(mean: float, sd: float, key: str) -> bool:
    """The issue's criterion on the confirmation seeds: better than the baseline on
    average, or within one paired sd of it."""
    better = mean > 0 if HIGHER_IS_BETTER[key] else mean < 0
    return better or abs(mean) <= sd


def table(results: dict, variants: list[str], seeds: list[int], rule: str, baseline: str = "bce") -> str:
    lines = [f"### Test metrics, thresholds: {rule.replace('_', ' ')} (mean ± std over seeds {', '.join(map(str, seeds))})", ""]
    lines.append("| variant | val mAP | " + " | ".join(METRIC_NAMES) + " | time (s) |")
    lines.append("|---|" + "---|" * (len(METRIC_NAMES) + 2))
    for v in variants:
        row = [mean_std([results[s][v]["val_mAP"] for s in seeds])]
        row += [mean_std([results[s][v]["test"][rule][m] for s in seeds]) for m in METRIC_NAMES]
        row.append(f"{statistics.mean(results[s][v]['seconds'] for s in seeds):.0f}")
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    lines += ["", f"### Paired difference from {baseline} (variant − {baseline}; thresholds: {rule.replace('_', ' ')})", ""]
    keys = ("mAP", "C-F1", "O-F1", "one_error", "ranking_loss")
    lines.append("| variant | " + " | ".join(f"{k} (better on)" for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for v in variants:
        if v == baseline:
            continue
        cells = []
        for k in keys:
            mean, sd, better = paired(results, v, baseline, seeds, rule, k)
            cells.append(f"{mean:+.4f} ± {sd:.4f} ({better}/{len(seeds)})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_table(results: dict, variants: list[str], dev: list[int], confirm: list[int], baseline: str,
                   rule: str = "per_class") -> str:
    """Each variant's paired difference from the baseline on the development seeds and on
    the confirmation seeds, side by side; "holds": yes where every confirmation mean is
    above 0 or within one paired sd of it, else no and the metrics that fail."""
    lines = [f"## Transfer: development seeds {seed_list(dev) or 'none'} -> confirmation seeds {seed_list(confirm) or 'none'}", "",
             f"Paired difference from {baseline} (variant − {baseline}, mean ± sd, better on n seeds; thresholds: "
             f"{rule.replace('_', ' ')}). Holds: on the confirmation seeds each mean is above 0 or within one paired sd of it.",
             "",
             "| variant | " + " | ".join(f"{k} dev | {k} confirmation" for k in TRANSFER_KEYS) + " | holds |",
             "|---|" + "---|" * (2 * len(TRANSFER_KEYS) + 1)]

    def cell(seeds: list[int], v: str, k: str) -> str:
        if not seeds:
            return "—"
        mean, sd, better = paired(results, v, baseline, seeds, rule, k)
        return f"{mean:+.4f} ± {sd:.4f} ({better}/{len(seeds)})"

    for v in variants:
        if v == baseline:
            continue
        cells = [cell(seeds, v, k) for k in TRANSFER_KEYS for seeds in (dev, confirm)]
        if confirm:
            failed = [k for k in TRANSFER_KEYS if not holds(*paired(results, v, baseline, confirm, rule, k)[:2], k)]
            cells.append("yes" if not failed else f"no ({', '.join(failed)})")
        else:
            cells.append("—")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choices_table(results: dict, pairs: list[tuple[str, str]], dev: list[int], confirm: list[int],
                  rule: str = "per_class") -> str:
    """One row per choice (``A`` over ``B``): A's paired difference from B on the
    development and the confirmation seeds, and whether it holds."""
    lines = ["## The choices, pair by pair", "",
             f"Each row: the first variant's paired difference from the second (mean ± sd, better on n seeds; "
             f"thresholds: {rule.replace('_', ' ')}). Holds: on the confirmation seeds each mean is above 0 or within one "
             "paired sd of it.", "",
             "| choice | " + " | ".join(f"{k} dev | {k} confirmation" for k in TRANSFER_KEYS) + " | holds |",
             "|---|" + "---|" * (2 * len(TRANSFER_KEYS) + 1)]
    for a, b in pairs:
        cells = []
        for k in TRANSFER_KEYS:
            for seeds in (dev, confirm):
                if seeds:
                    mean, sd, better = paired(results, a, b, seeds, rule, k)
                    cells.append(f"{mean:+.4f} ± {sd:.4f} ({better}/{len(seeds)})")
                else:
                    cells.append("—")
        failed = [k for k in TRANSFER_KEYS if confirm and not holds(*paired(results, a, b, confirm, rule, k)[:2], k)]
        cells.append("—" if not confirm else "yes" if not failed else f"no ({', '.join(failed)})")
        lines.append(f"| {a} over {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/scene.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scene"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="the development seeds: what every choice is made on")
    parser.add_argument("--confirm-seeds", type=int, nargs="*", default=[10, 11, 12, 13, 14],
                        help="the confirmation seeds, never chosen on (no values: none)")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in NOT_BY_DEFAULT],
                        choices=list(VARIANTS))
    parser.add_argument("--baseline", default="bce", choices=list(VARIANTS),
                        help="the reference of the paired differences (added to the variants when missing)")
    parser.add_argument("--backbone", help="default: the product's (efficientnet_lite0)")
    parser.add_argument("--image-size", type=int, help="default: the product's (224)")
    parser.add_argument("--finetune", action="store_true", help="fine-tune the CNN (needs a GPU to be quick)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="applied to every variant")
    parser.add_argument("--workdir", help="reuse this workspace (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench-scene"))
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also tabulate A's paired difference from B on both seed sets (a choice of A over B)")
    parser.add_argument("--render", metavar="JSON", help="write the tables again from this run's JSON; runs nothing")
    args = parser.parse_args(argv)
    if args.render:
        return args
    if shared := sorted(set(args.seeds) & set(args.confirm_seeds)):
        parser.error(f"seed {', '.join(map(str, shared))} is in both --seeds and --confirm-seeds: "
                     "a confirmation seed must not be one the choices were made on")
    if args.baseline not in args.variants:
        args.variants.insert(0, args.baseline)
    args.command = shlex.join(["python", "bench/scene.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def configs(args: argparse.Namespace) -> tuple[Config, Config]:
    """(the base of the bench's own variants, the product's default for the default_* ones)."""
    base, product = Config(), Config()
    for cfg in (base, product):
        cfg.ingest.source, cfg.ingest.path = "scene", str(Path(args.data).resolve())
        cfg.model.frozen_backbone = not args.finetune
        if args.backbone:
            cfg.model.backbone = args.backbone
        if args.image_size:
            cfg.model.image_size = args.image_size
    # the bench's variants from pooled features of the centre crop unless they say otherwise
    base.model.tune_blocks, base.model.views = 0, 1
    base.metric.epochs = 40
    for cfg in (base, product):
        apply(cfg, parse_set(args.set), "--set")
        validate(cfg)
    return base, product


def check_variants(base: Config, product: Config, variants: list[str]) -> None:
    """Every asked variant's config validated before the first seed, not hours into the run."""
    for name in variants:
        spec = VARIANTS[name]
        try:
            if "family" in spec:
                configure(product, FAMILIES[spec["family"]], spec["fusion"])
            else:
                grid = spec.get("grid", {})
                for point in itertools.product(*grid.values()):
                    configure(base, spec["set"] + [f"{k}={v}" for k, v in zip(grid, point)], spec.get("knn_fusion", False))
        except RetdmError as err:
            raise SystemExit(f"bench/scene.py: variant {name}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        return render(args)
    tune_allocator()  # as the CLI does: the CNN runs 2.5-3x faster on the CPU
    try:
        base, product = configs(args)
    except RetdmError as err:
        raise SystemExit(f"bench/scene.py: {err}") from None
    check_variants(base, product, args.variants)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-scene-"))
    results: dict[int, dict] = {}
    started = time.perf_counter()
    for seed in [*args.seeds, *args.confirm_seeds]:  # development first: confirmation never informs a choice
        results[seed] = run_seed(workdir, base, product, seed, args.variants, report=lambda line: print(line, flush=True))
        write(args, base, product, results, time.perf_counter() - started)  # after every seed: partial results survive


def write(args, base: Config, product: Config, results: dict, total: float) -> None:
    mode = "fine-tuned" if args.finetune else "frozen backbone"
    sets = {"development": args.seeds, "confirmation": args.confirm_seeds}
    pm = product.model
    md = [
        f"# scene: variants compared on development seeds {seed_list(args.seeds)} and confirmation seeds "
        f"{seed_list(args.confirm_seeds) or 'none'}",
        "",
        "Protocol: every choice (a variant's settings; inside it the epoch kept, the neighbour vote and the thresholds, "
        "on validation) is made on the development seeds; a variant becomes a default only if it also wins on the "
        "confirmation seeds, which it was not chosen on (the transfer table at the end). Test is read once per variant "
        "per seed.",
        "",
        f"`{args.command}`: {base.model.backbone} at {base.model.image_size} px, {mode}; the bench's variants: "
        f"classifier {base.classifier.epochs} epochs, metric {base.metric.epochs}, joint {base.joint.epochs}; the "
        f"default_* variants: the product's defaults (tune blocks {pm.tune_blocks}, views {pm.views}; classifier "
        f"{product.classifier.epochs} epochs, metric {product.metric.epochs}, joint {product.joint.epochs}), trained "
        f"once per seed, their vote and thresholds chosen as the product chooses them (decision.folds "
        f"{product.decision.folds}: {'out-of-fold and validation scores' if product.decision.folds else 'validation'}); "
        f"epoch kept on validation; {total / 60:.1f} min in all"
        + ("" if len(results) == len(args.seeds) + len(args.confirm_seeds)
           else f" (seeds {', '.join(map(str, results))} so far)") + ".",
        "",
    ]
    for name, asked in sets.items():
        if not asked:
            continue
        seeds = [s for s in asked if s in results]
        md += [f"## {name.capitalize()} seeds {seed_list(asked)}", ""]
        if not seeds:
            md += ["Not run yet.", ""]
            continue
        if len(seeds) < len(asked):
            md += [f"Seeds {', '.join(map(str, seeds))} of {len(asked)} so far.", ""]
        for rule in RULES:
            md += [table(results, args.variants, seeds, rule, args.baseline), ""]
    dev, confirm = ([s for s in sets[n] if s in results] for n in SETS)
    md += [transfer_table(results, args.variants, dev, confirm, args.baseline), ""]
    if getattr(args, "compare", None):
        md += [choices_table(results, [tuple(pair) for pair in args.compare], dev, confirm), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    seed_set = {seed: name for name, asked in sets.items() for seed in asked}
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "seed_sets": sets, "seed_set": seed_set,
                                                    "minutes": total / 60, "results": results}, indent=1))
    print("\n".join(md), flush=True)


def render(args: argparse.Namespace) -> None:
    """The tables of a finished (or partial) run again from its JSON, with this call's
    ``--baseline``, ``--compare`` and ``--out`` (the run's other arguments as saved)."""
    saved = json.loads(Path(args.render).read_text())
    run = argparse.Namespace(**saved["args"])
    run.baseline = args.baseline if args.baseline != "bce" or "bce" in run.variants else run.baseline
    run.compare, run.out = args.compare, args.out
    if run.baseline not in run.variants:
        raise SystemExit(f"bench/scene.py: --baseline {run.baseline} was not run in {args.render}")
    for a, b in run.compare:
        if a not in run.variants or b not in run.variants:
            raise SystemExit(f"bench/scene.py: --compare {a} {b}: not both run in {args.render}")
    base, product = configs(run)
    again = "`; tables written again by `"
    run.command = run.command.split(again)[0] + again + shlex.join(["python", "bench/scene.py", *sys.argv[1:]])
    results = {int(seed): r for seed, r in saved["results"].items()}
    write(run, base, product, results, saved["minutes"] * 60 if "minutes" in saved else elapsed(results))


def elapsed(results: dict) -> float:
    """Seconds a run took, from its results (for a JSON saved before it recorded them):
    each seed's family training once, each variant's own time on top."""
    total = 0.0
    for r in results.values():
        trained = {v["train_seconds"] for v in r.values() if "train_seconds" in v}
        total += sum(trained) + sum(v["seconds"] - v.get("train_seconds", 0.0) for v in r.values())
    return total


if __name__ == "__main__":
    main()
