"""Pieces the training and evaluation stages share: building the model, choosing the
image source for the mode, scoring a split, and the metric-loss batch sampler.

Under torchrun, scoring and embedding are sharded over the ranks and gathered (every
rank gets the whole result, in order); writing is rank 0's (``retdmctl.distributed``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hashlib
import json
import os

import numpy as np
import torch

from retdmctl import distributed
from retdmctl.config import Config, concrete
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.atomic import after_commit
from retdmctl.errors import BackboneError, CheckpointError, InputError
from retdmctl.knn import KnnGraph, knn_search
from retdmctl.losses.retdm import reconstruction_loss, two_way_metric_loss
from retdmctl.metrics import compute_metrics
from retdmctl.models.backbones import BackboneSpec, build_backbone, get_backbone_spec
from retdmctl.models.retdm import RETDM
from retdmctl.progress import track
from retdmctl.runtime import (
    autocast,
    decode_threads,
    derive_seed,
    pick_device,
    precision,
    prepare_model,
    save_checkpoint,
    seed_everything,
    set_threads,
    to_device,
)
from retdmctl.sources import (
    CachedSource,
    PixelSource,
    backbone_features,
    extract_backbone_features,
    extract_views,
    read_cache_key,
    read_cached,
    read_features,
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


def begin_training(ctx, stage: str, seed: int) -> tuple[torch.device, DatasetInfo, Path]:
    """Threads, seed, device, the dataset and the stage's folder; ``--force`` discards a
    resume point so that the stage starts over. Train and val must not be empty."""
    # The metric stage never runs the CNN; the others do unless the backbone is frozen
    # (feature extraction, when needed, sets its own threads).
    set_threads(cnn=stage != "metric" and runs_cnn(ctx.cfg))
    seed_everything(seed)
    device = pick_device(ctx.cfg.runtime.device)
    info = read_dataset(ctx.ws.dataset)
    require_splits(info, ("train", "val"), ctx.ws)
    stage_dir = ctx.ws.stage_dir(stage)

    def prepare() -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        if ctx.force:
            (stage_dir / "resume.pt").unlink(missing_ok=True)

    distributed.on_main(prepare)
    return device, info, stage_dir


def runs_cnn(cfg: Config) -> bool:
    """Whether training or scoring runs convolutions (all of the backbone, or the tuned
    end of it), or only the small heads on cached pooled features."""
    return not cfg.model.frozen_backbone or cfg.model.tune_blocks > 0


def require_splits(info: DatasetInfo, names: tuple[str, ...], ws: Workspace) -> None:
    """An empty split is an error before any training, not a traceback after it."""
    for name in names:
        if len(info.split(name)) == 0:
            fix = f"; re-ingest with a larger --{name}-fraction" if name in ("val", "test") else ""
            raise InputError(f"{ws.rel(ws.dataset)}: the {name} split is empty{fix}")


def finish_training(stage_dir: Path, state: dict, history: list[dict]) -> dict:
    """Write the stage's checkpoint (rank 0; with the number of processes that trained
    it); drop its resume point once the checkpoint is in place; return the summary."""
    state = {**state, "history": history, "world_size": distributed.world_size()}

    def write() -> None:
        save_checkpoint(stage_dir / "checkpoint.pt", state)
        after_commit(lambda: (stage_dir / "resume.pt").unlink(missing_ok=True))

    distributed.on_main(write)
    # the figures of the epoch whose weights were kept (fit marks it), not of the last one
    kept = next((h for h in history if h.get("kept")), history[-1] if history else {})
    summary = {"epochs": len(history), **{k: kept.get(k) for k in ("val_loss", "val_mAP") if k in kept}}
    if "epoch" in kept:
        summary["kept_epoch"] = kept["epoch"]
    if (vote := state.get("fusion")) is not None:  # what validation chose (the manifest's summary)
        summary["fusion"] = {k: vote[k] for k in ("k", "temp", "w", "val_mAP", "plain_val_mAP")}
    return summary


def backbone_cache_key(ws: Workspace, cfg: Config, info: DatasetInfo, device: torch.device) -> dict:
    """Everything the frozen backbone's cached features depend on: backbone, weights,
    input size, the image store, the order of the dataset's rows (their ids' hash) and
    the precision they are computed in on ``device``."""
    return views_cache_key(cfg.model, get_backbone_spec(cfg.model.backbone), ws.fingerprint(ws.lmdb),
                           _weights_fp(ws, cfg), ids=info.ids_digest, precision=precision(device))


def backbone_cache_path(ws: Workspace, cfg: Config, info: DatasetInfo | None = None,
                        device: torch.device | None = None) -> Path:
    """Where the frozen backbone's features for this config live: named by the hash of
    :func:`backbone_cache_key`, so a cache is never replaced, only added, and never read
    for another config, image order or precision. ``info``: dataset.h5's by default;
    ``device``: ``runtime.device``'s by default."""
    info = info if info is not None else read_dataset(ws.dataset)
    device = device if device is not None else pick_device(cfg.runtime.device)
    key = backbone_cache_key(ws, cfg, info, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return ws.cache_dir / "backbone" / f"{cfg.model.backbone}-{digest}.h5"


def _weights_fp(ws: Workspace, cfg: Config) -> str | None:
    return ws.fingerprint(Path(cfg.model.weights_file)) if cfg.model.weights_file else None


def ensure_backbone_cache(ws: Workspace, cfg: Config, info: DatasetInfo, device, console) -> Path:
    """Extract the frozen backbone's features once; reuse them while their key matches."""
    m = cfg.model
    path = backbone_cache_path(ws, cfg, info, device)
    key = backbone_cache_key(ws, cfg, info, device)  # also in the file: a cache of other rows is never read
    if distributed.on_main(lambda: read_cache_key(path) == key):
        console.print(f"reusing cached {m.backbone} features ({ws.rel(path)})")
        return path
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
            # under torchrun, rank 0 extracts the views while the others wait
            distributed.on_main(lambda: extract_views(path, forward, pixels, m.views, key, device, autocast(device)))
        elif distributed.active():  # each rank its shard; rank 0 writes them all
            rows = distributed.shard(np.arange(len(info.ids)))
            part = backbone_features(backbone, pixels, rows, device, autocast(device))
            features = distributed.gather_rows(part, to_main=True)
            distributed.on_main(lambda: write_backbone_features(path, features, key))
        else:
            extract_backbone_features(path, backbone, pixels, key, device, autocast(device))
    finally:
        torch.set_num_threads(previous)
    return path


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


def build_model(cfg: Config, num_classes: int, *, pretrained: bool, seed: int = 0) -> tuple[RETDM, BackboneSpec]:
    """The RETDM model for this config: with a backbone, or heads only when frozen.
    Initialised from its own seed, whatever the global RNG went through before."""
    concrete(cfg)
    m = cfg.model
    spec = get_backbone_spec(m.backbone)
    backbone = None
    if m.frozen_backbone and m.tune_blocks:
        # The middle way: the whole backbone is kept (so the checkpoint is a complete
        # image model), but only its last tune_blocks blocks and head are trained.
        backbone, spec = frozen_backbone(cfg)
        backbone.requires_grad_(False)
        for module in backbone.tail_modules(m.tune_blocks):
            module.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        if not m.frozen_backbone:
            weights = Path(m.weights_file) if m.weights_file else None
            backbone, spec = build_backbone(m.backbone, pretrained=pretrained and m.pretrained, weights_file=weights)
        model = RETDM(num_classes, spec.out_dim, m.embed_dim, m.dropout, backbone=backbone,
                      tune_blocks=m.tune_blocks if m.frozen_backbone else 0)
    return model, spec


def image_source(ws: Workspace, cfg: Config, info: DatasetInfo, spec: BackboneSpec, device=None, console=None):
    """Pixels from LMDB, or the cached backbone features in frozen-backbone mode
    (extracted first when this config has none yet)."""
    concrete(cfg)
    if cfg.model.frozen_backbone:
        path = ensure_backbone_cache(ws, cfg, info, device or torch.device("cpu"), console or _QUIET)
        if cfg.model.views == 1 and not cfg.model.tune_blocks:
            return CachedSource(read_features(path), info, cfg.model.batch_size)
        return CachedSource(read_cached(path), info, cfg.model.batch_size, cfg.model.views)
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


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)``, with a one-line CheckpointError
    that names the missing and unexpected keys."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise CheckpointError(f"{source} does not fit the model; {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def restore_image_model(model: RETDM, ckpt: dict, cfg: Config, source: str) -> str:
    """Load a classifier/joint checkpoint into ``model`` strictly; returns where the
    backbone's weights came from.

    A checkpoint of a frozen-backbone run holds no backbone: when ``model`` fine-tunes
    one, the backbone is the pretrained one the frozen run used (loaded explicitly, and
    said so). A fine-tuned backbone never goes into a frozen model: its weights would be
    silently dropped.
    """
    state = ckpt["model"]
    has_backbone = any(k.startswith("backbone.") for k in state)
    if model.backbone is None:
        if has_backbone:
            raise CheckpointError(
                f"{source} holds a fine-tuned backbone, but model.frozen_backbone = true would "
                "drop it: use --finetune-backbone"
            )
        load_state(model, state, source)
        return "pretrained (frozen, cached features)"
    if has_backbone:
        load_state(model, state, source)
        return f"from {source}"
    if not ckpt.get("frozen_backbone"):
        raise CheckpointError(f"{source} holds no backbone weights")
    m = cfg.model
    weights = Path(m.weights_file) if m.weights_file else None
    pretrained, _ = build_backbone(m.backbone, pretrained=m.pretrained, weights_file=weights)
    backbone = {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}
    load_state(model, {**state, **backbone}, source)
    return f"{m.backbone} pretrained weights ({source} was trained on frozen features)"


def load_parts(model: torch.nn.Module, state: dict[str, torch.Tensor], parts: tuple[str, ...], source: str) -> None:
    """Strictly load the submodules ``parts`` of ``model`` from the keys ``part.*`` of
    ``state`` (the rest of ``state`` is deliberately not used)."""
    for part in parts:
        prefix = part + "."
        load_state(getattr(model, part), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, f"{source} [{part}]")


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
        out = _predict(model, source, distributed.shard(rows), device, vote)
        return tuple(distributed.gather_rows(a) for a in out)  # type: ignore[return-value]
    return _predict(model, source, rows, device, vote)


def _predict(model: RETDM, source, rows: np.ndarray, device: torch.device, vote) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model.eval()
    num_classes, dim = model.cls_head.out_features, model.cls_head.in_features
    if len(rows) == 0:  # a rank's shard of a split smaller than the world
        empty = np.zeros((0, num_classes), np.float32)
        return empty, empty.copy(), np.zeros((0, dim), np.float32)
    if vote is not None:
        vote = vote.to(device)
    scores, labels, feats = [], [], []
    for x, y, r in track(source.eval_batches(rows), source.num_batches(rows), "scoring"):
        with autocast(device):
            f = model.embed_images(to_device(x, device))
            logits = model.classify(f)
        p = torch.sigmoid(logits.float())
        if vote is not None:
            p = vote(f.float(), p, vote.positions(np.asarray(r)))
        scores.append(p.cpu().numpy())
        labels.append(y.numpy())
        feats.append(f.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(feats)


@torch.no_grad()
def embed_all(model: RETDM, source, n: int, device: torch.device) -> np.ndarray:
    """f = phi(x) for every image (eval mode, centre crop); sharded under torchrun."""
    model.eval()
    rows = distributed.shard(np.arange(n))
    out = np.zeros((len(rows), model.cls_head.in_features), dtype=np.float32)
    start = rows[0] if len(rows) else 0
    for x, _, r in track(source.eval_batches(rows), source.num_batches(rows), "embedding"):
        with autocast(device):
            out[r - start] = model.embed_images(to_device(x, device)).float().cpu().numpy()
    return distributed.gather_rows(out)


def describe_vote(vote: dict) -> str:
    if vote["w"] == 0:
        return f"neighbour vote: off (no (k, t, w) beat validation mAP {vote['plain_val_mAP']:.4f})"
    return (f"neighbour vote: k {vote['k']}, t {vote['temp']:g}, w {vote['w']:g} "
            f"(validation mAP {vote['plain_val_mAP']:.4f} -> {vote['val_mAP']:.4f})")


def choose_decision(model: RETDM, source, info: DatasetInfo, device: torch.device,
                    train_features: np.ndarray | None = None, console=None, stage: str = "") -> dict:
    """How this model decides, chosen on the validation split and saved in its checkpoint:
    the neighbour vote's (k, t, w) with its bank of training embeddings (``fusion``,
    :mod:`retdmctl.fusion`; w = 0 where the vote does not help validation mAP), the
    thresholds of the plain scores (``threshold_choice``) and of the fused ones
    (``fusion.threshold_choice``), and ``thresholds``: the per-class ones that predict
    uses by default, those of the fused scores. ``info`` holds the training labels the
    model was trained on; ``train_features`` the training rows' f where already computed."""
    from retdmctl import fusion, thresholds

    train_rows, val_rows = info.split("train"), info.split("val")
    scores, labels, val_f = predict_with_embeddings(model, source, val_rows, device)
    if train_features is None:
        _, _, train_features = predict_with_embeddings(model, source, train_rows, device)
    known = info.known_at(val_rows)  # unknown validation labels take no part in any choice
    vote = fusion.choose(train_features, (info.labels[train_rows] > 0).astype(np.uint8), train_rows,
                         val_f, scores, labels, known, ids=info.ids_digest)
    plain = thresholds.choose(labels, scores, known)
    used = vote["threshold_choice"] if vote["w"] > 0 else plain
    if console is not None:
        console.print(f"{stage}: {describe_vote(vote)}" if stage else describe_vote(vote))
    return {"threshold_choice": plain, "fusion": vote, "thresholds": used["per_class"]}


def val_bce_and_map(model: RETDM, source, rows: np.ndarray, device: torch.device,
                    known: np.ndarray | None = None) -> dict[str, float]:
    """Validation BCE and mAP over the known entries (``known``: ``info.known_at(rows)``)."""
    scores, labels = predict_scores(model, source, rows, device)
    eps = 1e-7
    p = np.clip(scores, eps, 1 - eps)
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    bce = float(bce.mean() if known is None else bce[known].mean())
    return {"val_loss": bce, "val_mAP": compute_metrics(labels, scores, known=known)["mAP"]}


@dataclass
class MetricSampler:
    """Builds the metric-loss inputs for a batch of dataset rows.

    Training rows use the graph's label sets and neighbours. Validation rows may carry a
    label set unseen in training, so their neighbours are searched among the training
    label sets once, up front (``for_rows``).
    """

    graph: KnnGraph
    label_sets: torch.Tensor  # (S, L) float
    row_neighbors: np.ndarray  # (N, k) int32: each dataset row's neighbour set indices, -1 for none

    @classmethod
    def build(cls, graph: KnnGraph, info: DatasetInfo, extra_rows: np.ndarray) -> MetricSampler:
        # One table indexed by dataset row: a batch's neighbours are one fancy index,
        # not a Python loop over a dict (the metric stage's steps are ~1 ms).
        table = np.full((max(len(info.labels), len(graph.image_set)), graph.k), -1, dtype=np.int32)
        train_rows = np.flatnonzero(graph.image_set >= 0)
        table[train_rows] = graph.neighbors[graph.image_set[train_rows]]
        if len(extra_rows):
            nbrs, _ = knn_search(graph.label_sets, info.labels[extra_rows], graph.k, graph.index.get("kind", "exact"))
            table[extra_rows] = nbrs
        return cls(graph, torch.from_numpy(graph.label_sets.astype(np.float32)), table)

    def neighbors(self, rows: np.ndarray) -> np.ndarray:
        """(B, k) neighbour set indices of ``rows``; KeyError for a row that has none."""
        out = self.row_neighbors[rows]
        if len(out) and out[:, 0].min() < 0:
            missing = np.asarray(rows)[out[:, 0] < 0]
            raise KeyError(f"dataset rows without label-set neighbours: {missing[:5].tolist()}")
        return out

    def way2_images(self, neighbor_sets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each neighbour set, a random training image whose label set is exactly it."""
        start = self.graph.set_ptr[neighbor_sets]
        count = self.graph.set_ptr[neighbor_sets + 1] - start
        pick = start + (rng.random(neighbor_sets.shape) * count).astype(np.int64)
        return self.graph.set_members[pick]


def metric_and_rec(model: RETDM, f, y, rows, sampler: MetricSampler, f_bank: torch.Tensor, rng, loss_cfg):
    """(alpha-free) L_metric and L_rec for a batch; f_{i_j} taken from ``f_bank``."""
    neighbors = sampler.neighbors(rows)  # (B, k) label-set indices
    g_pos = model.label_net(y)
    # psi once per distinct neighbour set in the batch, not once per (image, neighbour)
    uniq, inverse = np.unique(neighbors, return_inverse=True)
    g_uniq = model.label_net(sampler.label_sets.to(y.device)[torch.from_numpy(uniq).long()])
    g_neg = g_uniq[torch.from_numpy(inverse.reshape(neighbors.shape)).to(y.device)]
    picks = torch.from_numpy(sampler.way2_images(neighbors, rng)).to(y.device)
    f_neg = f_bank[picks]
    metric = two_way_metric_loss(f, g_pos, g_neg, f_neg, loss_cfg.lam, loss_cfg.margin)
    rec = reconstruction_loss(model.rec_head(g_pos), y)
    return metric, rec
