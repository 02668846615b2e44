"""The fold copies of a classifying stage (``decision.folds``; the why and the what are
:mod:`retdmctl.training.folds`'): run the stages' own code in ``folds/fold-<k>/`` and
return the held-out parts the decision is chosen on.

Each fold's stages are skipped while the record ``folds/fold-<k>/folds.json`` says they
ran with the same config, held-out rows, inputs and upstream fold stages, and their files
are as they wrote them: the joint
stage's folds build on the classifier folds the classifier stage trained. An interrupted
fold resumes from its stage's ``resume.pt`` as any training does.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time

import numpy as np
from rich.console import Console

from retdmctl import distributed, fusion
from retdmctl.atomic import transaction
from retdmctl.config import config_hash
from retdmctl.data.dataset import DatasetInfo, read_dataset, write_dataset
from retdmctl.pipeline import Context
from retdmctl.training.folds import assign, fold_config, fold_info, fold_workspace, held_out, rows_digest
from retdmctl.workspace import write_text_atomic

# What each fold stage builds on, within its fold.
_CHAIN = {"classifier": ("classifier",), "joint": ("knn", "classifier", "metric", "joint")}
_DEPS = {"knn": (), "classifier": (), "metric": ("knn", "classifier"), "joint": ("knn", "classifier", "metric")}


def out_of_fold(ctx: Context, stage: str, view: DatasetInfo, epochs: dict[str, int], device,
                source=None) -> tuple[list[fusion.Scored], dict]:
    """The held-out parts for ``stage``'s decision (none with ``decision.folds = 0``) and
    the record of how they were made (saved in the checkpoint as ``decision``).
    ``view``: the parent's training view of the dataset (the labels the decision reads);
    ``epochs``: the full run's kept epoch of each trained stage in the chain; ``source``:
    the parent's image source, whose image store is closed while the copies run (LMDB
    refuses to open one store twice in a process; the reader reopens it when next read)."""
    ws, cfg = ctx.ws, ctx.cfg
    k_folds = cfg.decision.folds
    if k_folds == 0:
        return [], {}
    from stages import BY_NAME  # the stage modules import this one

    _close_images(source)

    started = time.perf_counter()
    raw = read_dataset(ws.dataset)  # as ingested: each fold applies the label protocol itself
    train = raw.split("train")
    fold_of = assign(train, k_folds, cfg.decision.seed)
    fcfg = fold_config(cfg, epochs)
    quiet = Console(quiet=True)
    parts: list[fusion.Scored] = []
    for k in range(k_folds):
        at = time.perf_counter()
        held = train[fold_of == k]
        fws = fold_workspace(ws, k)
        finfo = fold_info(raw, held)
        base = {"dataset": ws.fingerprint(ws.dataset), "held": rows_digest(held)}
        distributed.on_main(lambda: _write_dataset(fws, finfo))
        record = _read_record(fws)
        keys: dict[str, str] = {}
        for name in _CHAIN[stage]:
            # what the copy reads (its dataset, upstream copies' files, the image store, a
            # weights file) by content, as a stage's manifest has it: a changed input retrains it
            inputs = [fws.fingerprint(p) for p in BY_NAME[name].inputs(fws, fcfg)]
            keys[name] = _key({**base, "inputs": inputs}, fcfg.sections(BY_NAME[name].sections),
                              [keys[d] for d in _DEPS[name]])
            outputs = BY_NAME[name].outputs(fws, fcfg)
            done = record.get(name) or {}
            # reused only as recorded: same key, and its files as the copy wrote them
            if done.get("key") == keys[name] and done.get("outputs") == [fws.fingerprint(p) for p in outputs]:
                continue
            step = BY_NAME[name]

            def run_copy() -> None:
                with transaction():  # the fold's outputs are in place as soon as it succeeds
                    step.run(Context(fws, fcfg, quiet))

            # under torchrun as the pipeline runs stages: a training stage on every rank
            run_copy() if step.parallel else distributed.on_main(run_copy)
            gc.collect()  # the copy's image source, and its open store, with it
            record[name] = {"key": keys[name], "outputs": [fws.fingerprint(p) for p in outputs]}
            distributed.on_main(lambda: write_text_atomic(fws.root / "folds.json", json.dumps(record, indent=1), defer=False))
        known = view.known_at(held)
        parts.append(held_out(fws, fcfg, finfo, stage, held, view.labels[held], known, device))
        ctx.console.print(f"{stage}: out-of-fold {k + 1}/{k_folds}: a copy trained without {len(held):,} training "
                          f"images scored them ({time.perf_counter() - at:.0f} s)")
    record = {
        "folds": k_folds,
        "seed": cfg.decision.seed,
        "fold_sizes": [int((fold_of == k).sum()) for k in range(k_folds)],
        "assignment": rows_digest(fold_of),
        "epochs": {name: int(n) for name, n in epochs.items()},
        "out_of_fold_images": int(len(train)),
        "validation_images": int(len(view.split("val"))),
        "images": int(len(train) + len(view.split("val"))),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return parts, record


def _close_images(source) -> None:
    reader = getattr(source, "reader", None)
    if reader is not None:
        reader.close()


def _key(base: dict, sections: dict, upstream: list[str]) -> str:
    blob = json.dumps({**base, "config": config_hash(sections), "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_record(fws) -> dict:
    try:
        return json.loads((fws.root / "folds.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def _write_dataset(fws, finfo: DatasetInfo) -> None:
    """The fold's dataset.h5, rewritten only where its splits differ (an unchanged file
    keeps its fingerprint, and the fold's stages their resume points)."""
    if fws.dataset.exists():
        old = read_dataset(fws.dataset)
        if old.ids == finfo.ids and all(np.array_equal(old.split(s), finfo.split(s)) for s in ("train", "val", "test")) \
                and np.array_equal(old.labels, finfo.labels):
            return
    with transaction():
        write_dataset(fws.dataset, finfo, source="fold", config={})
