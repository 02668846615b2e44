"""Gathering what the evaluation report shows, from a workspace and the eval stage's
results; :mod:`retdmctl.report.page` renders it.

``build_report(ws, cfg, info, result, scores=..., labels=..., rows=...)`` is what
``retdmctl eval`` calls. Passing ``model`` (the evaluated network, in eval mode) adds the
embedding projection; the other classifying stage (classifier vs joint) is scored for
the side-by-side columns when its checkpoint exists and the split is cheap to score.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from retdmctl import __version__
from retdmctl.config import TRAINED_STAGES, Config
from retdmctl.data.dataset import DatasetInfo
from retdmctl.inputs import image_source
from retdmctl.metrics import compute_metrics, per_class_average_precision
from retdmctl.model_io.scoring import embed_rows, score_split
from retdmctl.report import calibration, paper
from retdmctl.report.page import render_page
from retdmctl.runtime import load_checkpoint
from retdmctl.workspace import Workspace, now_iso

MAX_THUMBNAILS = 36
MAX_PROJECTED = 1500
MAX_COMPARE_IMAGES = 5000  # beyond this, scoring the other checkpoint with a CNN pass is too slow to do silently


def per_class_table(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                    known: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per class: positives, threshold, precision, recall, F1 (class) and AP (class).
    Precision is 0 with no predicted positive (as in C-P); recall, F1 and AP are None
    for a class without positives. Unknown entries (``known`` False) are left out."""
    known = np.ones(labels.shape, dtype=bool) if known is None else known
    y = labels.astype(bool) & known
    pred = (scores >= thresholds[None, :]) & known
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    pos = y.sum(0)
    ap = per_class_average_precision(labels, scores, known)
    out = []
    for c in range(labels.shape[1]):
        p = float(tp[c] / (tp[c] + fp[c])) if tp[c] + fp[c] else 0.0
        r = float(tp[c] / pos[c]) if pos[c] else None
        f1 = None if r is None else (2 * p * r / (p + r) if p + r else 0.0)
        out.append({"support": int(pos[c]), "threshold": float(thresholds[c]), "precision": p, "recall": r,
                    "f1": f1, "ap": None if np.isnan(ap[c]) else float(ap[c])})
    return out


def pr_curves(labels: np.ndarray, scores: np.ndarray, points: int = 150,
              known: np.ndarray | None = None) -> list[dict[str, Any] | None]:
    """Per class the precision-recall curve over the images where the class is known (None
    without positives), at most ``points`` points."""
    ap = per_class_average_precision(labels, scores, known)
    curves: list[dict[str, Any] | None] = []
    for c in range(labels.shape[1]):
        at = slice(None) if known is None else known[:, c]
        y, s = labels[at, c].astype(bool), scores[at, c]
        if not y.any():
            curves.append(None)
            continue
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(y[order])
        k = np.arange(1, len(order) + 1)
        precision, recall = tp / k, tp / y.sum()
        keep = np.unique(np.linspace(0, len(order) - 1, min(points, len(order))).round().astype(int))
        curves.append({"recall": [0.0, *recall[keep].round(4).tolist()],
                       "precision": [float(precision[keep][0].round(4)), *precision[keep].round(4).tolist()],
                       "ap": float(ap[c])})
    return curves


def thumbnail_uri(data: bytes, side: int = 160) -> str:
    from retdmctl.data.loaders import decode

    img = decode(data)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def worst_first(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                known: np.ndarray | None = None) -> np.ndarray:
    """Image order, worst first: wrong decisions first, then by the summed |y - p|, over
    the known labels."""
    known = np.ones(labels.shape, dtype=bool) if known is None else known
    wrong = (((scores >= thresholds[None, :]) != labels.astype(bool)) & known).sum(1)
    severity = (np.abs(labels - scores) * known).sum(1)
    return np.lexsort((-severity, -wrong))


def thumbnails(ws: Workspace, info: DatasetInfo, rows: np.ndarray, labels: np.ndarray, scores: np.ndarray,
               thresholds: np.ndarray, limit: int = MAX_THUMBNAILS) -> list[dict[str, Any]]:
    known = info.known_at(rows)
    from retdmctl.data.store import ImageReader

    if not ws.lmdb.exists():
        return []
    reader = ImageReader(ws.lmdb)
    names = info.class_names
    out = []
    try:
        for i in worst_first(labels, scores, thresholds, known)[:limit]:
            key = info.ids[int(rows[i])]
            try:
                uri = thumbnail_uri(reader.get(key))
            except Exception:  # a missing or undecodable image: leave it out of the grid
                continue
            pred = [(names[c], float(scores[i, c])) for c in np.argsort(-scores[i]) if scores[i, c] >= thresholds[c]]
            out.append({"id": key, "uri": uri, "true": [names[c] for c in np.flatnonzero(labels[i])], "pred": pred})
    finally:
        reader.close()
    return out


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The first two principal components of ``x`` (rows) and their explained-variance shares."""
    x = x.astype(np.float64) - x.mean(0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2)), [0.0, 0.0]
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros_like(comps)])
    var = s**2
    share = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
    return x @ comps.T, share + [0.0] * (2 - len(share))


def _score_other(ws: Workspace, cfg: Config, info: DatasetInfo, stage: str, rows: np.ndarray, device):
    """Scores of another stage's checkpoint on ``rows`` (or why not)."""
    path = ws.stage_dir(stage) / "checkpoint.pt"
    if not path.exists():
        return None, None, f"no {stage} checkpoint"
    if not cfg.model.frozen_backbone and len(rows) > MAX_COMPARE_IMAGES:
        return None, None, f"{stage} not scored ({len(rows)} images): run retdmctl eval --checkpoint {stage}"
    scored = score_split(ws, cfg, info, stage, rows, device)  # scored as eval scores the evaluated model
    return scored.scores, scored.rule.cut(cfg.eval.thresholds, cfg.eval.threshold, info.num_classes), None


def _training_labels(ws: Workspace, stage: str) -> str:
    """What the evaluated model was trained on, from its stage's manifest: every label,
    or the protocol and how many training positives it hid (unknowns included)."""
    from retdmctl.data.protocols import describe

    summary = (ws.read_manifest(stage) or {}).get("summary", {})
    if "labels" not in summary:
        return "(not recorded)"
    s = summary["labels"]
    if s["protocol"] == "full" and not s["unknown_entries"]:
        return "every label (no protocol, no unknown entry)"
    return describe(summary).removeprefix("labels: ")


def _evaluation_labels(info: DatasetInfo, rows: np.ndarray) -> str:
    entries, images = info.unknown_count(rows)
    if not entries:
        return "every label known"
    return f"{entries} unknown (?name) in {images} images, left out of every metric"


def gather(ws: Workspace, cfg: Config, info: DatasetInfo, result: Mapping[str, Any], *, scores: np.ndarray,
           labels: np.ndarray, rows: np.ndarray, model=None, device=None, compare: bool = True) -> dict[str, Any]:
    """The report's data as plain Python values (see :func:`retdmctl.report.page.render_page`)."""
    from retdmctl.models.backbones import get_backbone_spec

    stage, split = cfg.eval.checkpoint, result.get("split", cfg.eval.split)
    names = list(info.class_names)
    known = info.known_at(rows)  # None: every label of the split is known
    thr_value = result["thresholds"]["values"]
    thresholds = np.array([thr_value[n] for n in names], dtype=np.float64)
    threshold_note = (f"Thresholded metrics at {float(thresholds[0]):g} for every class" if np.ptp(thresholds) == 0
                      else "Thresholded metrics at the per-class thresholds chosen on validation")
    threshold_note += f"; {split} split, {len(rows)} images. Bold: the better of our two models."
    if vote := result.get("fusion"):
        threshold_note += (f" Scores fused with the vote of the {vote['k']} nearest of {vote['bank_images']} training "
                           f"images in embedding space (temperature {vote['temp']:g}, weight {vote['w']:g}), "
                           "chosen on validation.")

    metrics = {f"{stage} (ours)": dict(result["metrics"])}
    compare_note = ""
    # The classifier beside the joint model: the stage it started from (an input of
    # eval whenever eval scores the joint model, so never stale), at its own thresholds.
    if compare and stage == "joint":
        other = "classifier"
        other_scores, other_cut, why = _score_other(ws, cfg, info, other, rows, device or torch.device("cpu"))
        if other_scores is not None:
            metrics[f"{other} (ours)"] = compute_metrics(labels, other_scores, threshold=other_cut, known=known)
            metrics = {k: metrics[k] for k in sorted(metrics, key=lambda k: not k.startswith("classifier"))}
        compare_note = why or ""

    history = {}
    for s in TRAINED_STAGES:
        path = ws.stage_dir(s) / "checkpoint.pt"
        if path.exists():
            history[s] = list(load_checkpoint(path).get("history", []))

    train_rows = info.split("train")
    y_train = info.labels[train_rows].astype(np.int64)
    cooc = (y_train.T @ y_train).tolist()

    projection = None
    if model is not None:
        sub = rows
        if len(rows) > MAX_PROJECTED:
            sub = np.sort(np.random.default_rng(0).choice(rows, MAX_PROJECTED, replace=False))
        try:
            spec = get_backbone_spec(cfg.model.backbone)
            emb = embed_rows(model, image_source(ws, cfg, info, spec), sub, device or torch.device("cpu"))
            pts, share = pca_2d(emb)
            projection = {
                "points": pts.round(3).tolist(),
                "labels": [np.flatnonzero(info.labels[r]).tolist() for r in sub],
                "note": (f"PCA of the {emb.shape[1]}-d embeddings f = phi(x) of {len(sub)} {split} images "
                         f"(explained variance {share[0]:.0%} and {share[1]:.0%}); colour: the image's first label "
                         "in class order, grey: no label."),
            }
        except Exception as exc:  # the projection is a nice-to-have
            projection = {"points": [], "labels": [], "note": f"no projection: {exc}"}

    split_sizes = {name: int(len(info.split(name))) for name in ("train", "val", "test")}
    m = cfg.model
    return {
        "title": f"retdmctl evaluation: {stage} model on {cfg.ingest.source or 'the dataset'} ({split} split)",
        "subtitle": compare_note,
        "dataset": {
            "name": cfg.ingest.source,
            "source": cfg.ingest.path or cfg.ingest.images or "(generated)",
            "fingerprint": ws.fingerprint(ws.dataset) or "",
            "images": len(info.ids),
            "classes": len(names),
            "splits": split_sizes,
        },
        "model": {
            "evaluated checkpoint": result.get("checkpoint", ""),
            "backbone": m.backbone + (" (frozen, cached features)" if m.frozen_backbone else " (fine-tuned)"),
            "pretrained": m.pretrained,
            "image size": f"{m.image_size} px (resize shorter side to {round(m.image_size * 256 / 224)}, centre crop)",
            "embedding D": m.embed_dim,
            "threshold": result["thresholds"]["rule"] if result["thresholds"]["rule"] != "fixed" else f"fixed {cfg.eval.threshold}",
            "training labels": _training_labels(ws, stage),
            f"{split} labels": _evaluation_labels(info, rows),
        },
        "config": cfg.to_dict(),
        "metrics": metrics,
        "paper": paper.columns(cfg.ingest.source),  # checked figures only (report/paper.py)
        "paper_note": paper.note(cfg.ingest.source),
        "threshold_note": threshold_note,
        "split_note": result.get("split_note"),  # on val: validation made the model's choices
        "class_names": names,
        "per_class": per_class_table(labels, scores, thresholds, known),
        "per_class_note": (f"{stage} model, {split} split. AP (class): average precision of one class over the "
                           "images; mAP is their mean. Not to be confused with the avg. precision (label ranking) "
                           "metric, an average over images."),
        "pr_curves": pr_curves(labels, scores, known=known),
        "calibration": calibration.summary(labels, scores, known),
        "calibration_note": (f"{stage} model, {split} split, every (image, class) entry pooled"
                             + (", scores fused with the neighbour vote" if vote else "")
                             + ("; unknown labels left out" if known is not None else "") + "."),
        "cooccurrence": cooc,
        "cooccurrence_note": f"Training split ({len(train_rows)} images)",
        "history": history,
        "thumbnails": thumbnails(ws, info, rows, labels, scores, thresholds),
        "thumbnails_note": f"{split} images the {stage} model gets most wrong (wrong decisions, then |y - p|).",
        "projection": projection,
        "footer": {"retdmctl": __version__, "created": now_iso(), "workdir": str(ws.root)},
    }


def build_report(ws: Workspace, cfg: Config, info: DatasetInfo, result: Mapping[str, Any], **kwargs: Any) -> str:
    """The report page (one self-contained HTML string); ``kwargs`` as for :func:`gather`."""
    return render_page(gather(ws, cfg, info, result, **kwargs))
