"""Loading a trained checkpoint for inference: the image network (backbone included),
its class names, per-class thresholds and the exact preprocessing.

The preprocessing is *the* eval transform of :mod:`retdmctl.data.loaders`
(:func:`~retdmctl.data.loaders.eval_transform` after :func:`~retdmctl.data.loaders.decode`):
``retdmctl eval``, ``retdmctl predict`` and the metadata that ``retdmctl export`` writes
all come from that one function. :class:`Preprocess` reads its description (sizes,
mean, std, scale) off the transform object itself, so the two cannot drift apart.

Usage::

    predictor = load_predictor("retdm-work")          # joint if trained, else classifier
    probs = predictor.predict([Image.open("a.jpg")])  # (1, L) sigmoid probabilities
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from retdmctl import __version__
from retdmctl.data.loaders import decode, eval_transform
from retdmctl.errors import RetdmError
from retdmctl.fusion import NeighbourVote
from retdmctl.model_io.checkpoint import checkpoint_model_config, decision_rule, image_model, read_image_checkpoint
from retdmctl.model_io.scoring import score_batch
from retdmctl.models.retdm import RETDM
from retdmctl.runtime import autocast, pick_device

STAGES = ("joint", "classifier")  # the stages whose checkpoints classify, preferred first


# --- preprocessing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """What is done to an image before the network sees it (read off the eval transform)."""

    input_size: tuple[int, int]  # (height, width) of the network input
    resize_shorter_side: int  # the shorter side is resized to this first
    crop_size: tuple[int, int]  # centre crop (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float  # uint8 pixel * pixel_scale, then (x - mean) / std
    interpolation: str
    antialias: bool
    transform: Any = field(repr=False, compare=False, default=None)  # the v2.Compose itself

    @classmethod
    def for_model(cls, image_size: int, mean, std) -> Preprocess:
        """The description of ``eval_transform(image_size, mean, std)``, with the transform."""
        return cls.from_transform(eval_transform(image_size, mean, std))

    @classmethod
    def from_transform(cls, tf: v2.Compose) -> Preprocess:
        steps = {type(t): t for t in tf.transforms}
        expected = (v2.Resize, v2.CenterCrop, v2.ToImage, v2.ToDtype, v2.Normalize)
        if [type(t) for t in tf.transforms] != list(expected):
            # eval_transform changed shape: describing it would now be a guess
            raise RetdmError("the eval transform is no longer resize, centre crop, normalise: "
                             "update retdmctl.inference.Preprocess to describe it")
        resize, crop, to_dtype, norm = (steps[v2.Resize], steps[v2.CenterCrop], steps[v2.ToDtype], steps[v2.Normalize])
        if len(resize.size) != 1:
            raise RetdmError(f"the eval transform resizes to {resize.size}, not a shorter side")
        crop_hw = tuple(int(s) for s in crop.size)
        return cls(
            input_size=crop_hw,  # type: ignore[arg-type]
            resize_shorter_side=int(resize.size[0]),
            crop_size=crop_hw,  # type: ignore[arg-type]
            mean=tuple(float(m) for m in norm.mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in norm.std),  # type: ignore[arg-type]
            pixel_scale=1.0 / 255.0 if to_dtype.scale else 1.0,
            interpolation=str(getattr(resize.interpolation, "value", resize.interpolation)),
            antialias=bool(resize.antialias),
            transform=tf,
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A decoded RGB PIL image -> normalised ``(3, H, W)`` float tensor."""
        return self.transform(img)

    def load(self, path: Path) -> torch.Tensor:
        """Read and decode a file exactly as the LMDB images are decoded, then transform."""
        return self(decode(Path(path).read_bytes()))

    def to_dict(self) -> dict[str, Any]:
        """The metadata a consumer needs to reproduce the input with PIL and NumPy alone."""
        h, w = self.crop_size
        return {
            "input_size": [h, w],
            "layout": "NCHW",
            "channel_order": "RGB",
            "dtype": "float32",
            "decode": "PIL Image.open(...).convert('RGB'); no EXIF rotation",
            "resize_shorter_side": self.resize_shorter_side,
            "resize_rule": (
                f"resize so that the shorter side is {self.resize_shorter_side} px "
                f"(round(input_size * 256 / 224)); longer side = int(long * {self.resize_shorter_side} / short) "
                "(truncated); aspect ratio kept"
            ),
            "interpolation": self.interpolation,
            "antialias": self.antialias,
            "crop_size": [h, w],
            "crop_rule": "centre crop: top = round((height - crop_h) / 2), left = round((width - crop_w) / 2) "
            "(Python round, half to even)",
            "pixel_scale": self.pixel_scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "normalize": "x = (pixel * pixel_scale - mean[c]) / std[c]",
        }


# --- the network ---------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """Pixels -> (logits, probabilities): phi (backbone + embed) and W_c of a RETDM model,
    and the neighbour vote fused into the probabilities where the checkpoint has one
    (:mod:`retdmctl.fusion`): probabilities = (1 - w) sigmoid(logits) + w vote(f)."""

    def __init__(self, net: RETDM, vote: NeighbourVote | None = None) -> None:
        super().__init__()
        if net.backbone is None:
            raise RetdmError("the image classifier needs a backbone")
        self.net = net
        self.vote = vote

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits, probs = score_batch(self.net, images, self.vote)
        return logits, probs


@dataclass
class Predictor:
    classifier: ImageClassifier  # eval mode, on ``device``
    class_names: list[str]
    thresholds: np.ndarray  # (L,) float
    threshold_source: str  # "checkpoint" or "default"
    preprocess: Preprocess
    device: torch.device
    checkpoint: Path
    stage: str
    backbone: str
    frozen_backbone: bool

    @property
    def net(self) -> RETDM:
        return self.classifier.net

    @property
    def vote(self) -> NeighbourVote | None:
        return self.classifier.vote

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Preprocessed ``(B, 3, H, W)`` -> ``(B, L)`` probabilities (float32)."""
        x = x.to(self.device)
        _, _, probs = score_batch(self.net, x, self.vote, cast=autocast(self.device))
        return probs.cpu().numpy()

    def predict(self, images: list[Image.Image | str | Path]) -> np.ndarray:
        """PIL images or image files -> ``(B, L)`` probabilities, in the order given
        (a file is decoded as ingest decodes it; a PIL image is converted to RGB)."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        return self.predict_tensor(torch.stack([self._tensor(img) for img in images]))

    def _tensor(self, image: Image.Image | str | Path) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.preprocess(image if image.mode == "RGB" else image.convert("RGB"))
        path = Path(image)
        if not path.is_file():
            raise RetdmError(f"{path}: no such image file")
        try:
            return self.preprocess.load(path)
        except RetdmError:
            raise
        except Exception as exc:  # PIL's errors for a file that is not an image
            raise RetdmError(f"{path}: not a readable image ({exc})") from None

    def metadata(self) -> dict[str, Any]:
        """Everything a consumer of an exported model needs besides the weights."""
        return {
            "format": "retdmctl-image-classifier/1",
            "labels": list(self.class_names),
            "thresholds": [float(t) for t in self.thresholds],
            "threshold_source": self.threshold_source,
            **self.preprocess.to_dict(),
            "outputs": {
                "logits": "(N, L) W_c f",
                "probabilities": "(N, L) sigmoid(logits)" if self.vote is None else
                "(N, L) (1 - w) sigmoid(logits) + w sum_j softmax_j(cos(f, b_j) / temp) y_j over the k nearest "
                "training images b_j (their embeddings and labels are constants of the model)",
            },
            "fusion": None if self.vote is None else self.vote.describe(),
            "backbone": self.backbone,
            "frozen_backbone": self.frozen_backbone,
            "stage": self.stage,
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": _sha256(self.checkpoint),
            "version": __version__,
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(path: Path | str, stage: str | None = None) -> tuple[Path, str]:
    """A workdir (plus an optional stage) or a checkpoint file -> (checkpoint file, stage).

    In a workdir without ``stage``, the joint model is used when it exists, else the
    classifier."""
    path = Path(path)
    if path.is_file():
        return path, stage or path.parent.name
    if not path.is_dir():
        raise RetdmError(f"{path} is neither a workdir nor a checkpoint file")
    if stage is not None:
        if stage not in STAGES:
            raise RetdmError(f"--checkpoint must be classifier or joint (or a checkpoint file), got {stage!r}")
        ckpt = path / stage / "checkpoint.pt"
        if not ckpt.is_file():
            raise RetdmError(f"no {stage} checkpoint in {path}: run retdmctl train --stage {stage} first")
        return ckpt, stage
    for name in STAGES:
        if (path / name / "checkpoint.pt").is_file():
            return path / name / "checkpoint.pt", name
    raise RetdmError(f"no trained model in {path}: run retdmctl train --stage classifier (or retdmctl run) first")


def load_predictor(workdir_or_checkpoint: Path | str, stage: str | None = None, device: str = "auto",
                   fusion: bool = True) -> Predictor:
    """The classification network of a checkpoint, in eval mode, ready to predict.

    ``stage`` None picks joint if present, else classifier. A frozen-backbone checkpoint
    holds only the heads: the backbone is rebuilt from its packaged pretrained weights
    (or the ``model.weights_file`` it was trained with), which is what produced the
    cached features the heads were trained on. Both parts are loaded strictly.
    ``fusion`` applies the checkpoint's neighbour vote, with the thresholds chosen for it.
    """
    path, stage = resolve_checkpoint(workdir_or_checkpoint, stage)
    ckpt = read_image_checkpoint(path)
    class_names = [str(c) for c in ckpt["class_names"]]
    model_cfg = checkpoint_model_config(ckpt)
    net, spec, frozen = image_model(ckpt, path)
    rule = decision_rule(ckpt, str(path), num_classes=len(class_names), embed_dim=int(model_cfg["embed_dim"]),
                         apply_vote=fusion, check_vote=True)
    thresholds, source = rule.per_class(len(class_names), str(path))
    vote = rule.vote

    dev = pick_device(device)
    classifier = ImageClassifier(net, vote).to(dev).eval()
    return Predictor(
        classifier=classifier,
        class_names=class_names,
        thresholds=thresholds,
        threshold_source=source,
        preprocess=Preprocess.for_model(int(model_cfg["image_size"]), spec.mean, spec.std),
        device=dev,
        checkpoint=path.resolve(),
        stage=stage,
        backbone=spec.name,
        frozen_backbone=frozen,
    )
