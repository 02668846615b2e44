"""Stage 1, ``train --stage classifier``: fine-tune phi and W_c with L_cls alone.

Reads the LMDB store and dataset.h5. Writes ``classifier/checkpoint.pt`` and
``classifier/features.h5`` (every image's embedding f, float16), from which the metric
stage trains without any CNN pass. In frozen-backbone mode it first caches the backbone's
pooled features (``classifier/backbone.h5``, reused while backbone, image size and
dataset are unchanged) and trains phi's projection and W_c on them.
"""

from __future__ import annotations

from pathlib import Path

from retdmctl.config import Config
from retdmctl.losses.retdm import classification_loss
from retdmctl.models.backbones import build_backbone
from retdmctl.pipeline import Context, Stage
from retdmctl.training.common import (
    backbone_cache_path,
    backbone_problem,
    begin_training,
    build_model,
    embed_all,
    finish_training,
    image_source,
    val_bce_and_map,
)
from retdmctl.training.loop import fit
from retdmctl.training.runtime import (
    autocast,
    prepare_model,
)
from retdmctl.training.sources import (
    PixelSource,
    cache_key,
    extract_backbone_features,
    read_cache_key,
    write_features,
)
from retdmctl.workspace import Workspace


def _outputs(ws: Workspace, cfg: Config) -> list:
    d = ws.stage_dir("classifier")
    outs = [d / "checkpoint.pt", d / "features.h5"]
    return outs + ([backbone_cache_path(ws)] if cfg.model.frozen_backbone else [])


def ensure_backbone_cache(ctx: Context, info, device) -> None:
    """Extract backbone features once; reuse them while their key matches."""
    ws, cfg = ctx.ws, ctx.cfg
    m = cfg.model
    path = backbone_cache_path(ws)
    weights = Path(m.weights_file) if m.weights_file else None
    backbone, spec = build_backbone(m.backbone, pretrained=m.pretrained, weights_file=weights)
    key = cache_key(m, spec, ws.fingerprint(ws.lmdb))
    if read_cache_key(path) == key:
        ctx.console.print(f"reusing cached {spec.name} features ({ws.rel(path)})")
        return
    pixels = PixelSource(ws.lmdb, info, spec, m.image_size, m.batch_size, cfg.runtime.workers)
    extract_backbone_features(path, backbone, pixels, key, device, autocast(device))


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    device, info, stage_dir = begin_training(ctx, "classifier", cfg.classifier.seed)

    if cfg.model.frozen_backbone:
        ensure_backbone_cache(ctx, info, device)
    elif device.type == "cpu":
        ctx.console.print(
            "[yellow]fine-tuning the CNN on the CPU is slow; --frozen-backbone trains every stage "
            "from backbone features cached once[/]"
        )
    model, spec = build_model(cfg, info.num_classes, pretrained=True)
    prepare_model(model, device)
    source = image_source(ws, cfg, info, spec)
    train_rows, val_rows = info.split("train"), info.split("val")

    def step(x, y, rows, rng):
        loss = classification_loss(model(x).float(), y)
        return loss, {"total": float(loss.detach())}

    history = fit(
        name="classifier",
        stage_dir=stage_dir,
        model=model,
        params=model.param_groups(model.image_parameters(), cfg.model.backbone_lr_mult),
        schedule=cfg.classifier,
        source=source,
        train_rows=train_rows,
        step=step,
        validate=lambda: val_bce_and_map(model, source, val_rows, device),
        device=device,
        resume_key={"config": cfg.sections(STAGE.sections), "dataset": ws.fingerprint(ws.dataset)},
        console=ctx.console,
    )

    features = embed_all(model, source, len(info.ids), device)
    config = cfg.sections(STAGE.sections)
    write_features(stage_dir / "features.h5", features, config)
    weights = model.state_dict() if not cfg.model.frozen_backbone else model.heads_state()
    state = {
        "stage": "classifier",
        "model": weights,
        "config": config,
        "class_names": info.class_names,
        "backbone": spec.name,
        "feature_dim": spec.out_dim,
        "frozen_backbone": cfg.model.frozen_backbone,
    }
    return finish_training(stage_dir, state, history)


STAGE = Stage(
    name="classifier",
    command="retdmctl train --stage classifier",
    sections=("model", "classifier"),
    inputs=lambda ws, cfg: [ws.lmdb, ws.dataset],
    outputs=_outputs,
    run=run,
    blocked=backbone_problem,
)
