"""Device choice, autocast, seeding, and the checkpoint dict (nanoGPT style: one dict
holds everything needed to resume)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retdmctl import __version__
from retdmctl.config import CHOICES
from retdmctl.errors import CheckpointError, ConfigError
from retdmctl.workspace import atomic_path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is 'cuda' but no CUDA device is available")
    if name not in CHOICES["runtime.device"]:
        raise ConfigError(f"runtime.device must be one of {', '.join(CHOICES['runtime.device'])}, got {name!r}")
    return torch.device(name)


def decode_threads(device: torch.device) -> int:
    """Threads that decode a batch of images between the model's batches on the CPU (as
    many as the model uses); 0 with a device, where one thread decodes beside it
    (:func:`retdmctl.sources.decoding`)."""
    return torch.get_num_threads() if device.type == "cpu" else 0


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision(device: torch.device) -> str:
    """The dtype :func:`autocast` computes in on ``device``: part of every backbone cache
    key, as features made in bfloat16 are not the float32 ones."""
    return "bfloat16" if device.type == "cuda" else "float32"


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch; image batches go channels-last, the fast layout for convolutions."""
    if x.dim() == 4:
        return x.to(device, memory_format=torch.channels_last, non_blocking=True)
    return x.to(device, non_blocking=True)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return model.to(device, memory_format=torch.channels_last)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """A generator fixed by (seed, epoch): a resumed run draws what the whole run would."""
    return np.random.default_rng([seed, epoch, stream])


def save_checkpoint(path: Path, state: dict[str, Any], *, defer: bool = True) -> None:
    """Write one checkpoint dict atomically (with the stage's other outputs, unless
    ``defer`` is False: a resume point must survive a kill at once)."""
    state = {**state, "version": __version__, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path, defer=defer) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict (tensors and plain data only: ``weights_only=True``).
    CheckpointError, one line, for a file that is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, corrupt, or holding pickled objects
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a readable checkpoint (a {type(state).__name__}, not a dict)")
    return state


def derive_seed(seed: int, *stream: int | str) -> int:
    """A seed for one consumer (initialisation, an epoch's dropout, ...), independent of
    what other consumers drew before: results never depend on what was cached."""
    words = [seed] + [int.from_bytes(s.encode(), "little") % 2**32 if isinstance(s, str) else s for s in stream]
    return int(np.random.default_rng(words).integers(2**63))


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def set_threads(cnn: bool = True) -> None:
    """Intra-op threads, unless the user set OMP_NUM_THREADS: every core when a CNN runs;
    one for training heads on cached features, whose many tiny ops only wait for each
    other at OpenMP barriers on more threads (measured: a metric-stage epoch ran 4x
    slower on 2 threads than on 1 on a busy 2-core machine; bench/train_throughput.py)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads((os.cpu_count() or 1) if cnn else 1)
