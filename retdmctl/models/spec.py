"""What a caller needs to know about a backbone without building it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """What a caller needs to know about a backbone without building it."""

    name: str
    out_dim: int  # size of the pooled feature vector forward() returns
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_size: int  # default input side in px
    pretrained_source: str  # one line for help text
    tunable_blocks: int = 0  # blocks model.tune_blocks may train on cached activations
