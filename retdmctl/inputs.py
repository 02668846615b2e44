"""What the image model reads, for a config: the image source of its mode (pixels from
LMDB, or the frozen backbone's cached features), the frozen backbone itself and the
cache of its features, and the files a stage that builds the model depends on.

Below both training and scoring: the training stages, eval, the report and predict's
checks all take their inputs from here. Under torchrun, extracting the cache is sharded
over the ranks, each writing its part beside the cache, and rank 0 merges the parts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retdmctl import disk, distributed
from retdmctl.cache import display, entry_lock
from retdmctl.config import Config, concrete
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.data.store import records_digest
from retdmctl.errors import BackboneError, InputError
from retdmctl.models.backbones import BackboneSpec, build_backbone, get_backbone_spec
from retdmctl.pace import Pace
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
    merge_parts,
    output_shape,
    part_path,
    pooled_outputs,
    read_cache_key,
    read_cache_origin,
    view_outputs,
    views_cache_key,
    write_cache,
    write_part,
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
    Writers of one entry take its lock: two workspaces extracting at once do it once.

    Before anything is written (not even the lock file), the size of the cache is
    computed and the disk's free space checked (:func:`retdmctl.disk.require_room`);
    under torchrun every process extracts its shard (:func:`_run`)."""
    path = backbone_cache_path(ws, cfg, info, device)
    key = backbone_cache_key(ws, cfg, info, device)  # also in the file: a cache of other rows is never read
    if distributed.on_main(lambda: _reuse(ws, path, key, cfg, console)):
        return path
    with _cnn_threads():
        job = _job(ws, cfg, info, device, path, key)
        distributed.on_main(lambda: _check_room(job))
        with contextlib.ExitStack() as held:

            def locked_reuse() -> bool:  # rank 0 holds the entry's lock while the ranks extract
                held.enter_context(entry_lock(path, console))
                for stale in path.parent.glob(f".{path.name}.part*"):  # parts are written under the lock only:
                    stale.unlink(missing_ok=True)  # these are a killed run's
                return _reuse(ws, path, key, cfg, console)  # another process may have made it meanwhile

            if not distributed.on_main(locked_reuse):
                distributed.on_main(lambda: console.print(_size_line(job), soft_wrap=True))
                _run(job, console)
    return path


def _reuse(ws: Workspace, path: Path, key: dict, cfg: Config, console) -> bool:
    if read_cache_key(path) != key:
        return False
    origin = read_cache_origin(path)
    made = f", extracted by workspace {origin}" if origin and origin != str(ws.root.resolve()) else ""
    console.print(f"reusing cached {cfg.model.backbone} features ({display(path)}{made})", soft_wrap=True)
    return True


@dataclass
class _Job:
    """An extraction, ready to run: what it computes, and what it writes where."""

    path: Path
    key: dict
    origin: str
    pixels: PixelSource
    forward: Callable[[torch.Tensor], torch.Tensor]  # the backbone, or its trunk
    views: int | None  # None: pooled features (N, F); else (N, V, ...)
    shape: tuple[int, ...]  # what one image adds: (F,) or (V, C, H, W)
    rows: int
    device: torch.device

    @property
    def nbytes(self) -> int:
        return self.rows * math.prod(self.shape) * 2  # float16

    def outputs(self, rows: np.ndarray):
        if self.views is None:
            return pooled_outputs(self.forward, self.pixels, rows, self.device, autocast(self.device))
        return view_outputs(self.forward, self.pixels, self.views, rows, self.device, autocast(self.device))


def _job(ws: Workspace, cfg: Config, info: DatasetInfo, device, path: Path, key: dict) -> _Job:
    m = cfg.model
    backbone, spec = frozen_backbone(cfg)
    backbone = prepare_model(backbone, device).eval()
    pixels = PixelSource(ws.lmdb, info, spec, m.image_size, m.batch_size, loader_workers(cfg, device))
    pixels.decode_threads = decode_threads(device)
    views = m.views if m.views > 1 or m.tune_blocks else None
    forward = (lambda x: backbone.forward_trunk(x, m.tune_blocks)) if m.tune_blocks else backbone
    shape = output_shape(forward, m.image_size, views, device, autocast(device))  # one blank image
    return _Job(path, key, str(ws.root.resolve()), pixels, forward, views, shape, len(info.ids), device)


def _size_line(job: _Job) -> str:
    """``backbone inputs: 20,000 images x 10 views of 192x7x7, 1.23 GB, into PATH``."""
    if job.views is None:
        what = f"backbone features: {job.rows:,} images x {job.shape[0]}"
    else:
        each = "x".join(str(d) for d in job.shape[1:])
        what = f"backbone inputs: {job.rows:,} images x {job.views} view{'s' if job.views > 1 else ''} of {each}"
    by = f", extracted by {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    return f"{what}, {disk.size(job.nbytes)}, into {display(job.path)}{by}"


def _check_room(job: _Job) -> None:
    """Refuse an extraction the cache's disk has no room for, naming what would fit.
    Under torchrun the shards' part files coexist with the merged file."""
    world = distributed.world_size()
    if job.views is None:
        fix = "free space or point RETDM_CACHE_DIR at a larger disk"
    else:
        fewer = "cache fewer views (--set model.views=N) or " if job.views > 1 else "cache "
        fix = f"free space, point RETDM_CACHE_DIR at a larger disk, or {fewer}pooled features (--tune-blocks 0 --views 1)"
    if world == 1:
        disk.require_room(job.path.parent, job.nbytes, "the backbone cache", fix)
    else:
        disk.require_room(job.path.parent, 2 * job.nbytes, f"the backbone cache with its {world} shard files",
                          f"{fix}; one process (without torchrun) needs half")


def _run(job: _Job, console) -> None:
    """Extract and write the cache. Under torchrun each process extracts its contiguous
    shard of the rows into a part file beside the cache, and rank 0 merges them a block
    at a time into the cache file (the layout one process writes), then removes them:
    nothing of the size of the dataset is held in memory by any process."""
    description = "backbone features" if job.views is None else f"backbone inputs, {job.views} view(s)"
    chunked = job.views is not None
    say = lambda line: console.print(line, soft_wrap=True)  # noqa: E731 - quiet on ranks > 0
    if not distributed.active():
        with Pace(description, job.rows, say) as pace:
            write_cache(job.path, job.outputs(np.arange(job.rows)), job.rows, job.key, job.origin,
                        chunked=chunked, pace=pace)
        return
    world, rank = distributed.world_size(), distributed.rank()
    shards = np.array_split(np.arange(job.rows), world)
    parts = [part_path(job.path, r) for r in range(world) if len(shards[r])]
    mine, error = shards[rank], None
    try:
        if len(mine):
            with Pace(description, len(mine), say, processes=world) as pace:
                write_part(job.path, rank, job.outputs(mine), mine, chunked=chunked, pace=pace)
    except Exception as exc:  # noqa: BLE001 - the others learn of it below, then it is raised
        error = exc
    failed = distributed.sum_over_ranks({"failed": float(error is not None)})["failed"]
    if error is not None:
        raise error
    if failed:
        part_path(job.path, rank).unlink(missing_ok=True)
        raise distributed.PeerError("another process failed to extract its shard of the backbone cache")

    def merge() -> None:
        try:
            merge_parts(job.path, parts, job.rows, job.key, job.origin)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)

    distributed.on_main(merge)


@contextlib.contextmanager
def _cnn_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    set_threads(cnn=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _extract(ws: Workspace, cfg: Config, info: DatasetInfo, device, path: Path, key: dict) -> None:
    """Extract this config's cache into ``path`` now (no lock, no room check)."""
    with _cnn_threads():
        _run(_job(ws, cfg, info, device, path, key), _QUIET)


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
