"""The weight EMA (``<stage>.ema`` > 0): a float32 moving average of the trained
parameters, updated after every optimizer step. :func:`retdmctl.training.loop.fit`
validates, selects and keeps the averaged weights, trains on from the live ones, and
saves both in ``resume.pt`` (the average under ``"ema"``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from retdmctl.errors import CheckpointError


class WeightEMA:
    """An exponential moving average of the trained parameters: a float32 shadow of
    each, ``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.
    Buffers (BatchNorm's running statistics) are not averaged: the averaged weights run
    with the model's own. The shadow is keyed by parameter name (``resume.pt``)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], decay: float) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = list(params)
        self.names = [names.get(id(p), f"param.{i}") for i, p in enumerate(self.params)]
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the live ones back after it."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, live):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().to("cpu", copy=True) for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise CheckpointError("resume.pt: its weight average does not match the parameters trained")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state[n])
