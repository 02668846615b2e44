"""Reading a checkpoint into a model and its decision rule.

* :func:`build_model` makes the RETDM model of a config; :func:`load_state` and
  :func:`load_parts` load weights strictly, with a one-line error naming the keys.
* :func:`backbone_origin` is the one rule for where an image model's backbone weights
  come from: the checkpoint's own backbone, or for a frozen-backbone checkpoint the
  pretrained backbone that made its cached features (:func:`pretrained_backbone`). The
  stages, eval and the report restore into a model built from the config
  (:func:`restore_image_model`); predict and export into one built from the checkpoint's
  own config (:func:`image_model`, after :func:`read_image_checkpoint`).
* :class:`DecisionRule` is the one reading of the saved decision: the neighbour vote
  fused into the scores (or None) and the thresholds chosen for those scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retdmctl import fusion, thresholds
from retdmctl.config import Config, ModelConfig, concrete
from retdmctl.errors import CheckpointError, RetdmError
from retdmctl.inputs import frozen_backbone
from retdmctl.models.backbones import BackboneSpec, build_backbone, get_backbone_spec
from retdmctl.models.retdm import RETDM
from retdmctl.runtime import derive_seed, load_checkpoint

DEFAULT_THRESHOLD = 0.5  # per class, where a checkpoint saved none


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


def backbone_origin(ckpt: dict, frozen: bool) -> str:
    """The one rule for where an image model's backbone weights come from: "checkpoint"
    (it holds them: fine-tuned, or kept whole with ``model.tune_blocks``), "pretrained"
    (a frozen-backbone run, ``frozen``, saved only the heads: the backbone is the
    pretrained one that made its cached features), or "none" (an error for whoever needs
    a backbone). :func:`restore_image_model` and :func:`image_model` both follow it."""
    if any(k.startswith("backbone.") for k in ckpt["model"]):
        return "checkpoint"
    return "pretrained" if frozen else "none"


def pretrained_backbone(name: str, *, pretrained: bool, weights_file: str | None) -> torch.nn.Module:
    """The backbone of a frozen-backbone run: ``weights_file`` where it was trained with
    one, else the packaged pretrained weights (with ``pretrained``)."""
    weights = Path(weights_file) if weights_file else None
    backbone, _ = build_backbone(name, pretrained=pretrained, weights_file=weights)
    return backbone


def restore_image_model(model: RETDM, ckpt: dict, cfg: Config, source: str) -> str:
    """Load a classifier/joint checkpoint into ``model`` strictly; returns where the
    backbone's weights came from.

    A checkpoint of a frozen-backbone run holds no backbone: when ``model`` fine-tunes
    one, the backbone is the pretrained one the frozen run used (loaded explicitly, and
    said so). A fine-tuned backbone never goes into a frozen model: its weights would be
    silently dropped.
    """
    state = ckpt["model"]
    origin = backbone_origin(ckpt, bool(ckpt.get("frozen_backbone")))
    if model.backbone is None:
        if origin == "checkpoint":
            raise CheckpointError(
                f"{source} holds a fine-tuned backbone, but model.frozen_backbone = true would "
                "drop it: use --finetune-backbone"
            )
        load_state(model, state, source)
        return "pretrained (frozen, cached features)"
    if origin == "checkpoint":
        load_state(model, state, source)
        return f"from {source}"
    if origin == "none":
        raise CheckpointError(f"{source} holds no backbone weights")
    m = cfg.model
    pretrained = pretrained_backbone(m.backbone, pretrained=m.pretrained, weights_file=m.weights_file)
    backbone = {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}
    load_state(model, {**state, **backbone}, source)
    return f"{m.backbone} pretrained weights ({source} was trained on frozen features)"


def load_parts(model: torch.nn.Module, state: dict[str, torch.Tensor], parts: tuple[str, ...], source: str) -> None:
    """Strictly load the submodules ``parts`` of ``model`` from the keys ``part.*`` of
    ``state`` (the rest of ``state`` is deliberately not used)."""
    for part in parts:
        prefix = part + "."
        load_state(getattr(model, part), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, f"{source} [{part}]")



def read_image_checkpoint(path: Path) -> dict[str, Any]:
    """A classifying stage's checkpoint (predict, export): RetdmError where it lacks what
    rebuilding the image model needs."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "class_names", "backbone", "feature_dim") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RetdmError(f"{path} is not a retdmctl checkpoint (no {', '.join(missing)})")
    return ckpt


def checkpoint_model_config(ckpt: dict) -> dict[str, Any]:
    """The ``model`` section a checkpoint was trained with, over the defaults."""
    return {**ModelConfig().__dict__, **(ckpt.get("config") or {}).get("model", {})}


def image_model(ckpt: dict, path: Path) -> tuple[RETDM, BackboneSpec, bool]:
    """The whole image network of a checkpoint (backbone included), built from the
    checkpoint's own config rather than the workspace's: (model, spec, frozen).

    A frozen-backbone checkpoint holds only the heads: the backbone is rebuilt from its
    packaged pretrained weights (or the ``model.weights_file`` it was trained with), which
    is what produced the cached features the heads were trained on. Both parts are
    loaded strictly."""
    model_cfg = checkpoint_model_config(ckpt)
    class_names = ckpt["class_names"]
    spec = get_backbone_spec(ckpt["backbone"])
    frozen = bool(ckpt.get("frozen_backbone", model_cfg.get("frozen_backbone", False)))

    state: dict[str, torch.Tensor] = ckpt["model"]
    origin = backbone_origin(ckpt, frozen)
    heads_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    net = RETDM(len(class_names), int(ckpt["feature_dim"]), int(model_cfg["embed_dim"]), float(model_cfg["dropout"]))
    load_state(net, heads_state, f"checkpoint {path} (heads)")
    if origin == "checkpoint":
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        backbone, _ = build_backbone(spec.name, pretrained=False)
        load_state(backbone, backbone_state, f"checkpoint {path} (backbone)")
    elif origin == "pretrained":
        if not model_cfg.get("weights_file") and (not model_cfg.get("pretrained", True) or spec.name == "tiny_cnn"):
            # the cached features came from a randomly initialised backbone that was never saved
            raise RetdmError(f"checkpoint {path} was trained on features of a frozen, randomly initialised "
                             f"{spec.name} that cannot be rebuilt: retrain with pretrained weights or fine-tune")
        backbone = pretrained_backbone(spec.name, pretrained=True, weights_file=model_cfg.get("weights_file"))
    else:
        raise RetdmError(f"checkpoint {path} has no backbone weights but was not trained with a frozen backbone")
    net.backbone = backbone
    return net, spec, frozen


@dataclass(frozen=True)
class DecisionRule:
    """How a checkpoint decides, as saved by validation (``training.decision``).

    ``vote``: the neighbour vote fused into the scores, None where it is not applied (the
    checkpoint has none, validation chose w = 0, or fusion is off). ``choice``: the saved
    threshold choice (``global``, ``per_class``) of exactly those scores, the fused ones
    where the vote is applied. ``saved``: the per-class thresholds that predict applies by
    default, as saved (None: the checkpoint has none)."""

    vote: fusion.NeighbourVote | None
    choice: dict | None
    saved: list | None

    def cut(self, rule: str, threshold: float, num_classes: int) -> np.ndarray:
        """The eval threshold rule (``eval.thresholds``, ``eval.threshold``) applied to the choice."""
        return thresholds.resolve(self.choice, rule, threshold, num_classes)

    def per_class(self, num_classes: int, source: str) -> tuple[np.ndarray, str]:
        """(thresholds per class, "checkpoint" or "default"): the saved ones, or
        :data:`DEFAULT_THRESHOLD` for every class where the checkpoint has none."""
        values, origin = self.saved, "checkpoint"
        if values is None:
            values, origin = [DEFAULT_THRESHOLD] * num_classes, "default"
        out = np.asarray([float(t) for t in values], dtype=np.float64)
        if out.shape != (num_classes,):
            raise RetdmError(f"checkpoint {source} has {out.size} thresholds for {num_classes} classes")
        return out, origin


def decision_rule(ckpt: dict, source: str, *, num_classes: int, embed_dim: int, apply_vote: bool,
                  ids: str | None = None, check_vote: bool = False) -> DecisionRule:
    """The checkpoint's decision rule. ``apply_vote``: fuse the saved vote (``eval.fusion``,
    predict's ``--fusion``). ``ids``: the dataset's ids digest where dataset rows are
    scored (eval, the report; see :func:`retdmctl.fusion.from_checkpoint`); None for
    images that are not dataset rows (predict). ``check_vote``: read (and so check) the
    saved vote even where it is not applied (predict and export load a checkpoint whole)."""
    saved_vote = None
    if apply_vote or check_vote:
        saved_vote = fusion.from_checkpoint(ckpt, source, embed_dim=embed_dim, num_classes=num_classes, ids=ids)
    vote = saved_vote if apply_vote else None
    saved = ckpt.get("fusion")
    if vote is not None and saved is not None and float(saved["w"]) > 0.0:
        choice = saved["threshold_choice"]
    else:
        choice = ckpt.get("threshold_choice")
    # ckpt["thresholds"]: the per-class thresholds of the scores as the checkpoint scores by
    # default (fused where it has a vote); without its vote, those chosen for the plain ones
    per_class = ckpt.get("thresholds")
    if saved_vote is not None and vote is None:
        per_class = ckpt["threshold_choice"]["per_class"]
    return DecisionRule(vote=vote, choice=choice, saved=per_class)
