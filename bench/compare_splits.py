"""Paired comparison, split by split: a plain BCE fine-tune vs RETDM on the scene set.

For each seed (a different random 80/20 split of the same images):
  * BCE:   the classifier stage alone, for classifier.epochs + joint.epochs epochs;
  * RETDM: classifier (classifier.epochs) -> metric -> joint (joint.epochs), as DESIGN.md.
Both use the same frozen-backbone features (extracted once), so the only difference is
the method. Prints one row per split and the mean and standard deviation of the paired
differences (RETDM minus BCE).

    python bench/compare_splits.py --data ../shared/data/scene --seeds 5
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

os.environ.setdefault("RETDM_NO_PROGRESS", "1")

from retdmctl.config import Config, apply, parse_set  # noqa: E402
from retdmctl.data.dataset import random_splits, read_dataset, write_dataset  # noqa: E402
from retdmctl.metrics import compute_metrics  # noqa: E402
from retdmctl.pipeline import Context, run_stage  # noqa: E402
from retdmctl.workspace import Workspace  # noqa: E402
from stages import BY_NAME, PIPELINE  # noqa: E402

KEYS = ("mAP", "C-F1", "O-F1", "one_error", "ranking_loss")


def base_config(args) -> Config:
    cfg = Config()
    apply(cfg, parse_set(args.set), "--set")
    cfg.ingest.source, cfg.ingest.path = "scene", str(Path(args.data).resolve())
    cfg.model.backbone, cfg.model.frozen_backbone, cfg.model.image_size = args.backbone, True, args.image_size
    return cfg


def evaluate(ws: Workspace, cfg: Config, checkpoint: str) -> dict[str, float]:
    cfg.eval.checkpoint, cfg.eval.report = checkpoint, "none"
    run_stage(Context(ws, cfg, Console(file=io.StringIO())), BY_NAME["eval"], PIPELINE)
    from h5py import File

    with File(ws.stage_dir("eval") / "scores.h5") as h5:
        return compute_metrics(h5["labels"][()], h5["scores"][()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config for both methods, e.g. loss.alpha=0.1 (repeatable)")
    args = parser.parse_args()
    print("settings: " + (", ".join(args.set) or "defaults"))
    if not Path(args.data, "labels.csv").exists():
        raise SystemExit(f"scene data not found at {args.data} (see ../shared/data/README.md)")

    root = Path(tempfile.mkdtemp(prefix="retdm-bench-"))
    quiet = Console(file=io.StringIO())
    seed0 = Workspace(root / "seed0")
    cfg = base_config(args)
    for name in ("ingest", "classifier"):  # ingest once and cache the backbone features
        run_stage(Context(seed0, cfg, quiet), BY_NAME[name], PIPELINE)

    rows = []
    for seed in range(args.seeds):
        results = {}
        for method in ("BCE", "RETDM"):
            ws = Workspace(root / f"s{seed}-{method}")
            shutil.copytree(seed0.root / "data", ws.root / "data")
            (ws.stage_dir("classifier")).mkdir(parents=True)
            shutil.copy(seed0.stage_dir("classifier") / "backbone.h5", ws.stage_dir("classifier") / "backbone.h5")
            info = read_dataset(ws.dataset)
            info.splits = random_splits(len(info.ids), seed=seed, test_fraction=0.2, val_fraction=0.1)
            write_dataset(ws.dataset, info, source="scene", config={"bench_seed": seed})
            # the re-split data set stands in for an ingest run: vouch for it
            ws.write_manifest("ingest", _ingest_manifest(ws))
            c = base_config(args)
            c.classifier.seed = c.metric.seed = c.joint.seed = seed
            if method == "BCE":
                c.classifier.epochs += c.joint.epochs
                names = ["classifier"]
            else:
                names = ["knn", "classifier", "metric", "joint"]
            ctx = Context(ws, c, quiet)
            for name in names:
                run_stage(ctx, BY_NAME[name], PIPELINE)
            results[method] = evaluate(ws, c, "classifier" if method == "BCE" else "joint")
        rows.append(results)
        print(f"seed {seed}: " + "  ".join(
            f"{k} {results['BCE'][k]:.4f} -> {results['RETDM'][k]:.4f}" for k in KEYS), flush=True)

    print()
    print("| metric | BCE mean | RETDM mean | paired diff mean | diff std | splits RETDM better |")
    print("|---|---|---|---|---|---|")
    higher = {"mAP": True, "C-F1": True, "O-F1": True, "one_error": False, "ranking_loss": False}
    for k in KEYS:
        b = np.array([r["BCE"][k] for r in rows])
        t = np.array([r["RETDM"][k] for r in rows])
        d = t - b
        better = int(((d > 0) if higher[k] else (d < 0)).sum())
        print(f"| {k} | {b.mean():.4f} | {t.mean():.4f} | {d.mean():+.4f} | {d.std(ddof=1) if len(d) > 1 else 0:.4f} "
              f"| {better}/{len(d)} |")
    shutil.rmtree(root, ignore_errors=True)


def _ingest_manifest(ws: Workspace) -> dict:
    return {"config": {}, "config_hash": "bench", "inputs": {}, "finished_at": "", "duration_s": 0,
            "summary": {}, "outputs": {ws.rel(p): ws.fingerprint(p) for p in (ws.lmdb, ws.dataset)}}


if __name__ == "__main__":
    main()
