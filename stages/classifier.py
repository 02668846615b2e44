"""Stage 1, ``train --stage classifier``: fine-tune phi and W_c with L_cls alone.

Reads the LMDB store and dataset.h5. Writes ``classifier/checkpoint.pt`` and
``classifier/features.h5`` (every image's embedding f, float16), from which the metric
stage trains without any CNN pass. In frozen-backbone mode it first caches the backbone's
pooled features (in the user cache shared by every workspace, ``$RETDM_CACHE_DIR``;
reused while backbone, weights, image size and images are unchanged) and trains phi's
projection and W_c on them. Last, it chooses
how the model decides (the neighbour vote of :mod:`retdmctl.fusion` and the thresholds)
on validation and, with ``decision.folds`` (default 5), on out-of-fold scores of the
training images (:mod:`retdmctl.training.folds`), and saves that in the checkpoint.
"""

from __future__ import annotations

from retdmctl import distributed
from retdmctl.config import Config
from retdmctl.disk import require_room_in_workspace
from retdmctl.pipeline import Context, Stage
from retdmctl.inputs import backbone_problem, image_source, model_inputs
from retdmctl.model_io.checkpoint import build_model
from retdmctl.model_io.scoring import embed_all
from retdmctl.training.decision import choose_decision, val_bce_and_map
from retdmctl.training.folds import kept_epoch
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
from retdmctl.runtime import prepare_model
from retdmctl.sources import write_features
from retdmctl.workspace import Workspace
from stages.folds import out_of_fold


def _outputs(ws: Workspace, cfg: Config) -> list:
    d = ws.stage_dir("classifier")
    return [d / "checkpoint.pt", d / "features.h5"]


def _inputs(ws: Workspace, cfg: Config) -> list:
    return [ws.dataset] + model_inputs(ws, cfg)


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    refuse_batch_terms_across_processes(cfg)  # LL-R and CLML: one process only
    device, info, stage_dir = begin_training(ctx, "classifier", cfg.classifier.seed)
    info, observed, labels_summary = training_view(info, cfg)  # test rows keep full labels; val: labels.val_protocol
    announce(ctx.console, labels_summary)
    # room for features.h5 (every image's f, float16) before anything is trained
    distributed.on_main(lambda: require_room_in_workspace(stage_dir, len(info.ids) * cfg.model.embed_dim * 2,
                                                          "classifier/features.h5"))

    if not cfg.model.frozen_backbone and device.type == "cpu":
        ctx.console.print(
            "[yellow]fine-tuning the CNN on the CPU is slow; --frozen-backbone trains every stage "
            "from backbone features cached once[/]"
        )
    model, spec = build_model(cfg, info.num_classes, pretrained=True, seed=cfg.classifier.seed)
    prepare_model(model, device)
    source = image_source(ws, cfg, info, spec, device, ctx.console)
    train_rows, val_rows = info.split("train"), info.split("val")

    counter = EpochCounter(source.num_batches(train_rows))
    classification = Classification(cfg, observed, counter, device)

    def step(x, y, rows, rng):
        if classification.uses_clml:  # CLML reads the clean embedding f
            f, f_dropped = model.embed_pair(x)
            logits = model.classify(f_dropped).float()
        else:
            f, logits = None, model(x).float()
        loss, clml = classification(logits, y, rows, f)
        if clml is None:
            return loss, {"total": loss.detach()}
        loss = loss + clml
        return loss, {"total": loss.detach(), "clml": clml.detach()}

    history = fit(
        name="classifier",
        stage_dir=stage_dir,
        model=model,
        params=model.param_groups(model.image_parameters(), cfg.model.backbone_lr_mult),
        schedule=cfg.classifier,
        source=source,
        train_rows=train_rows,
        step=step,
        validate=lambda: val_bce_and_map(model, source, val_rows, device, info.known_at(val_rows)),
        device=device,
        resume_key={"config": cfg.sections(STAGE.sections), "inputs": [ws.fingerprint(p) for p in _inputs(ws, cfg)]},
        console=ctx.console,
        on_epoch=counter,
    )

    features = embed_all(model, source, len(info.ids), device)  # every rank, sharded
    config = cfg.sections(STAGE.sections)
    distributed.on_main(lambda: write_features(stage_dir / "features.h5", features, config, info.ids_digest))
    # the neighbour vote and the thresholds, chosen on validation and, with
    # decision.folds, on the training images scored by fold copies that never saw them
    parts, record = out_of_fold(ctx, "classifier", info, {"classifier": kept_epoch(history)}, device, source)
    decision = choose_decision(model, source, info, device, train_features=features[train_rows], console=ctx.console,
                               stage="classifier", out_of_fold=parts, record=record)
    state = image_model_checkpoint("classifier", model, spec, cfg, config, info.class_names, decision)
    return {**finish_training(stage_dir, state, history), **labels_summary}


STAGE = Stage(
    name="classifier",
    command="retdmctl train --stage classifier",
    sections=("model", "classifier", "loss.base", "loss.clml", "loss.clml_tau", "loss.clml_start_epoch",
              "loss.clml_delta", "loss.clml_every", "loss.llr_delta_rel", "labels", "decision"),
    inputs=_inputs,
    outputs=_outputs,
    run=run,
    blocked=backbone_problem,
    parallel=True,
)
