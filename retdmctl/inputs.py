"""What the image model reads, for a config: the image source of its mode (pixels from
LMDB, or the frozen backbone's cached features), the frozen backbone itself and the
cache of its features, and the files a stage that builds the model depends on.

Below both training and scoring: the training stages, eval, the report and predict's
checks all take their inputs from here. Under torchrun, extracting the cache is sharded
over the ranks and rank 0 writes it (``retdmctl.distributed``)."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from retdmctl import distributed
from retdmctl.cache import display, entry_lock
from retdmctl.config import Config, concrete
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.data.store import records_digest
from retdmctl.errors import BackboneError, InputError
from retdmctl.models.backbones import BackboneSpec, build_backbone, get_backbone_spec
from retdmctl.runtime import (
    autocast,
    decode_threads,
    derive_seed,
    pick_device,
    precision,
    prepare_model,
    set_threads,
)
from retdmctl.sources import (
    CachedSource,
    CacheRows,
    PixelSource,
    backbone_features,
    extract_backbone_features,
    extract_views,
    read_cache_key,
    read_cache_origin,
    views_cache_key,
    write_backbone_features,
)
from retdmctl.workspace import Workspace


def backbone_problem(cfg: Config) -> str | None:
    """Why ``model.backbone`` cannot be used, or None (checked by every stage that builds the model)."""
    try:
        get_backbone_spec(cfg.model.backbone)
    except BackboneError as exc:
        return str(exc)
    return None



def runs_cnn(cfg: Config) -> bool:
    """Whether training or scoring runs convolutions (all of the backbone, or the tuned
    end of it), or only the small heads on cached pooled features."""
    return not cfg.model.frozen_backbone or cfg.model.tune_blocks > 0



def backbone_cache_key(ws: Workspace, cfg: Config, info: DatasetInfo, device: torch.device) -> dict:
    """Everything the frozen backbone's cached features depend on: backbone, weights (by
    content), input size, the images (the store's records, by content), the order of the
    dataset's rows (their ids' hash) and the precision they are computed in on ``device``.
    Nothing of the workspace itself: two workspaces that ingested the same images share
    the cache."""
    return views_cache_key(cfg.model, get_backbone_spec(cfg.model.backbone), images_digest(ws),
                           _weights_fp(ws, cfg), ids=info.ids_digest, precision=precision(device))


def images_digest(ws: Workspace) -> str | None:
    """The content of the image store as records (:func:`~retdmctl.data.store.records_digest`),
    computed once per version of the store; None when there is none."""
    data = ws.lmdb / "data.mdb"
    if not data.is_file():
        return None
    return ws.derived(data, "records", lambda: records_digest(ws.lmdb))


def backbone_cache_path(ws: Workspace, cfg: Config, info: DatasetInfo | None = None,
                        device: torch.device | None = None) -> Path:
    """Where the frozen backbone's features for this config live, in the user cache shared
    by every workspace (:func:`retdmctl.cache.cache_root`): named by the hash of
    :func:`backbone_cache_key`, so a cache is never replaced, only added, and never read
    for other images, another config, image order or precision. ``info``: dataset.h5's by
    default; ``device``: ``runtime.device``'s by default."""
    info = info if info is not None else read_dataset(ws.dataset)
    device = device if device is not None else pick_device(cfg.runtime.device)
    key = backbone_cache_key(ws, cfg, info, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return ws.cache_dir / "backbone" / f"{cfg.model.backbone.replace(':', '-')}-{digest}.h5"  # timm:NAME -> timm-NAME


def _weights_fp(ws: Workspace, cfg: Config) -> str | None:
    return ws.fingerprint(Path(cfg.model.weights_file)) if cfg.model.weights_file else None


def ensure_backbone_cache(ws: Workspace, cfg: Config, info: DatasetInfo, device, console) -> Path:
    """Extract the frozen backbone's features once, into the shared cache; reuse them
    while their key matches, whichever workspace extracted them (the line says which).
    Writers of one entry take its lock: two workspaces extracting at once do it once."""
    path = backbone_cache_path(ws, cfg, info, device)
    key = backbone_cache_key(ws, cfg, info, device)  # also in the file: a cache of other rows is never read
    if distributed.on_main(lambda: _reuse(ws, path, key, cfg, console)):
        return path
    if distributed.active():  # rank 0 takes the entry's lock where it writes
        _extract(ws, cfg, info, device, path, key)
        return path
    with entry_lock(path, console):
        if not _reuse(ws, path, key, cfg, console):  # another process may have made it meanwhile
            _extract(ws, cfg, info, device, path, key)
    return path


def _reuse(ws: Workspace, path: Path, key: dict, cfg: Config, console) -> bool:
    if read_cache_key(path) != key:
        return False
    origin = read_cache_origin(path)
    made = f", extracted by workspace {origin}" if origin and origin != str(ws.root.resolve()) else ""
    console.print(f"reusing cached {cfg.model.backbone} features ({display(path)}{made})", soft_wrap=True)
    return True


def _extract(ws: Workspace, cfg: Config, info: DatasetInfo, device, path: Path, key: dict) -> None:
    m = cfg.model
    origin = str(ws.root.resolve())
    backbone, spec = frozen_backbone(cfg)
    previous = torch.get_num_threads()
    set_threads(cnn=True)
    pixels = PixelSource(ws.lmdb, info, spec, m.image_size, m.batch_size, loader_workers(cfg, device))
    pixels.decode_threads = decode_threads(device)
    # Not part of the stage's transaction: the cache is keyed by its content's inputs.
    try:
        if m.views > 1 or m.tune_blocks:
            backbone = prepare_model(backbone, device).eval()
            forward = (lambda x: backbone.forward_trunk(x, m.tune_blocks)) if m.tune_blocks else backbone

            def views() -> None:
                with entry_lock(path) if distributed.active() else nullcontext():
                    extract_views(path, forward, pixels, m.views, key, device, autocast(device), origin=origin)

            distributed.on_main(views)  # under torchrun, rank 0 extracts the views while the others wait
        elif distributed.active():  # each rank its shard; rank 0 writes them all
            rows = distributed.shard(np.arange(len(info.ids)))
            part = backbone_features(backbone, pixels, rows, device, autocast(device))
            features = distributed.gather_rows(part, to_main=True)

            def write() -> None:
                with entry_lock(path):
                    write_backbone_features(path, features, key, origin=origin)

            distributed.on_main(write)
        else:
            extract_backbone_features(path, backbone, pixels, key, device, autocast(device), origin=origin)
    finally:
        torch.set_num_threads(previous)


def frozen_backbone(cfg: Config) -> tuple[torch.nn.Module, BackboneSpec]:
    """The backbone whose outputs frozen-backbone mode caches. Without pretrained weights
    it is random, drawn from a fixed seed: features extracted again (a deleted cache,
    another command) are the same, and the trunk a tuned model keeps is the one that
    made its cached activations."""
    m = cfg.model
    weights = Path(m.weights_file) if m.weights_file else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "frozen-backbone"))
        return build_backbone(m.backbone, pretrained=m.pretrained, weights_file=weights)


def model_inputs(ws: Workspace, cfg: Config) -> list[Path]:
    """The files a stage that builds the image model reads besides its checkpoints."""
    return [ws.lmdb] + ([Path(cfg.model.weights_file)] if cfg.model.weights_file else [])


def image_source(ws: Workspace, cfg: Config, info: DatasetInfo, spec: BackboneSpec, device=None, console=None):
    """Pixels from LMDB, or the cached backbone features in frozen-backbone mode
    (extracted first when this config has none yet)."""
    concrete(cfg)
    if cfg.model.frozen_backbone:
        path = ensure_backbone_cache(ws, cfg, info, device or torch.device("cpu"), console or _QUIET)
        # read batch by batch, never whole: a views cache is ~190 KB per image at 224 px
        return CachedSource(CacheRows(path), info, cfg.model.batch_size, cfg.model.views)
    device = device or torch.device("cpu")
    workers = loader_workers(cfg, device)
    pixels = PixelSource(ws.lmdb, info, spec, cfg.model.image_size, cfg.model.batch_size, workers)
    pixels.decode_threads = decode_threads(device)
    if cfg.runtime.decode == "device" or (cfg.runtime.decode == "auto" and device.type == "cuda"):
        from retdmctl.data.gpu import DevicePixelSource

        # training batches on the device; every score through PIL, as predict computes them
        return DevicePixelSource(ws.lmdb, info, spec, cfg.model.image_size, cfg.model.batch_size, device, score=pixels)
    return pixels


def loader_workers(cfg: Config, device: torch.device) -> int:
    """``runtime.workers``, or for -1 (auto): none on the CPU, spare cores on a GPU."""
    if cfg.runtime.workers >= 0:
        return cfg.runtime.workers
    return 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))


class _Quiet:
    def print(self, *args, **kwargs) -> None:
        pass


_QUIET = _Quiet()


def require_splits(info: DatasetInfo, names: tuple[str, ...], ws: Workspace) -> None:
    """An empty split is an error before any training, not a traceback after it."""
    for name in names:
        if len(info.split(name)) == 0:
            fix = f"; re-ingest with a larger --{name}-fraction" if name in ("val", "test") else ""
            raise InputError(f"{ws.rel(ws.dataset)}: the {name} split is empty{fix}")
