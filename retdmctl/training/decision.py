"""Choosing how a trained model decides, on the validation split: the neighbour vote
and the thresholds saved in its checkpoint (read back by
:func:`retdmctl.model_io.checkpoint.decision_rule`), and the validation figures that
select the epoch. Scoring itself is :mod:`retdmctl.model_io.scoring`'s."""

from __future__ import annotations

import numpy as np
import torch

from retdmctl import fusion, thresholds
from retdmctl.data.dataset import DatasetInfo
from retdmctl.metrics import compute_metrics
from retdmctl.model_io.scoring import predict_scores, predict_with_embeddings
from retdmctl.models.retdm import RETDM


def describe_vote(vote: dict) -> str:
    where = f"on {vote['considered']['images']:,} images" if "considered" in vote else "on validation"
    if vote["w"] == 0:
        seen = vote.get("considered")
        if seen is not None and seen["w"] > 0:
            return (f"neighbour vote: off ({where}, the best vote, k {seen['k']}, t {seen['temp']:g}, w {seen['w']:g}, "
                    f"took mAP {vote['plain_val_mAP']:.4f} -> {seen['mAP']:.4f} but C-F1 "
                    f"{seen['plain_C-F1']:.4f} -> {seen['C-F1']:.4f})")
        return f"neighbour vote: off (no (k, t, w) beat mAP {vote['plain_val_mAP']:.4f} {where})"
    seen = vote.get("considered") or {}
    cf1 = f", C-F1 {seen['plain_C-F1']:.4f} -> {seen['C-F1']:.4f}" if seen else ""
    return (f"neighbour vote: k {vote['k']}, t {vote['temp']:g}, w {vote['w']:g} "
            f"({where}: mAP {vote['plain_val_mAP']:.4f} -> {vote['val_mAP']:.4f}{cf1})")


def choose_decision(model: RETDM, source, info: DatasetInfo, device: torch.device,
                    train_features: np.ndarray | None = None, console=None, stage: str = "",
                    out_of_fold: list[fusion.Scored] = (), record: dict | None = None) -> dict:
    """How this model decides, saved in its checkpoint: the neighbour vote's (k, t, w)
    with its bank of training embeddings (``fusion``, :mod:`retdmctl.fusion`; w = 0 where
    the vote does not improve both mAP and C-F1), the thresholds of the plain scores
    (``threshold_choice``) and of the fused ones (``fusion["threshold_choice"]``), and
    ``thresholds``: the per-class ones that predict uses by default, those of the fused
    scores. Chosen on the validation split scored by this model and, with
    ``out_of_fold`` (:mod:`retdmctl.training.folds`), on the training images scored by
    models that never trained on them, pooled; ``record`` (how those were made) is saved
    as ``decision``. ``info`` holds the training labels the model was trained on;
    ``train_features`` the training rows' f where already computed."""
    train_rows, val_rows = info.split("train"), info.split("val")
    scores, labels, val_f = predict_with_embeddings(model, source, val_rows, device)
    if train_features is None:
        _, _, train_features = predict_with_embeddings(model, source, train_rows, device)
    known = info.known_at(val_rows)  # unknown validation labels take no part in any choice
    vote = fusion.choose(train_features, (info.labels[train_rows] > 0).astype(np.uint8), train_rows,
                         val_f, scores, labels, known, ids=info.ids_digest, out_of_fold=list(out_of_fold))
    parts = [(scores, labels, known), *((s.p, s.y, s.known) for s in out_of_fold)]
    pooled_known = None
    if any(k is not None for _, _, k in parts):
        pooled_known = np.concatenate([np.ones(p.shape, bool) if k is None else k for p, _, k in parts])
    plain = thresholds.choose(np.concatenate([y for _, y, _ in parts]), np.concatenate([p for p, _, _ in parts]),
                              pooled_known)
    used = vote["threshold_choice"] if vote["w"] > 0 else plain
    if console is not None:
        console.print(f"{stage}: {describe_vote(vote)}" if stage else describe_vote(vote), soft_wrap=True)
    decision = {"folds": 0, "images": int(len(val_rows)), "validation_images": int(len(val_rows))}
    decision.update(record or {})
    return {"threshold_choice": plain, "fusion": vote, "thresholds": used["per_class"], "decision": decision}


def val_bce_and_map(model: RETDM, source, rows: np.ndarray, device: torch.device,
                    known: np.ndarray | None = None) -> dict[str, float]:
    """Validation BCE and mAP over the known entries (``known``: ``info.known_at(rows)``)."""
    scores, labels = predict_scores(model, source, rows, device)
    eps = 1e-7
    p = np.clip(scores, eps, 1 - eps)
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    bce = float(bce.mean() if known is None else bce[known].mean())
    return {"val_loss": bce, "val_mAP": compute_metrics(labels, scores, known=known)["mAP"]}

