"""Learning from incomplete labels: losses compared under missing-label protocols.

For each dataset and seed (a new split; one workspace per dataset, so the image store
and the frozen backbone's features are made once) and each protocol of ``[labels]``,
every variant runs through the product's own stages:

    bce         stage 1 alone, BCE with unknown labels assumed negative
    llr         stage 1 alone, LL-R (Kim et al. 2022): large-loss unknowns rejected
    bce_clml    stage 1 alone, BCE + CLML, its weight loss.clml (and, with --tau-grid,
                loss.clml_tau) chosen per seed and protocol on validation from a grid
    retdm       classifier -> metric -> joint (alpha = beta = lambda = 1), BCE
    retdm_clml  RETDM with the CLML term in the classifier and joint stages, at the
                weight chosen for bce_clml (its stage 1 is bce_clml's chosen classifier)
    llr_val     LL-R with its per-epoch rejection increment (loss.llr_delta_rel) chosen
                per seed and protocol on validation from ``--llr-grid`` (its published
                0.2 % included; asked for by name)
    llr_clml    LL-R at llr_val's chosen rate plus the CLML term, its weight chosen on
                validation from the CLML grid (asked for by name, with llr_val)
    bce_clml_lazy  bce_clml with lazy regularisation: the term on every k-th step at k
                times its weight (``--lazy-every`` k, default 16; loss.clml_every), its
                own weight chosen on validation from the same grid (asked for by name)

The grid: every (loss.clml, loss.clml_tau) point trains stage 1; the one with the best
kept validation mAP (on the validation labels of ``labels.val_protocol``) is kept, its classifier
restored, and only then is test read (once per final variant). The full protocol is the
ceiling: it runs bce and retdm only (--clml-protocols), and LL-R there is BCE exactly
(no unknown entry to reject), so llr's full cell is bce's.

Protocols: ``full`` (every label), ``keep0.75`` / ``keep0.4`` (that fraction of each
training image's positives kept, the rest unknown), ``single`` (one positive per
training image). Test keeps its full labels and is read once per variant; validation
(the epoch kept, the per-class thresholds, the grid choices) reads the labels of
``labels.val_protocol``: ``same`` (the product's default: the protocol hides validation
labels too, hidden read as negative, what a user has) or ``full`` (``--set
labels.val_protocol=full``: every validation label, the tables of earlier runs).

Datasets: ``scene`` (MIML scene, 2,000 images, 5 classes, 1.24 labels per image, frozen
EfficientNet-Lite0 at 224 px) and ``demo`` (the built-in generator, dense:
``--demo-classes`` 20 classes, ``--demo-labels`` 4-6 labels per image, 128 px). The
demo's ingest seed draws its images too, and re-extracting the features of a new set
per seed costs minutes on the CPU: by default every seed uses one set and split
(``--demo-seed 0``) and the bench seed sets labels.seed and the training seeds instead
(``--demo-seed -1``: a new set per seed).

Also measured: the CLML term's time per step as a fraction of a frozen-mode classifier
training step (batch 64, the dataset's class count, embedding 512, 1280 backbone
features), median over repeated steps.

    PYTHONPATH=. python bench/missing_labels.py --datasets scene --seeds 0 1 2

Writes ``docs/bench-missing-labels.md`` and ``.json`` (``--out`` to change); the json is
rewritten after every variant, so a run cut short keeps what it measured (a seed's
row counts in the tables once any of its protocols has a result).

Runs made apart (scene and demo side by side, a protocol added later) are written as one
report with ``--merge A.json B.json ... [--widen C.json ...] [--reading notes.md]``:
``--widen`` takes runs of ``--variants bce bce_clml`` on further grid points and adds
``bce_clml_wide``, whose weight is chosen on validation over all the points tried.
The published report (docs/) was made so, with cut epochs and grid (see its header).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RETDM_NO_PROGRESS", "1")

import torch  # noqa: E402

from bench.scene import configure, kept_val_map, run_until, test_metrics  # noqa: E402
import retdmctl  # noqa: E402
from retdmctl.allocator import tune_allocator  # noqa: E402
from retdmctl.config import Config, apply, parse_set, validate  # noqa: E402
from retdmctl.data.dataset import read_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS: dict[str, list[str]] = {
    "full": ["labels.protocol=full"],
    "keep0.75": ["labels.protocol=keep", "labels.fraction=0.75"],
    "keep0.4": ["labels.protocol=keep", "labels.fraction=0.4"],
    "single": ["labels.protocol=single"],
}
# run in this order: bce reuses retdm's classifier; bce_clml's grid leaves its chosen
# classifier in place, and retdm_clml goes on from it
ORDER = ("retdm", "bce", "llr", "llr_val", "llr_clml", "bce_clml", "retdm_clml", "bce_clml_lazy")
REPORTED = ("bce", "llr", "llr_val", "llr_clml", "bce_clml", "retdm", "retdm_clml", "bce_clml_lazy")
DEFAULT_VARIANTS = ["bce", "llr", "bce_clml", "retdm", "retdm_clml"]
# with --merge ... --widen: bce_clml with its weight chosen on validation over the union of
# the grids of the main run and of the widening runs (retdm_clml keeps the main choice)
WIDE = "bce_clml_wide"


def variants(lazy_every: int = 16) -> dict[str, dict]:
    """Each variant's stage and settings; "grid": its loss.clml (and tau) is chosen on
    validation, "pick": which choice it shares (retdm_clml takes bce_clml's)."""
    return {
        "bce": {"stage": "classifier", "set": ["loss.base=bce", "loss.clml=0"]},
        "llr": {"stage": "classifier", "set": ["loss.base=llr", "loss.clml=0"]},
        "llr_val": {"stage": "classifier", "set": ["loss.base=llr", "loss.clml=0"], "grid": True, "pick": "llr"},
        "llr_clml": {"stage": "classifier", "set": ["loss.base=llr"], "grid": True, "pick": "llr_clml", "on": "llr"},
        "bce_clml": {"stage": "classifier", "set": ["loss.base=bce"], "grid": True, "pick": "clml"},
        "retdm": {"stage": "joint", "set": ["loss.base=bce", "loss.clml=0"]},
        "retdm_clml": {"stage": "joint", "set": ["loss.base=bce"], "grid": True, "pick": "clml"},
        "bce_clml_lazy": {"stage": "classifier", "set": ["loss.base=bce", f"loss.clml_every={lazy_every}"],
                          "grid": True, "pick": "lazy"},
    }


def grid_points(args, pick: str = "clml") -> list[list[str]]:
    if pick == "llr":
        return [[f"loss.llr_delta_rel={v:g}"] for v in args.llr_grid]
    return [[f"loss.clml={lam:g}", f"loss.clml_tau={tau:g}"] for lam in args.clml_grid for tau in args.tau_grid]


def snapshot(ws: retdmctl.Workspace, stage: str, dest: Path) -> None:
    """Copy a stage's folder and manifest aside (the grid's best so far)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ws.layout.stage_dir(stage), dest / "dir")
    shutil.copy2(ws.layout.manifest_path(stage), dest / "manifest.json")


def restore(ws: retdmctl.Workspace, stage: str, src: Path) -> None:
    """Put a snapshot back: the stage is then up to date for the config it ran with."""
    shutil.rmtree(ws.layout.stage_dir(stage))
    shutil.copytree(src / "dir", ws.layout.stage_dir(stage))
    shutil.copy2(src / "manifest.json", ws.layout.manifest_path(stage))


def choose_on_val(ws: retdmctl.Workspace, base: Config, settings: list[str], args, keep: Path,
                  pick: str = "clml") -> tuple[list[str], list[dict]]:
    """Train stage 1 at every grid point; leave the best (kept validation mAP) in the
    workspace. Returns its settings and every point's validation mAP."""
    tried, best = [], None
    for point in grid_points(args, pick):
        cfg = configure(base, settings + point)
        run_until(ws, cfg, "classifier")
        score = kept_val_map(ws, cfg, "classifier")
        tried.append({"set": point, "val_mAP": score})
        if best is None or score > best[0]:
            best = (score, point)
            snapshot(ws, "classifier", keep)
    if tried[-1]["set"] != best[1]:
        restore(ws, "classifier", keep)
    return best[1], tried


def base_config(dataset: str, args) -> Config:
    base = Config()
    if dataset == "scene":
        base.ingest.source, base.ingest.path = "scene", str(Path(args.data).resolve())
        base.model.image_size = 224
    else:
        base.ingest.source, base.ingest.demo_images = "demo", args.demo_images
        base.ingest.demo_classes, base.ingest.demo_labels = args.demo_classes, args.demo_labels
        base.model.image_size = 128
    base.model.backbone, base.model.frozen_backbone = "efficientnet_lite0", True
    base.model.tune_blocks, base.model.views = 0, 1  # pooled features (not the product's tuned default)
    base.metric.epochs = 40
    apply(base, parse_set(args.set), "--set")
    validate(base)
    return base


def run_one(ws: retdmctl.Workspace, base: Config, settings: list[str], stage: str, started: float | None = None) -> dict:
    started = time.perf_counter() if started is None else started
    cfg = configure(base, settings)
    run_until(ws, cfg, stage)
    metrics = test_metrics(ws, cfg, stage)[0]["per_class"]  # eval.fusion off: the losses compared alone
    hidden = ws.layout.read_manifest(stage)["summary"].get("labels", {})
    return {
        "val_mAP": kept_val_map(ws, cfg, stage),
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


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def reading(dataset: str, per_seed: dict, protocols: list[str]) -> list[str]:
    """Per missing-label protocol: BCE+CLML against assume-negative BCE (paired over
    the seeds, and against the seed std of bce), and the share of the gap between
    assume-negative BCE and full-label BCE that each method closes (mAP)."""
    seeds = sorted(per_seed, key=int)
    md = []
    for p in protocols:
        if p == "full":
            continue
        both = [s for s in seeds if "full" in per_seed[s] and "bce" in per_seed[s]["full"] and "bce" in per_seed[s].get(p, {})]
        if not both:
            continue
        bce = [per_seed[s][p]["bce"]["mAP"] for s in both]
        ceiling = [per_seed[s]["full"]["bce"]["mAP"] for s in both]
        gap = statistics.mean(ceiling) - statistics.mean(bce)
        cells = []
        for v in REPORTED + (WIDE,):
            ss = [s for s in both if v in per_seed[s][p]]
            if v == "bce" or not ss:
                continue
            vals = [per_seed[s][p][v]["mAP"] for s in ss]
            diffs = [per_seed[s][p][v]["mAP"] - per_seed[s][p]["bce"]["mAP"] for s in ss]
            wins = sum(d > 0 for d in diffs)
            frac = (statistics.mean(vals) - statistics.mean(bce)) / gap if gap > 0 else float("nan")
            cells.append((v, statistics.mean(diffs), _sd(diffs), wins, len(ss), frac))
        md.append(f"* **{p}** (mAP; gap full − assume-negative bce = {gap:+.4f}, seed std of bce = {_sd(bce):.4f}):")
        for v, d, sd, wins, n, frac in cells:
            md.append(f"  {v} − bce = {d:+.4f} ± {sd:.4f} (paired; better on {wins}/{n} seeds), "
                      f"{100 * frac:.0f} % of the gap")
        lazy = [s for s in seeds if {"bce_clml", "bce_clml_lazy"} <= set(per_seed[s].get(p, {}))]
        for metric in ("mAP", "C-F1") if lazy else ():
            diffs = [per_seed[s][p]["bce_clml_lazy"][metric] - per_seed[s][p]["bce_clml"][metric] for s in lazy]
            md.append(f"  bce_clml_lazy − bce_clml ({metric}) = {statistics.mean(diffs):+.4f} ± {_sd(diffs):.4f} "
                      f"(paired; better on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds)")
    return md


def tables(results: dict, args, timing: dict, chosen: dict) -> list[str]:
    md = []
    for dataset, per_seed in results.items():
        seeds = sorted(per_seed, key=int)
        if not seeds:
            continue
        protocols = [p for p in PROTOCOLS if any(per_seed[s].get(p) for s in seeds)]
        md += [f"## {dataset} (seeds {', '.join(map(str, seeds))}; test, per-class thresholds from validation)", ""]
        if dataset in args.notes:
            md += [args.notes[dataset], ""]
        for metric in ("mAP", "C-F1"):
            md += [f"### {metric}", "", "| variant | " + " | ".join(protocols) + " |",
                   "|---|" + "---|" * len(protocols)]
            for v in REPORTED + (WIDE,):
                if not any(v in per_seed[s].get(p, {}) for s in seeds for p in protocols):
                    continue
                cells = []
                for p in protocols:
                    vals = [per_seed[s][p][v][metric] for s in seeds if v in per_seed[s].get(p, {})]
                    n = f" (n={len(vals)})" if 0 < len(vals) < len(seeds) else ""
                    cells.append(mean_std(vals) + n)
                md.append(f"| {v} | " + " | ".join(cells) + " |")
            md.append("")
        md += ["### Against assume-negative BCE", ""] + reading(dataset, per_seed, protocols) + [""]
        picks = chosen.get(dataset, {})
        grid_protocols = [q for p in protocols for q in (p, f"{p}:lazy", f"{p}:llr", f"{p}:llr_clml")
                          if any(picks.get(s, {}).get(q) for s in seeds)]
        if grid_protocols:
            md += ["### Chosen on validation (in bold; [each value tried: kept validation mAP]): loss.clml, "
                   "or loss.llr_delta_rel in the :llr columns", "",
                   "| seed | " + " | ".join(grid_protocols) + " |", "|---|" + "---|" * len(grid_protocols)]
            for s in seeds:
                row = []
                for p in grid_protocols:
                    c = picks.get(s, {}).get(p)
                    if not c:
                        row.append("–")
                        continue
                    best = max(c["tried"], key=lambda t: t["val_mAP"])
                    tried = ", ".join(f"{t['set'][0].split('=')[1]}: {t['val_mAP']:.4f}" for t in c["tried"])
                    taus = {t["set"][1] for t in c["tried"] if len(t["set"]) > 1}
                    tau = f" (tau {best['set'][1].split('=')[1]})" if len(taus) > 1 else ""
                    row.append(f"**{best['set'][0].split('=')[1]}**{tau} [{tried}]")
                md.append(f"| {s} | " + " | ".join(row) + " |")
            md.append("")
        hidden = []
        for p in protocols:
            vals = [r.get("hidden_positives") for s in seeds for r in per_seed[s].get(p, {}).values()]
            tot = [r.get("train_positives") for s in seeds for r in per_seed[s].get(p, {}).values()]
            if vals and vals[0] is not None:
                hidden.append(f"{p}: {vals[0]} of {tot[0]}")
        md += ["Training positives hidden (first seed): " + "; ".join(hidden), ""]
    if timing:
        k = getattr(args, "lazy_every", 16)
        md += ["## CLML cost per frozen-mode training step (batch 64, embedding 512, 1280 features)", "",
               f"The lazy column: the term on one step in {k} (loss.clml_every = {k}), its cost spread over the {k}.", "",
               "| dataset | classes | step (ms) | step + CLML (ms) | CLML (ms) | CLML share of the step | "
               f"lazy (every {k}) share | load |",
               "|---|---|---|---|---|---|---|---|"]
        for dataset, t in timing.items():
            lazy = (t["clml_ms"] / k) / (t["step_ms"] + t["clml_ms"] / k)
            md.append(f"| {dataset} | {t['classes']} | {t['step_ms']:.1f} | {t['step_with_clml_ms']:.1f} | "
                      f"{t['clml_ms']:.1f} | {100 * t['fraction']:.0f} % | {100 * lazy:.1f} % | {t['load']:.1f} |")
        md.append("")
    return md


def header(cmds: list[str], ref: Config, args, wall: str) -> list[str]:
    return [
        "# Missing labels: losses compared under label protocols",
        "",
        "; ".join(cmds) + ": "
        f"frozen {ref.model.backbone}; classifier {ref.classifier.epochs} epochs, "
        f"metric {ref.metric.epochs}, joint {ref.joint.epochs}; CLML variants (protocols "
        f"{', '.join(args.clml_protocols)}): loss.clml chosen per seed and protocol on the kept validation mAP of "
        f"stage 1 from {{{', '.join(f'{v:g}' for v in args.clml_grid)}}}, tau from "
        f"{{{', '.join(f'{v:g}' for v in args.tau_grid)}}} (delta 1, from epoch 1), retdm_clml uses bce_clml's choice; "
        f"LL-R at its published schedule (0.2 %/epoch); mean ± std over seeds; {wall}.",
        "",
        "Validation labels (epoch kept, thresholds, every choice on validation): "
        + ("the same protocol as training, its own draw, hidden labels read as negative (labels.val_protocol = same)"
           if ref.labels.val_protocol == "same" else "full, every label (labels.val_protocol = full)")
        + "; test: full labels.",
        "",
    ]


def command(args) -> str:
    cmd = f"PYTHONPATH=. python bench/missing_labels.py --datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))}"
    if args.protocols != list(PROTOCOLS):
        cmd += " --protocols " + " ".join(args.protocols)
    if args.clml_protocols != ["keep0.75", "keep0.4", "single"]:
        cmd += " --clml-protocols " + " ".join(args.clml_protocols)
    if args.variants != DEFAULT_VARIANTS:
        cmd += " --variants " + " ".join(args.variants)
    if getattr(args, "llr_grid", [0.002, 0.005, 0.01, 0.02]) != [0.002, 0.005, 0.01, 0.02]:
        cmd += " --llr-grid " + " ".join(f"{v:g}" for v in args.llr_grid)
    if getattr(args, "lazy_every", 16) != 16:
        cmd += f" --lazy-every {args.lazy_every}"
    if args.clml_grid != [0.01, 0.03, 0.1, 0.3]:
        cmd += " --clml-grid " + " ".join(f"{v:g}" for v in args.clml_grid)
    return cmd + "".join(f" --set {x}" for x in args.set)


def notes(args) -> dict[str, str]:
    return {
        "scene": "MIML scene: 2,000 images, 5 classes, 1.24 labels per image, EfficientNet-Lite0 at 224 px; "
                 "each seed is a new split.",
        "demo": f"Built-in demo set, dense: {args.demo_images} images, {args.demo_classes} classes, {args.demo_labels} "
                f"labels per image (`retdmctl ingest demo --classes {args.demo_classes} --labels {args.demo_labels}`), "
                "EfficientNet-Lite0 at 128 px; " + (
                    f"one set and split (ingest seed {args.demo_seed}); each seed sets labels.seed and the training "
                    "seeds." if args.demo_seed is not None else "each seed a new set and split."),
    }


def widen(paths: list[str], results: dict, chosen: dict) -> list[str]:
    """Add bce_clml_wide: per dataset, seed and protocol, the bce_clml whose weight has
    the best kept validation mAP over every grid point tried (main run and widening
    runs); test was read for each run's own choice, and only the winner's is kept."""
    extra = [json.loads(Path(p).read_text()) for p in paths]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for dataset, per_seed in chosen.items():
        for seed, per_protocol in per_seed.items():
            for protocol, pick in per_protocol.items():
                if ":" in protocol:  # another variant's own choice (bce_clml_lazy)
                    continue
                best_val, best = max(pick["tried"], key=lambda t: t["val_mAP"])["val_mAP"], results[dataset][seed][protocol]["bce_clml"]
                best_set = pick["set"]
                tried = list(pick["tried"])
                for run in extra:
                    other = run["chosen"].get(dataset, {}).get(seed, {}).get(protocol)
                    if not other:
                        continue
                    tried += other["tried"]
                    val = max(t["val_mAP"] for t in other["tried"])
                    if val > best_val:
                        best_val, best, best_set = val, run["results"][dataset][seed][protocol]["bce_clml"], other["set"]
                if len(tried) > len(pick["tried"]):
                    results[dataset][seed][protocol][WIDE] = {**best, "set": best_set, "tried": tried}
                    lam = best_set[0].split("=")[1]
                    counts.setdefault(dataset, {}).setdefault(protocol, {}).setdefault(lam, 0)
                    counts[dataset][protocol][lam] += 1
    md = ["## bce_clml_wide: the weight chosen over the wider grid", "",
          "loss.clml chosen on validation over the union of the main grid and the widening runs' points; "
          "how often each value was chosen (seeds):", ""]
    for dataset, per_protocol in counts.items():
        for protocol, c in per_protocol.items():
            lams = sorted({t["set"][0].split("=")[1] for s in results[dataset].values() for t in s.get(protocol, {}).get(WIDE, {}).get("tried", [])}, key=float)
            md.append(f"* {dataset} {protocol}: grid {{{', '.join(lams)}}}; chosen " +
                      ", ".join(f"{lam} × {n}" for lam, n in sorted(c.items(), key=lambda kv: float(kv[0]))))
    return md + [""]


def merge(args) -> None:
    """One markdown and json from several runs (e.g. scene and demo run side by side)."""
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    results, chosen, timing, cmds, minutes, all_notes = {}, {}, {}, [], 0.0, {}
    for run in runs:
        ns = argparse.Namespace(**run["args"])
        for into, part in ((results, run["results"]), (chosen, run["chosen"])):
            for dataset, per_seed in part.items():  # runs may add protocols to the same seeds
                for seed, per_protocol in per_seed.items():
                    into.setdefault(dataset, {}).setdefault(seed, {}).update(per_protocol)
        for dataset, t in run["clml_timing"].items():
            timing.setdefault(dataset, t)
        cmds.append(f"`{command(ns)}` ({run['minutes']:.1f} min)")
        minutes += run["minutes"]
        all_notes.setdefault(ns.datasets[0], notes(ns)[ns.datasets[0]])
    wide_md = widen(args.widen, results, chosen) if args.widen else []
    for p in args.widen:
        run = json.loads(Path(p).read_text())
        cmds.append(f"`{command(argparse.Namespace(**run['args']))}` ({run['minutes']:.1f} min)")
        minutes += run["minutes"]
    first = argparse.Namespace(**runs[0]["args"])
    first.notes = all_notes
    first.clml_protocols = [p for p in PROTOCOLS if any(p in r["args"]["clml_protocols"] for r in runs)]
    ref = configure(Config(), first.set)
    md = header(cmds, ref, first, f"{minutes:.1f} min summed over the runs (scene and demo runs went side by side on the 2 cores)")
    if args.reading:
        md += [Path(args.reading).read_text().rstrip(), ""]
    md += tables(results, first, timing, chosen) + wide_md
    out = Path(args.out)
    Path(f"{out}.md").write_text("\n".join(md))
    Path(f"{out}.json").write_text(json.dumps(
        {"runs": [r["args"] for r in runs], "results": results, "chosen": chosen, "clml_timing": timing,
         "minutes": minutes}, indent=1))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["scene", "demo"], choices=["scene", "demo"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scene"))
    parser.add_argument("--demo-images", type=int, default=2000)
    parser.add_argument("--demo-classes", type=int, default=20)
    parser.add_argument("--demo-labels", default="4-6", help="labels per demo image: K or MIN-MAX")
    parser.add_argument("--demo-seed", type=int, default=0,
                        help="demo: draw the images and split with this ingest seed for every bench seed, which then "
                        "sets labels.seed and the training seeds (-1: the bench seed is the ingest seed, a new set each)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="write the tables of these earlier runs' json together")
    parser.add_argument("--reading", metavar="MD", help="with --merge: a hand-written reading of the results, put first")
    parser.add_argument("--widen", nargs="+", metavar="JSON", default=[],
                        help="with --merge: runs of bce_clml on more grid points; adds bce_clml_wide, chosen on "
                        "validation over all the points")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--clml-protocols", nargs="+", default=["keep0.75", "keep0.4", "single"], choices=list(PROTOCOLS),
                        help="protocols that run the CLML variants (full is the ceiling: bce and retdm)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(REPORTED))
    parser.add_argument("--lazy-every", type=int, default=16, help="bce_clml_lazy: the term on every k-th step")
    parser.add_argument("--llr-grid", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02],
                        help="llr_val: loss.llr_delta_rel values tried on validation")
    parser.add_argument("--clml-grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3],
                        help="loss.clml values tried on validation (stage 1)")
    parser.add_argument("--tau-grid", type=float, nargs="+", default=[0.75], help="loss.clml_tau values tried")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="applied to every variant")
    parser.add_argument("--workdir", help="reuse this folder for the workspaces (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench-missing-labels"), help="path without suffix; .md and .json are added")
    args = parser.parse_args()
    tune_allocator()  # as the CLI does: the CNN runs 2.5-3x faster on the CPU
    if args.demo_seed is not None and args.demo_seed < 0:
        args.demo_seed = None
    if args.merge:
        merge(args)
        return

    specs = variants(args.lazy_every)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-missing-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    chosen: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    started = time.perf_counter()
    ref = base_config(args.datasets[0], args)

    args.notes = notes(args)

    def write() -> list[str]:
        md = header([f"`{command(args)}`"], ref, args, f"{(time.perf_counter() - started) / 60:.1f} min of wall time") + tables(results, args, timing, chosen)
        Path(f"{out}.md").write_text("\n".join(md))
        Path(f"{out}.json").write_text(json.dumps(
            {"args": vars(args), "results": results, "chosen": chosen, "clml_timing": timing,
             "minutes": (time.perf_counter() - started) / 60}, indent=1))
        return md

    for dataset in args.datasets:
        ws = retdmctl.Workspace(workdir / dataset)
        keep = (workdir / f"{dataset}-best").resolve()
        base = base_config(dataset, args)
        results[dataset], chosen[dataset] = {}, {}
        for seed in args.seeds:
            if dataset == "demo" and args.demo_seed is not None:
                # one generated set and split (its images are re-drawn, and their features
                # re-extracted, for every ingest seed): the seed draws the hidden labels
                # and the training runs instead
                base.ingest.seed = args.demo_seed
                base.labels.seed = base.classifier.seed = base.metric.seed = base.joint.seed = seed
            else:
                base.ingest.seed = seed  # a new split; the image store and features are reused
            ws.run(until="ingest", config=base, save=False)
            if dataset not in timing:
                classes = read_dataset(ws.layout.dataset).num_classes
                timing[dataset] = {"classes": classes, **clml_step_fraction(classes)}
            results[dataset][seed], chosen[dataset][seed] = {}, {}
            for protocol in args.protocols:
                results[dataset][seed][protocol] = {}
                row = results[dataset][seed][protocol]
                picks: dict[str, dict] = {}
                for name in ORDER:
                    if name not in args.variants:
                        continue
                    spec = specs[name]
                    t0 = time.perf_counter()
                    if protocol == "full" and name == "llr" and "bce" in row:
                        row[name] = {**row["bce"], "same_as": "bce"}  # no unknown entry: LL-R is BCE
                        continue
                    if spec.get("grid"):
                        if protocol not in args.clml_protocols:
                            continue
                        fixed = spec["set"] + (picks[spec["on"]]["set"] if "on" in spec else [])  # llr_clml: llr_val's rate
                        if spec["pick"] not in picks:  # stage 1 at every grid point; the best is left in place
                            point, tried = choose_on_val(ws, base, fixed + PROTOCOLS[protocol], args, keep, spec["pick"])
                            picks[spec["pick"]] = {"set": point, "tried": tried, "seconds": time.perf_counter() - t0}
                            key = protocol if spec["pick"] == "clml" else f"{protocol}:{spec['pick']}"
                            chosen[dataset][seed][key] = picks[spec["pick"]]
                        pick = picks[spec["pick"]]
                        settings = fixed + pick["set"]
                    else:
                        settings = spec["set"]
                    r = run_one(ws, base, settings + PROTOCOLS[protocol], spec["stage"], t0)
                    row[name] = r
                    print(f"{dataset} seed {seed} {protocol:9s} {name:10s} val mAP {r['val_mAP']:.4f} test mAP "
                          f"{r['mAP']:.4f} C-F1 {r['C-F1']:.4f} {r['seconds']:.0f}s "
                          f"{' '.join(pick['set']) if spec.get('grid') else ''}", flush=True)
                    write()
    print("\n".join(write()))


if __name__ == "__main__":
    main()
