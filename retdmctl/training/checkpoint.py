"""The checkpoint dict a training stage saves (``<stage>/checkpoint.pt``): one builder,
so the classifier, metric and joint stages write the same keys in the same order.

Every stage's checkpoint holds ``stage``, ``model`` (the weights), ``config`` (the stage's
config sections) and ``class_names``. One that holds an image model (classifier, joint)
adds what rebuilds it: ``backbone``, ``feature_dim``, ``frozen_backbone``, ``tune_blocks``,
any stage-specific keys, then the decision rule chosen on validation (the neighbour vote
and the thresholds, ``retdmctl.training.decision.choose_decision``).
``finish_training`` adds ``history`` and ``world_size`` when it writes the file.
"""

from __future__ import annotations

from typing import Any

import torch


def stage_checkpoint(stage: str, weights: dict[str, torch.Tensor], config: dict, class_names: list[str]) -> dict[str, Any]:
    """The keys every stage's checkpoint starts with."""
    return {"stage": stage, "model": weights, "config": config, "class_names": class_names}


def image_model_checkpoint(
    stage: str,
    model: torch.nn.Module,
    spec,
    cfg,
    config: dict,
    class_names: list[str],
    decision: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint of a stage that trained the image model (``RETDM`` with its
    backbone or on cached backbone features). ``spec`` is the backbone's spec, ``cfg`` the
    run's config (its ``model`` section), ``config`` the stage's sections as saved;
    ``extra`` keys (the joint stage's ``backbone_from``) come before the ``decision``."""
    # a tuned model: all its weights; a frozen one: the heads (the backbone is pretrained)
    weights = model.state_dict() if model.backbone is not None else model.heads_state()
    return {
        **stage_checkpoint(stage, weights, config, class_names),
        "backbone": spec.name,
        "feature_dim": spec.out_dim,
        "frozen_backbone": cfg.model.frozen_backbone,
        "tune_blocks": cfg.model.tune_blocks,
        **extra,
        **decision,
    }
