"""Reading a local weights file (a ``state_dict``, or ``.safetensors``) and loading it strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from retdmctl.errors import BackboneError


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: ``torch.load(weights_only=True)``, or safetensors by suffix."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects, ...: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(f"weights file {path} cannot be read as a state_dict: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} is not a state_dict of tensors")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str,
                dropped_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` (less the keys of a removed classifier) into ``model`` with every key
    and shape matching; a one-line :class:`BackboneError` naming what does not fit otherwise."""
    state = {k: v for k, v in state.items() if not k.startswith(dropped_prefixes)}
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        problems = [f"{len(keys)} {what} (e.g. {keys[0]})"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatches", mismatched)) if keys]
        raise BackboneError(f"weights file {path} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
