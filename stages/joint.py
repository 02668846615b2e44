"""Stage 3, ``train --stage joint``: fine-tune everything with
L = L_cls + alpha * L_metric + beta * L_rec, starting from the classifier and metric
checkpoints.

Way 2 needs f_{i_j} for images outside the batch. ``joint.way2 = "bank"`` takes them from
a feature bank initialised from ``features.h5`` and refreshed with each batch's f (no
extra CNN passes); ``"forward"`` recomputes them with the current phi, which in
frozen-backbone mode costs one linear layer on cached features.

Last, the neighbour vote (:mod:`retdmctl.fusion`) over the joint model's own embeddings
of the training images and the thresholds are chosen and saved in the checkpoint: on
validation and, with ``decision.folds``, on the training images scored by fold copies of
the whole chain trained without them (:mod:`retdmctl.training.folds`).
"""

from __future__ import annotations

import numpy as np
import torch

from retdmctl.config import Config, check
from retdmctl.knn import read_graph
from retdmctl.losses.retdm import total_loss
from retdmctl.pipeline import Context, Stage
from retdmctl.inputs import backbone_problem, image_source, model_inputs
from retdmctl.model_io.checkpoint import build_model, load_parts, restore_image_model
from retdmctl.training.decision import choose_decision, val_bce_and_map
from retdmctl.training.folds import kept_epoch
from retdmctl.training.sampler import MetricSampler, metric_and_rec
from retdmctl.training.setup import begin_training, finish_training
from retdmctl.training.labels import (
    Classification,
    EpochCounter,
    announce,
    refuse_batch_terms_across_processes,
    training_view,
)
from retdmctl.training.checkpoint import image_model_checkpoint
from retdmctl.training.loop import fit
from retdmctl.training.parallel import refresh_bank
from retdmctl.runtime import (
    load_checkpoint,
    prepare_model,
)
from retdmctl.sources import read_row_features
from stages.folds import out_of_fold


def _blocked(cfg: Config) -> str | None:
    if (problem := backbone_problem(cfg)) is not None:
        return problem
    if (problem := check(cfg, "joint.way2")) is not None:
        return problem
    if cfg.joint.way2 == "forward" and not cfg.model.frozen_backbone:
        return "joint.way2 = 'forward' needs model.frozen_backbone = true (use 'bank' to fine-tune the CNN)"
    return None


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    refuse_batch_terms_across_processes(cfg)  # LL-R and CLML: one process only
    device, info, stage_dir = begin_training(ctx, "joint", cfg.joint.seed)
    info, observed, labels_summary = training_view(info, cfg)  # test rows keep full labels; val: labels.val_protocol
    announce(ctx.console, labels_summary)
    graph = read_graph(ws.knn, ids=info.ids_digest, source=ws.rel(ws.knn))

    # Start from stage 1 (phi, W_c) and stage 2 (psi, W_r), every key loaded strictly.
    model, spec = build_model(cfg, info.num_classes, pretrained=False, seed=cfg.joint.seed)
    clf_path, metric_path = ws.stage_dir("classifier") / "checkpoint.pt", ws.stage_dir("metric") / "checkpoint.pt"
    classifier = load_checkpoint(clf_path)
    backbone_from = restore_image_model(model, classifier, cfg, ws.rel(clf_path))
    load_parts(model, load_checkpoint(metric_path)["model"], ("label_net", "rec_head"), ws.rel(metric_path))
    ctx.console.print(f"joint: backbone weights {backbone_from}")
    prepare_model(model, device)

    source = image_source(ws, cfg, info, spec, device, ctx.console)
    features_path = ws.stage_dir("classifier") / "features.h5"
    bank = torch.from_numpy(read_row_features(features_path, info, ws.rel(features_path),
                                              "re-run retdmctl train --stage classifier")).to(device)
    train_rows, val_rows = info.split("train"), info.split("val")
    sampler = MetricSampler.build(graph, info, np.array([], dtype=np.int64))

    clean = cfg.loss.metric_on == "clean"
    fresh = FreshFeatures(model, source, device, clean) if cfg.joint.way2 == "forward" else None
    counter = EpochCounter(source.num_batches(train_rows))
    classification = Classification(cfg, observed, counter, device)

    def step(x, y, rows, rng):
        f_clean, f_dropped = model.embed_pair(x)
        f = f_clean if clean else f_dropped  # what the metric loss, W_r and the bank see
        logits = model.classify(f_dropped)
        f_neg_source = fresh if fresh is not None else bank
        metric, rec = metric_and_rec(model, f.float(), y, rows, sampler, f_neg_source, rng, cfg.loss)
        cls, clml = classification(logits.float(), y, rows, f_clean)
        parts = total_loss(cls, metric, rec, cfg.loss.alpha, cfg.loss.beta)
        refresh_bank(bank, rows, f)  # every rank's rows of this step, on every rank
        if clml is None:
            return parts.total, parts.items()
        total = parts.total + clml  # L + CLML's term (loss.clml > 0)
        return total, {**parts.items(), "total": total.detach(), "clml": clml.detach()}

    history = fit(
        name="joint",
        stage_dir=stage_dir,
        model=model,
        params=model.param_groups(model.trainable_parameters(), cfg.model.backbone_lr_mult),
        schedule=cfg.joint,
        source=source,
        train_rows=train_rows,
        step=step,
        validate=lambda: val_bce_and_map(model, source, val_rows, device, info.known_at(val_rows)),
        device=device,
        resume_key={"config": cfg.sections(STAGE.sections), "inputs": [ws.fingerprint(p) for p in _inputs(ws, cfg)]},
        console=ctx.console,
        buffers={"bank": bank},
        on_epoch=counter,
    )
    config = cfg.sections(STAGE.sections)
    # the neighbour vote over this model's own embeddings, and the thresholds; with
    # decision.folds, fold copies of the whole chain (knn, classifier, metric, joint)
    # score the training images they never saw
    epochs = {"classifier": kept_epoch(classifier["history"]), "metric": kept_epoch(load_checkpoint(metric_path)["history"]),
              "joint": kept_epoch(history)}
    parts, record = out_of_fold(ctx, "joint", info, epochs, device, source)
    decision = choose_decision(model, source, info, device, console=ctx.console, stage="joint",
                               out_of_fold=parts, record=record)
    state = image_model_checkpoint("joint", model, spec, cfg, config, info.class_names, decision,
                                   backbone_from=backbone_from)
    summary = finish_training(stage_dir, state, history)
    return {**summary, "backbone_from": backbone_from, **labels_summary}


class FreshFeatures:
    """f_{i_j} recomputed with the current phi (joint.way2 = "forward", frozen mode only),
    from the way-2 images' cached inputs, read as needed (never all of them in memory).
    A module-level class, not one local to ``run``: a local class is freed only by the
    cycle collector, and would keep the stage's image source (an open LMDB) alive."""

    def __init__(self, model, source, device, clean: bool) -> None:
        self.model, self.source, self.device, self.clean = model, source, device, clean

    def __getitem__(self, picks):
        # one flat batch: cached trunk activations (model.tune_blocks) need 4-D input
        x = self.source.centre_of(picks.reshape(-1).cpu().numpy()).to(self.device)
        f = self.model.embed_pair(x)[0 if self.clean else 1]
        return f.reshape(*picks.shape, f.shape[-1])


def _inputs(ws, cfg) -> list:
    clf = ws.stage_dir("classifier")
    paths = [ws.dataset, ws.knn, clf / "checkpoint.pt", clf / "features.h5", ws.stage_dir("metric") / "checkpoint.pt"]
    return paths + model_inputs(ws, cfg)


STAGE = Stage(
    name="joint",
    command="retdmctl train --stage joint",
    sections=("model", "loss", "joint", "labels", "decision"),
    inputs=_inputs,
    outputs=lambda ws, cfg: [ws.stage_dir("joint") / "checkpoint.pt"],
    run=run,
    blocked=_blocked,
    parallel=True,
)
