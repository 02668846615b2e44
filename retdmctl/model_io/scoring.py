"""Scoring: images (or the cached inputs of frozen-backbone mode) into probabilities and
embeddings, one way.

:func:`score_batch` is the per-batch step every scorer runs: f = phi(x), logits = W_c f,
p = sigmoid(logits), fused with the neighbour vote where one is applied. The exported
network (:class:`retdmctl.inference.ImageClassifier`) traces it; predict runs it under
autocast; :func:`score_rows` runs it over a split's rows. :func:`score_split` is the eval
stage's recipe (a stage's checkpoint, restored, scored on dataset rows, with its decision
rule), which the report repeats for the model it shows beside the evaluated one.

Under torchrun, scoring and embedding are sharded over the ranks and gathered (every
rank gets the whole result, in order; ``retdmctl.distributed``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from retdmctl import distributed
from retdmctl.config import Config
from retdmctl.data.dataset import DatasetInfo
from retdmctl.fusion import NeighbourVote
from retdmctl.inputs import image_source
from retdmctl.model_io.checkpoint import DecisionRule, build_model, decision_rule, restore_image_model
from retdmctl.models.retdm import RETDM
from retdmctl.progress import track
from retdmctl.runtime import autocast, load_checkpoint, prepare_model, to_device
from retdmctl.workspace import Workspace


def score_batch(net: RETDM, x: torch.Tensor, vote: NeighbourVote | None = None, exclude: torch.Tensor | None = None,
                cast: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f, logits, probabilities) of one batch: phi and W_c under ``cast`` (autocast, or
    nothing), then sigmoid(logits) in float32, fused with ``vote`` where given (``exclude``:
    each row's bank position to leave out of its own vote, see
    :meth:`~retdmctl.fusion.NeighbourVote.positions`). Traceable without ``cast``."""
    with cast if cast is not None else contextlib.nullcontext():
        f = net.embed_images(x)
        logits = net.classify(f)
    probs = torch.sigmoid(logits.float())
    if vote is not None:
        probs = vote(f.float(), probs, exclude)
    return f, logits, probs


@torch.no_grad()
def predict_scores(model: RETDM, source, rows: np.ndarray, device: torch.device, vote=None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels for ``rows``, in the order of ``rows``: sigmoid(W_c f), fused with
    ``vote`` (a :class:`retdmctl.fusion.NeighbourVote`) when given; a row in the vote's
    bank is left out of its own vote. Under torchrun each rank scores its shard and every
    rank gets all of them."""
    scores, labels, _ = predict_with_embeddings(model, source, rows, device, vote)
    return scores, labels


@torch.no_grad()
def predict_with_embeddings(model: RETDM, source, rows: np.ndarray, device: torch.device,
                            vote=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, embeddings f) for ``rows``, as :func:`predict_scores`."""
    if distributed.active():
        out = score_rows(model, source, distributed.shard(rows), device, vote)
        return tuple(distributed.gather_rows(a) for a in out)  # type: ignore[return-value]
    return score_rows(model, source, rows, device, vote)


def score_rows(model: RETDM, source, rows: np.ndarray, device: torch.device, vote) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, f) of ``rows`` on this process (every scoring pass of a split
    goes through it)."""
    model.eval()
    num_classes, dim = model.cls_head.out_features, model.cls_head.in_features
    if len(rows) == 0:  # a rank's shard of a split smaller than the world
        empty = np.zeros((0, num_classes), np.float32)
        return empty, empty.copy(), np.zeros((0, dim), np.float32)
    if vote is not None:
        vote = vote.to(device)
    # filled batch by batch: a list of parts concatenated at the end holds every row twice
    scores = np.empty((len(rows), num_classes), np.float32)
    labels, feats = np.empty_like(scores), np.empty((len(rows), dim), np.float32)
    at = 0
    for x, y, r in track(source.eval_batches(rows), source.num_batches(rows), "scoring"):
        exclude = vote.positions(np.asarray(r)) if vote is not None else None
        f, _, p = score_batch(model, to_device(x, device), vote, exclude, autocast(device))
        end = at + len(r)
        scores[at:end], labels[at:end], feats[at:end] = p.cpu().numpy(), y.numpy(), f.float().cpu().numpy()
        at = end
    return scores, labels, feats


@torch.no_grad()
def embed_rows(model: RETDM, source, rows: np.ndarray, device: torch.device, progress: str | None = None,
               dtype=np.float32) -> np.ndarray:
    """f = phi(x) of ``rows`` (eval mode, centre crop), in the order of ``rows``, on this
    process, as ``dtype``; behind a progress bar named ``progress`` where given."""
    model.eval()
    batches = source.eval_batches(rows)
    if progress is not None:
        batches = track(batches, source.num_batches(rows), progress)
    out = np.empty((len(rows), model.cls_head.in_features), dtype)  # filled batch by batch
    at = 0
    for x, _, _ in batches:  # in the order of rows
        with autocast(device):
            f = model.embed_images(to_device(x, device)).float().cpu().numpy()
        out[at : at + len(f)] = f  # numpy's float32 -> float16 rounding, as features.h5's
        at += len(f)
    return out


@torch.no_grad()
def embed_all(model: RETDM, source, n: int, device: torch.device) -> np.ndarray:
    """f = phi(x) for every image (eval mode, centre crop), float16 (as ``features.h5``
    and the vote's bank keep them: half the memory, the same values downstream); sharded
    under torchrun."""
    rows = distributed.shard(np.arange(n))
    return distributed.gather_rows(embed_rows(model, source, rows, device, "embedding", dtype=np.float16))


@dataclass
class Scored:
    """A split scored by a stage's checkpoint (:func:`score_split`)."""

    model: RETDM  # restored, in eval mode, on the device
    ckpt: dict
    backbone_from: str  # where the backbone's weights came from
    rule: DecisionRule
    scores: np.ndarray
    labels: np.ndarray


def score_split(ws: Workspace, cfg: Config, info: DatasetInfo, stage: str, rows: np.ndarray, device: torch.device,
                console=None) -> Scored:
    """Score dataset ``rows`` with ``stage``'s checkpoint as eval does: the model built
    from the config and restored strictly, its vote applied with ``eval.fusion`` (a vote
    built for other dataset rows is an error), the thresholds chosen for those scores."""
    path = ws.stage_dir(stage) / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    backbone_from = restore_image_model(model, ckpt, cfg, ws.rel(path))
    prepare_model(model, device)
    rule = decision_rule(ckpt, ws.rel(path), num_classes=info.num_classes, embed_dim=cfg.model.embed_dim,
                         apply_vote=cfg.eval.fusion, ids=info.ids_digest)
    scores, labels = predict_scores(model, image_source(ws, cfg, info, spec, device, console), rows, device, rule.vote)
    return Scored(model, ckpt, backbone_from, rule, scores, labels)
