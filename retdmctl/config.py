"""Typed configuration: one dataclass per section of ``retdm.toml``.

Resolution order (later wins): dataclass defaults < the workspace's ``retdm.toml`` <
a ``--config FILE`` < command-line flags. The resolved config is written back to the
workspace's ``retdm.toml`` (as DVC's params.yaml), so a later ``retdmctl run`` uses the
same values, and each stage's manifest records the sections it read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from retdmctl.errors import ConfigError


@dataclass
class IngestConfig:
    source: str = ""  # demo | scene | csv | coco | voc | mirflickr | nuswide
    path: str = ""  # the dataset's root folder or label file
    images: str = ""  # image folder, for sources whose labels live apart from images
    classes: str = ""  # csv: the allowed labels, comma-separated ("" = every label found)
    seed: int = 0  # fixes the random splits
    test_fraction: float = 0.2  # for sources without an official test split
    val_fraction: float = 0.1  # carved from train
    short_side: int = 256  # images are re-encoded so that the shorter side is at most this
    keep_original: bool = False  # store the original bytes instead of re-encoding
    jpeg_quality: int = 90
    workers: int = 0  # decode/encode processes; 0 = one per CPU core
    strict: bool = False  # a bad image or label is an error instead of a skip
    demo_images: int = 2000
    demo_classes: int = 10
    # Lists below are "|"-joined strings (path and images hold "|"-joined lists for coco).
    keep_empty: bool = False  # coco, voc, mirflickr, nuswide: keep images without any label
    coco_splits: str = ""  # one of train|test per annotation file; "" = from the file names
    voc_years: str = ""  # e.g. "2007|2012"; "" = every VOC20XX folder found
    voc_difficult: str = "positive"  # positive: a difficult object counts; ignore: it does not


@dataclass
class KnnConfig:
    k: int = 10  # neighbours per distinct training label set
    index: str = "auto"  # exact | ivf | hnsw | auto (exact below 50,000 distinct label sets, ivf beyond)


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_file: str = ""
    frozen_backbone: bool = False  # train every stage from cached backbone features
    image_size: int = 224
    embed_dim: int = 512
    dropout: float = 0.2
    batch_size: int = 64
    # The backbone's learning rate relative to the heads' when fine-tuning: pretrained
    # layers want smaller steps than the new heads (see README, "Measured results").
    backbone_lr_mult: float = 0.1


@dataclass
class RuntimeConfig:
    """Where and how fast to run; never part of a stage's fingerprint."""

    device: str = "auto"  # auto | cpu | cuda
    workers: int = 2  # data-loader processes


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of the two-way metric loss
    beta: float = 1.0  # weight of the reconstruction loss
    lam: float = 1.0  # weight of way 2 (labels to images); 0 = the one-way ablation
    margin: float = 0.0  # hinge margin m


@dataclass
class TrainConfig:
    """The optimisation schedule of a training stage: SGD with momentum and weight decay,
    lr divided by 10 after ``patience`` epochs without a better validation loss."""

    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    patience: int = 3
    seed: int = 0


@dataclass
class ClassifierConfig(TrainConfig):
    lr: float = 0.1  # the paper's; the backbone gets model.backbone_lr_mult of it


@dataclass
class MetricConfig(TrainConfig):
    batch_size: int = 256  # label-net batches are cheap: no CNN runs in this stage


@dataclass
class JointConfig(TrainConfig):
    epochs: int = 10
    lr: float = 0.001
    # where way 2 takes f_{i_j} from: "bank" = a feature bank initialised from
    # features.h5 and refreshed by each batch; "forward" = a fresh forward pass
    # (frozen-backbone mode only, where it costs one linear layer).
    way2: str = "bank"


@dataclass
class EvalConfig:
    checkpoint: str = "joint"  # which stage's model to evaluate: classifier | joint
    split: str = "test"
    threshold: float = 0.5
    report: str = "html"  # html | none


@dataclass
class Config:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def sections(self, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return {n: dataclasses.asdict(getattr(self, n)) for n in names}


def config_hash(sections: dict[str, dict[str, Any]]) -> str:
    """A short hash of the values that differ from the defaults.

    Leaving defaults out means that a later version that adds an option (at a default
    that keeps the old behaviour) does not invalidate every finished stage. A changed
    default cannot slip through either: ``retdm.toml`` records every value explicitly.
    """
    defaults = Config().to_dict()
    changed = {
        name: {k: v for k, v in entries.items() if defaults.get(name, {}).get(k, object()) != v}
        for name, entries in sections.items()
    }
    blob = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _coerce(section: str, key: str, value: Any, typ: type) -> Any:
    where = f"{section}.{key}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    return str(value)


def apply(cfg: Config, values: dict[str, dict[str, Any]], origin: str) -> None:
    """Overlay ``{section: {key: value}}`` onto ``cfg``; unknown names are errors."""
    known = {f.name for f in fields(Config)}
    for section, entries in values.items():
        if section not in known:
            raise ConfigError(f"{origin}: unknown section [{section}]; known: {', '.join(sorted(known))}")
        if not isinstance(entries, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        for key, value in entries.items():
            if key not in hints:
                raise ConfigError(
                    f"{origin}: unknown option {section}.{key}; known: {', '.join(sorted(hints))}"
                )
            if value is None:
                continue
            setattr(obj, key, _coerce(section, key, value, hints[key]))


def load_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["knn.k=5", "loss.alpha=0.5"]`` -> ``{"knn": {"k": "5"}, "loss": {"alpha": "0.5"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. knn.k=5")
        out.setdefault(section, {})[key] = value.strip()
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def dump_toml(cfg: Config) -> str:
    lines = ["# retdmctl resolved configuration: edit it, or override with flags.", ""]
    for section, entries in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in entries.items()]
        lines.append("")
    return "\n".join(lines)
