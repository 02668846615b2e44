"""Many processes under torchrun: the process group and the few collectives retdmctl uses.

``torchrun --nproc_per_node N -m retdmctl ...`` starts N copies of the command with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set. :func:`setup` joins them into one process
group (NCCL for CUDA tensors, gloo for CPU tensors and for Python objects); without
torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised and every helper here is the
identity, so a single process behaves exactly as before.

The rules the rest of the code follows:

* rank 0 decides (is a stage up to date? resume or start over?) and writes (artifacts,
  manifests, resume points, retdm.toml, the workspace lock); :func:`on_main` runs such a
  step on rank 0 and hands its result, or its error, to every rank;
* every rank trains on its shard of each global batch (``retdmctl.training.parallel``)
  and scores its shard of a split; the scores are gathered, so every rank sees the same
  metrics and makes the same decisions.

Collectives time out after ``RETDM_DIST_TIMEOUT`` seconds (default 1800): a rank whose
peer died does not wait forever (torchrun also stops the other ranks when one fails).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from retdmctl.errors import RetdmError

T = TypeVar("T")

_alone = 0  # > 0 while rank 0 runs a step for everyone (on_main): no collectives inside
_objects = None  # the gloo group for Python objects (the default group, unless it is NCCL)


class PeerError(RetdmError):
    """Rank 0 failed a step run for every rank; it prints the error, the others only exit 1."""


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup() -> None:
    """Join the process group when torchrun started several processes (else nothing)."""
    global _objects
    if not launched() or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get("RETDM_DIST_TIMEOUT", "1800")))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RetdmError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs: "
                             "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
        _objects = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        _objects = None
    from retdmctl import atomic

    atomic.set_writer(is_main())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True where work is shared between processes (not inside an :func:`on_main` step)."""
    return world_size() > 1 and not _alone


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside: this process works as if it were the only one (no collectives)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def barrier() -> None:
    if active():
        dist.barrier(group=_objects)


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_objects)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only (alone) and return its result on every rank. A
    RetdmError there is raised on rank 0 and becomes a (silent) PeerError elsewhere, so
    that every rank exits 1 and one line is printed; any other failure on rank 0 ends
    the other ranks the same way while rank 0 keeps its traceback."""
    if not active():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if is_main():
        try:
            with alone():
                outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - handed on, then re-raised below
            error = exc
            outcome = ("error", str(exc) if isinstance(exc, RetdmError) else f"rank 0 failed ({type(exc).__name__})")
    kind, value = broadcast(outcome)
    if error is not None:
        raise error
    if kind == "error":
        raise PeerError(value)
    return value


def single_process(command: str) -> None:
    """Refuse a command that has no multi-process form (one line, from rank 0 only)."""
    if launched():
        message = f"`retdmctl {command}` runs in one process: start it without torchrun"
        raise RetdmError(message) if is_main() else PeerError(message)


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of ``rows`` (all of them in one process)."""
    if not active():
        return rows
    return np.array_split(rows, world_size())[rank()]


def gather_rows(part: np.ndarray) -> np.ndarray:
    """The ranks' ``part`` arrays concatenated in rank order (the inverse of
    :func:`shard`), on every rank. For arrays that are small per row (scores,
    embeddings); a backbone cache goes through part files instead
    (:func:`retdmctl.inputs.ensure_backbone_cache`)."""
    if not active():
        return part
    parts = [None] * world_size()
    dist.all_gather_object(parts, part, group=_objects)
    return _concat(parts)


def _concat(parts: list) -> np.ndarray:
    """Concatenated, ignoring the empty parts of ranks that had no rows."""
    return np.concatenate([p for p in parts if len(p)] or parts[:1])


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the ranks (the same keys on every rank)."""
    if not active():
        return values
    parts: list[dict[str, float] | None] = [None] * world_size()
    dist.all_gather_object(parts, values, group=_objects)
    return {key: float(sum(p[key] for p in parts)) for key in values}


def all_gather_padded(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (its first dimension may differ by rank) concatenated in rank
    order, on ``t``'s device: for tensors gathered on each training step."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_list = [int(s) for s in sizes]
    width = max(sizes_list)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes_list]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_list)])
