"""Stage 2, ``train --stage metric``: phi and W_c frozen; train psi and W_r with
alpha * L_metric + beta * L_rec.

phi is frozen, so f comes straight from ``classifier/features.h5``: this stage runs no CNN
at all. Way 2's images f_{i_j} are read from the same cache.
"""

from __future__ import annotations

import numpy as np
import torch

from retdmctl.knn import read_graph
from retdmctl.models.retdm import RETDM
from retdmctl.pipeline import Context, Stage
from retdmctl.model_io.checkpoint import load_state
from retdmctl.training.sampler import MetricSampler, metric_and_rec
from retdmctl.training.setup import begin_training, finish_training
from retdmctl.training.labels import announce, training_view
from retdmctl.training.checkpoint import stage_checkpoint
from retdmctl.training.loop import fit
from retdmctl.runtime import derive_seed, load_checkpoint
from retdmctl.sources import CachedSource, read_row_features


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    device, info, stage_dir = begin_training(ctx, "metric", cfg.metric.seed)
    # psi learns the observed training label sets (the kNN graph's); loss.clml does not
    # apply: this stage does not train the classifier
    info, _, labels_summary = training_view(info, cfg)
    announce(ctx.console, labels_summary)
    graph = read_graph(ws.knn, ids=info.ids_digest, source=ws.rel(ws.knn))

    # The classifier's checkpoint gives phi's head and W_c (kept as they are) and shapes.
    # This stage never runs the CNN: a fine-tuned backbone in the checkpoint is left out
    # on purpose, and everything else must fit exactly.
    clf_path = ws.stage_dir("classifier") / "checkpoint.pt"
    clf = load_checkpoint(clf_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.metric.seed, "init"))
        model = RETDM(info.num_classes, clf["feature_dim"], cfg.model.embed_dim, cfg.model.dropout)
    heads = {k: v for k, v in clf["model"].items() if not k.startswith("backbone.")}
    load_state(model, heads, ws.rel(clf_path))
    model.to(device)

    features_path = ws.stage_dir("classifier") / "features.h5"
    # float16 as stored (each batch is converted to float32 as it is read)
    features = read_row_features(features_path, info, ws.rel(features_path), "re-run retdmctl train --stage classifier",
                                 dtype=np.float16)
    f_bank = torch.from_numpy(features).to(device)
    source = CachedSource(features, info, cfg.metric.batch_size)
    train_rows, val_rows = info.split("train"), info.split("val")
    sampler = MetricSampler.build(graph, info, val_rows)
    a, b = cfg.loss.alpha, cfg.loss.beta

    def step(f, y, rows, rng):
        metric, rec = metric_and_rec(model, f, y, rows, sampler, f_bank, rng, cfg.loss)
        loss = a * metric + b * rec
        return loss, {"total": loss.detach(), "metric": metric.detach(), "rec": rec.detach()}

    def validate() -> dict[str, float]:
        rng = np.random.default_rng([cfg.metric.seed, 999])
        total, metric_sum, n = 0.0, 0.0, 0
        for f, y, rows in source.eval_batches(val_rows):
            f, y = f.to(device), y.to(device)
            metric, rec = metric_and_rec(model, f, y, rows, sampler, f_bank, rng, cfg.loss)
            total += float(a * metric + b * rec) * len(rows)
            metric_sum += float(metric) * len(rows)
            n += len(rows)
        return {"val_loss": total / max(n, 1), "val_metric": metric_sum / max(n, 1)}

    history = fit(
        name="metric",
        stage_dir=stage_dir,
        model=model,
        params=model.label_parameters(),
        schedule=cfg.metric,
        source=source,
        train_rows=train_rows,
        step=step,
        validate=validate,
        device=device,
        resume_key={"config": cfg.sections(STAGE.sections), "inputs": [ws.fingerprint(p) for p in _inputs(ws, cfg)]},
        console=ctx.console,
    )
    state = stage_checkpoint("metric", model.heads_state(), cfg.sections(STAGE.sections), info.class_names)
    return {**finish_training(stage_dir, state, history), **labels_summary}


def _inputs(ws, cfg) -> list:
    clf = ws.stage_dir("classifier")
    return [ws.dataset, ws.knn, clf / "checkpoint.pt", clf / "features.h5"]


STAGE = Stage(
    name="metric",
    command="retdmctl train --stage metric",
    sections=("loss", "metric", "labels"),
    inputs=_inputs,
    outputs=lambda ws, cfg: [ws.stage_dir("metric") / "checkpoint.pt"],
    run=run,
    parallel=True,
)
