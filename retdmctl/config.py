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


# --- allowed values -------------------------------------------------------------------
# Each option with a fixed set of values declares them here, once: validation, the CLI's
# choices (``retdmctl.cli_support.choice_enum``) and the stages' checks derive from it.
SPLITS = ("train", "val", "test")  # a dataset's splits
TRAINED_STAGES = ("classifier", "metric", "joint")  # the stages that train a model
CLASSIFYING_STAGES = ("classifier", "joint")  # those whose model classifies images

CHOICES: dict[str, tuple[str, ...]] = {
    "ingest.voc_difficult": ("positive", "ignore"),
    "knn.index": ("auto", "exact", "ivf", "hnsw"),
    "joint.way2": ("bank", "forward"),
    "loss.base": ("bce", "asl", "llr"),
    "loss.metric_on": ("clean", "dropout"),
    "labels.protocol": ("full", "keep", "single", "hide"),
    "labels.unknown": ("negative", "ignore"),
    "labels.val_protocol": ("same", "full"),
    "eval.thresholds": ("per_class", "global", "fixed"),
    "eval.checkpoint": CLASSIFYING_STAGES,
    "eval.split": SPLITS,
    "eval.report": ("html", "none"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "runtime.decode": ("auto", "cpu", "device"),
    **{f"{stage}.select": ("best", "last") for stage in TRAINED_STAGES},
}


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
    demo_labels: str = "2-3"  # labels per demo image: "K" or "MIN-MAX" (MAX <= 9 and <= demo_classes)
    # Lists below are "|"-joined strings (path and images hold "|"-joined lists for coco).
    keep_empty: bool = False  # coco, voc, mirflickr, nuswide: keep images without any label
    coco_splits: str = ""  # one of train|test per annotation file; "" = from the file names
    voc_years: str = ""  # e.g. "2007|2012"; "" = every VOC20XX folder found
    voc_difficult: str = "positive"  # positive: a difficult object counts; ignore: it does not


@dataclass
class KnnConfig:
    k: int = 10  # neighbours per distinct training label set
    index: str = "auto"  # exact | ivf | hnsw | auto (exact below 50,000 distinct label sets, ivf beyond)


# What model.tune_blocks = -1 and model.views = 0 (auto) become with frozen_backbone: the
# best variant of the CPU bench on the scene set (docs/bench-scene-views.md, seeds 0-4,
# chosen on validation mAP): the last block and the head convolution trained on ten
# cached views of each image.
FROZEN_TUNE_BLOCKS = 1
FROZEN_VIEWS = 10


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_file: str = ""
    frozen_backbone: bool = False  # train every stage from cached backbone features
    # With frozen_backbone: the middle way between frozen and fine-tuned. The last
    # tune_blocks blocks of the backbone (and its head convolution) are trained, on
    # activations of the rest cached once; 0 = nothing of the backbone trained.
    # -1 = auto: FROZEN_TUNE_BLOCKS with frozen_backbone (where the backbone has blocks
    # to tune), 0 when fine-tuning.
    tune_blocks: int = -1
    # With frozen_backbone: how many views of each image are cached (1 = the centre crop;
    # up to 10 = the paper's five crops, each also flipped); a training image takes one
    # of its views at random each epoch, evaluation the centre crop.
    # 0 = auto: FROZEN_VIEWS with frozen_backbone, 1 when fine-tuning.
    views: int = 0
    image_size: int = 224
    embed_dim: int = 512
    dropout: float = 0.2
    batch_size: int = 64
    # The backbone's learning rate relative to the heads' when fine-tuning: pretrained
    # layers want smaller steps than the new heads (docs/results.md).
    backbone_lr_mult: float = 0.1


@dataclass
class RuntimeConfig:
    """Where and how fast to run; never part of a stage's fingerprint."""

    device: str = "auto"  # auto | cpu | cuda
    # data-loader processes; -1 = auto: none on the CPU, where worker processes only
    # compete with the model's threads for the cores (measured: end-to-end training at
    # 45% of the model-only rate with 2 workers on 2 cores, 99.8% with none;
    # bench/train_throughput.py), and one per spare core, at most 8, on a GPU
    workers: int = -1
    # where training and scoring from pixels decode and augment images: "cpu" (PIL, in
    # the loader), "device" (batched JPEG decode, crops and flips on the accelerator,
    # retdmctl.data.gpu), "auto" = device on CUDA, cpu otherwise. The frozen-backbone
    # cache is always extracted from the PIL path, so cached features never depend on it.
    decode: str = "auto"


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of the two-way metric loss
    beta: float = 1.0  # weight of the reconstruction loss
    lam: float = 1.0  # weight of way 2 (labels to images); 0 = the one-way ablation
    margin: float = 0.0  # hinge margin m
    base: str = "bce"  # the classification loss under every stage: bce | asl (Ridnik et al. 2021)
    # | llr (large-loss rejection, Kim et al. 2022: unknowns read as negatives, the
    # largest-loss ones rejected, 0.2 % more of a batch's entries each epoch)
    # which f the metric and reconstruction losses (and the joint stage's feature bank)
    # see: "clean" = the embedding before dropout, as the bank was initialised (eval mode);
    # "dropout" = the dropped-out embedding the classifier head sees
    metric_on: str = "clean"
    # CLML (docs/method.md): weight of the low-rank label-structure term on the
    # classifier's embedding, added in the classifier and joint stages; 0 = off. The
    # authors' 1.0 is far too strong for this head; 0.01-0.1 on scene
    # (docs/bench-missing-labels.md)
    clml: float = 0.0
    clml_tau: float = 0.75  # an unobserved entry with p > tau counts as positive for the term
    clml_start_epoch: int = 1  # that correction applies from this epoch (1-based) on
    clml_delta: float = 1.0  # floor of each label's nuclear norm
    # lazy regularisation: the term runs on every k-th training step, weighted k times
    # (the same expected gradient at 1/k of the cost; 1 = every step, as the paper)
    clml_every: int = 1
    # loss.base = llr: the rejection rate grows by this fraction of a batch's entries each
    # epoch (LL-R's delta_rel; 0.002 = its published 0.2 %, tuned for COCO's 2.9 of 80
    # labels: a denser label set hides more positives and may want more)
    llr_delta_rel: float = 0.002


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
    # Which epoch's weights the stage keeps: "best" on validation (mAP; the metric
    # stage: its loss) or the "last". stop_after > 0 stops after that many epochs
    # without a better validation score.
    select: str = "best"
    stop_after: int = 0
    # 0 = off; else the decay of an exponential moving average of the trained weights
    # (e.g. 0.99), updated after every step; validation, model selection and the kept
    # checkpoint use the averaged weights
    ema: float = 0.0


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
    # decision thresholds, chosen on the validation split when the model was trained:
    # per_class | global (one for all classes) | fixed (eval.threshold for every class)
    thresholds: str = "per_class"
    threshold: float = 0.5  # used when thresholds = "fixed"
    report: str = "html"  # html | none
    # fuse the classifier's scores with the vote of the image's nearest training images
    # in embedding space, as chosen on validation when the model was trained
    # (retdmctl.fusion; a model whose validation chose no vote scores the same either way)
    fusion: bool = True


@dataclass
class DecisionConfig:
    """How a classifying stage chooses its neighbour vote and thresholds once trained.

    ``folds`` >= 2: on out-of-fold scores. The training split is cut into ``folds``
    seeded folds; a copy of the stage (and of every stage it builds on) is trained
    without each fold, for the epochs the full run kept, and scores it. The choices are
    made on those scores and the full model's validation scores together: every training
    and validation image, each scored by a model that never trained on it (never the test
    split). 0 = on the validation split alone (the cheaper, noisier choice)."""

    folds: int = 5
    seed: int = 0  # which training images fall in which fold


@dataclass
class LabelsConfig:
    """Which training labels the models see (missing-label protocols; the test split
    always keeps its full labels, validation under ``val_protocol``)."""

    protocol: str = "full"  # full | keep (a fraction of each image's positives) | single | hide
    fraction: float = 1.0  # keep: fraction of positives kept; hide: fraction of entries hidden
    seed: int = 0  # which labels are hidden
    # how bce/asl read an unknown training label: "negative" (assume negative) or
    # "ignore" (masked out of the loss); llr always reads them as rejectable negatives
    unknown: str = "negative"
    # the labels everything chosen on validation reads (epoch, thresholds, vote): "same"
    # (the protocol hides validation labels too, its own draw from seed, hidden read as
    # negative: what a user with incomplete labels has) or "full" (every validation label)
    val_protocol: str = "same"


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
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def sections(self, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """The named sections' values; a name ``section.key`` takes that one option."""
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            section, _, key = name.partition(".")
            values = dataclasses.asdict(getattr(self, section))
            out.setdefault(section, {}).update({key: values[key]} if key else values)
        return out


def config_hash(sections: dict[str, dict[str, Any]]) -> str:
    """A short hash of every value of the given sections, defaults included: a default
    that changes between versions changes the hash too, so a stage never passes as up to
    date for values it did not run with."""
    blob = json.dumps(sections, sort_keys=True, separators=(",", ":"))
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


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML (written by tomli-w: any label or path round-trips)."""
    import tomli_w

    header = "# retdmctl resolved configuration: edit it, or override with flags.\n\n"
    return header + tomli_w.dumps(cfg.to_dict())


# --- validation ----------------------------------------------------------------------
# Every value is checked before a command runs or saves anything; the message names the
# option and the allowed range.
def _at_least(lo: float) -> Any:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


DEMO_MAX_LABELS = 9  # a demo image has 9 cells (3 x 3) for its shapes


def demo_label_range(value: str) -> tuple[int, int] | None:
    """``"K"`` -> (K, K), ``"MIN-MAX"`` -> (MIN, MAX); None unless
    1 <= MIN <= MAX <= DEMO_MAX_LABELS."""
    parts = str(value).strip().split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        return None
    lo, hi = int(parts[0]), int(parts[-1])
    return (lo, hi) if 1 <= lo <= hi <= DEMO_MAX_LABELS else None


def _open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _unit_right_open(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _one_of(*choices: str) -> Any:
    return lambda v: None if v in choices else "must be one of " + ", ".join(choices)


_RULES: dict[str, Any] = {
    "ingest.test_fraction": _unit_right_open,
    "ingest.val_fraction": _unit_right_open,
    "ingest.short_side": _at_least(0),
    "ingest.jpeg_quality": lambda v: None if 1 <= v <= 100 else "must be in [1, 100]",
    "ingest.workers": _at_least(0),
    "ingest.demo_images": _at_least(10),
    "ingest.demo_classes": lambda v: None if 2 <= v <= 20 else "must be in [2, 20]",
    "ingest.demo_labels": lambda v: None if demo_label_range(v) else (
        f"must be K or MIN-MAX with 1 <= MIN <= MAX <= {DEMO_MAX_LABELS} (e.g. 4-6)"),
    "ingest.voc_difficult": _one_of(*CHOICES["ingest.voc_difficult"]),
    "knn.k": _at_least(1),
    "knn.index": _one_of(*CHOICES["knn.index"]),
    "model.image_size": _at_least(1),
    "model.embed_dim": _at_least(1),
    "model.dropout": _unit_right_open,
    "model.batch_size": _at_least(1),
    "model.backbone_lr_mult": _at_least(0),
    "model.tune_blocks": lambda v: None if v >= -1 else "must be >= 0, or -1 for auto",
    "model.views": lambda v: None if 0 <= v <= 10 else "must be in [1, 10], or 0 for auto",
    "loss.alpha": _at_least(0),
    "loss.beta": _at_least(0),
    "loss.lam": _at_least(0),
    "loss.margin": _at_least(0),
    "metric.batch_size": _at_least(1),
    "joint.way2": _one_of(*CHOICES["joint.way2"]),
    "loss.base": _one_of(*CHOICES["loss.base"]),
    "loss.clml": _at_least(0),
    "loss.clml_tau": _open_unit,
    "loss.clml_start_epoch": _at_least(1),
    "loss.clml_delta": _at_least(0),
    "loss.clml_every": _at_least(1),
    "loss.llr_delta_rel": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "labels.protocol": _one_of(*CHOICES["labels.protocol"]),
    "labels.fraction": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "labels.unknown": _one_of(*CHOICES["labels.unknown"]),
    "labels.val_protocol": _one_of(*CHOICES["labels.val_protocol"]),
    "loss.metric_on": _one_of(*CHOICES["loss.metric_on"]),
    "eval.thresholds": _one_of(*CHOICES["eval.thresholds"]),
    "eval.checkpoint": _one_of(*CHOICES["eval.checkpoint"]),
    "eval.split": _one_of(*CHOICES["eval.split"]),
    "eval.threshold": _open_unit,
    "eval.report": _one_of(*CHOICES["eval.report"]),
    "decision.folds": lambda v: None if v == 0 or 2 <= v <= 20 else "must be 0 (validation only) or in [2, 20]",
    "runtime.device": _one_of(*CHOICES["runtime.device"]),
    "runtime.workers": _at_least(-1),
    "runtime.decode": _one_of(*CHOICES["runtime.decode"]),
}
for _stage in TRAINED_STAGES:
    _RULES.update(
        {
            f"{_stage}.select": _one_of(*CHOICES[f"{_stage}.select"]),
            f"{_stage}.stop_after": _at_least(0),
            f"{_stage}.epochs": _at_least(1),
            f"{_stage}.lr": _positive,
            f"{_stage}.momentum": _unit_right_open,
            f"{_stage}.weight_decay": _at_least(0),
            f"{_stage}.patience": _at_least(0),
            f"{_stage}.ema": _unit_right_open,
        }
    )


def check(cfg: Config, *names: str) -> str | None:
    """The message for the first of the named options (``section.key``) outside its
    allowed range or choices, or None: what :func:`validate` raises, and what a stage run
    from the library with a config that never went through it refuses to run with."""
    for name in names:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if problem := _RULES[name](value):
            return f"{name} {problem}, got {value!r}"
    return None


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value outside its allowed range or choices; then
    make the automatic values concrete (:func:`resolve_auto`)."""
    from retdmctl.models.backbones import get_backbone_spec

    if (problem := check(cfg, *_RULES)) is not None:
        raise ConfigError(problem)
    lab = cfg.labels
    if lab.protocol in ("keep", "single") and lab.unknown == "ignore" and cfg.loss.base != "llr":
        raise ConfigError(f"labels.unknown = ignore with labels.protocol = {lab.protocol} trains on positives only: "
                          "every entry not kept is unknown, true negatives included; use labels.unknown = negative "
                          "or loss.base = llr")
    spec = get_backbone_spec(cfg.model.backbone)  # BackboneError names the known ones
    m = cfg.model
    if (m.tune_blocks > 0 or m.views > 1) and not m.frozen_backbone:
        which = "model.tune_blocks" if m.tune_blocks > 0 else "model.views"
        raise ConfigError(f"{which} applies to --frozen-backbone (cached inputs); fine-tuning "
                          "trains the whole backbone on freshly augmented images")
    if m.tune_blocks > spec.tunable_blocks:
        raise ConfigError(f"model.tune_blocks must be <= {spec.tunable_blocks} for {m.backbone}, got {m.tune_blocks}"
                          if spec.tunable_blocks else f"model.tune_blocks: {m.backbone} has no blocks to tune, got {m.tune_blocks}")
    resolve_auto(cfg, spec.tunable_blocks)


def resolve_auto(cfg: Config, tunable_blocks: int) -> None:
    """model.tune_blocks = -1 and model.views = 0 (auto) made concrete, in place: with
    frozen_backbone FROZEN_TUNE_BLOCKS (at most what the backbone has) and, when blocks
    are tuned, FROZEN_VIEWS; else 0 and 1. Stages, manifests and checkpoints see the
    concrete values; retdm.toml keeps the config as asked for, auto included (so a later
    --finetune-backbone is not refused for values it never asked for): the CLI keeps
    that config apart (:func:`retdmctl.cli_support.run_stages`)."""
    m = cfg.model
    if m.tune_blocks >= 0 and m.views >= 1:
        return
    if m.tune_blocks < 0:
        m.tune_blocks = min(FROZEN_TUNE_BLOCKS, tunable_blocks) if m.frozen_backbone else 0
    if m.views < 1:  # the views go with the tuning: without it the bench never tried them
        m.views = FROZEN_VIEWS if m.frozen_backbone and m.tune_blocks > 0 else 1


def concrete(cfg: Config) -> Config:
    """``cfg`` with its automatic values made concrete (idempotent): for code that is
    handed a Config that never went through :func:`validate`."""
    from retdmctl.models.backbones import get_backbone_spec

    resolve_auto(cfg, get_backbone_spec(cfg.model.backbone).tunable_blocks)
    return cfg
