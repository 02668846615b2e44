"""timm models as backbones: ``timm:<name>`` in ``model.backbone`` / ``--backbone``.

Weights are read from ``--weights-file`` (a ``state_dict`` or ``.safetensors``) or from
the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), where ``huggingface-cli download timm/<name>`` or any
earlier ``timm.create_model(..., pretrained=True)`` put them. Nothing here downloads:
``HF_HUB_OFFLINE=1`` is forced in the process and the cached file is handed to timm by
path.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from retdmctl.errors import BackboneError
from retdmctl.models.spec import BackboneSpec
from retdmctl.models.weights import load_strict, read_state_file

PREFIX = "timm:"
# The files timm's Hugging Face repositories hold, in the order timm tries them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a ``timm:<model>`` backbone name."""
    return name.startswith(PREFIX)


def _timm():
    """timm, imported with the Hugging Face hub forced offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at import time; the process may have imported it
    except ImportError:
        pass
    try:
        import timm
    except ImportError:
        raise BackboneError("timm backbones need timm: pip install timm") from None
    return timm


def _model_name(name: str) -> str:
    """``timm:resnet18`` -> ``resnet18``, checked against timm's registry."""
    timm = _timm()
    model = name[len(PREFIX):]
    arch = model.split(".", 1)[0]
    if not model or not timm.is_model(arch):
        raise BackboneError(f"unknown timm backbone '{name}'; list the names with: "
                            f"python -c \"import timm; print(timm.list_models('*{arch or 'resnet'}*'))\"")
    return model


class TimmBackbone(nn.Module):
    """A timm model cut to its pooled pre-logit features (``forward``: ``(B, out_dim)``).

    For timm's EfficientNet and MobileNetV3 families (``conv_stem``, ``bn1`` and stages
    of ``blocks``) it also offers the trunk/tail split of ``model.tune_blocks``: a block
    is one block of a stage; the tail is the last ``tail`` blocks and the head."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3

        self._split = isinstance(net, (EfficientNet, MobileNetV3))
        self._efficientnet = isinstance(net, EfficientNet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._split:
            return self.forward_tail(self.forward_trunk(x, 0), 0)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def _blocks(self) -> list[nn.Module]:
        return [block for stage in self.net.blocks for block in stage] if self._split else []

    def tunable_blocks(self) -> int:
        return len(self._blocks())

    def forward_trunk(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        blocks = self._blocks()
        x = self.net.bn1(self.net.conv_stem(x))
        for block in blocks[: len(blocks) - tail]:
            x = block(x)
        return x

    def forward_tail(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        blocks = self._blocks()
        for block in blocks[len(blocks) - tail :] if tail else ():
            x = block(x)
        if self._efficientnet:
            x = self.net.bn2(self.net.conv_head(x))
        return self.net.forward_head(x, pre_logits=True)

    def tail_modules(self, tail: int) -> list[nn.Module]:
        """What ``forward_tail(x, tail)`` trains: the last ``tail`` blocks and the head."""
        blocks = self._blocks()
        head = [self.net.conv_head, self.net.bn2] if self._efficientnet else [self.net.conv_head, self.net.norm_head]
        return [*(blocks[len(blocks) - tail :] if tail else []), *head]


def create(model: str, **kwargs) -> TimmBackbone:
    """The timm model ``model`` without classifier or dropout, randomly initialised unless
    ``kwargs`` say otherwise."""
    timm = _timm()
    return TimmBackbone(timm.create_model(model, num_classes=0, drop_rate=0.0, **kwargs))


@lru_cache(maxsize=None)
def timm_spec(name: str) -> BackboneSpec:
    """The spec of ``timm:<model>``: pooled size, mean/std and input size from timm's
    pretrained config (one random-init build, cached)."""
    model = _model_name(name)
    timm = _timm()
    backbone = create(model)
    net = backbone.net
    data = timm.data.resolve_model_data_config(net)
    out_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return BackboneSpec(name, out_dim, tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                        int(data["input_size"][-1]),
                        "timm: --weights-file, or the local Hugging Face cache (never downloaded)",
                        backbone.tunable_blocks())


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return home / "hub"


def cached_weights(name: str, model: str) -> Path:
    """The file of ``model``'s default pretrained weights in the local Hugging Face cache;
    a one-line :class:`BackboneError` naming ``--weights-file`` when it is not there."""
    timm = _timm()
    repo = getattr(timm.models.get_pretrained_cfg(model), "hf_hub_id", None)
    if not repo:
        raise BackboneError(f"no pretrained weights for {name}: timm names no Hugging Face repository for it; "
                            "pass --weights-file FILE, or use --no-pretrained")
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    raise BackboneError(f"no pretrained weights for {name} in the local Hugging Face cache ({cache}, repository {repo}); "
                        "retdmctl never downloads: pass --weights-file FILE, or use --no-pretrained")


def build_timm(name: str, *, pretrained: bool = True, weights_file: Path | None = None) -> tuple[TimmBackbone, BackboneSpec]:
    """Build ``timm:<model>`` and load its weights from a local file (``weights_file``
    wins over ``pretrained``; a checkpoint's classifier keys are ignored)."""
    spec = timm_spec(name)
    model = _model_name(name)
    if weights_file is None and pretrained:
        path = cached_weights(name, model)
        try:  # timm's own pretrained loading (its key filters included), from the file only
            return create(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}), spec
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(f"cached weights {path} do not load into {name}: {reason}") from None
    backbone = create(model)
    if weights_file is not None:
        path = Path(weights_file)
        classifier = backbone.net.pretrained_cfg.get("classifier") or ()
        dropped = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        load_strict(backbone.net, read_state_file(path), path, name, dropped)
    return backbone, spec
