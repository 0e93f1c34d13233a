"""torch.distributed glue: every long command runs unchanged under ``torchrun``.

The launcher is torchrun (or ``srun ... torchrun`` on Slurm); this module only reads its environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), starts the process group (NCCL on
GPUs, gloo on CPUs) with a bounded timeout so a dead rank makes the job fail instead of hang, and offers the few
collectives the commands need: gather of picklable per-image records and a barrier. Without torchrun (or with
``WORLD_SIZE=1``) everything degrades to a single process with no process group.

>>> ctx = DistContext.single()
>>> ctx.rank, ctx.world_size, ctx.is_main
(0, 1, True)
>>> ctx.all_gather_object({"a": 1})
[{'a': 1}]
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch

from .errors import BackendUnavailableError, ConfigError

__all__ = ["DistContext", "init_distributed", "current", "shard_ids"]

_CURRENT: "DistContext | None" = None


@dataclasses.dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 1800.0

    @classmethod
    def single(cls) -> "DistContext":
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | torch.device | None = None) -> torch.device:
        """The device of this rank: ``cuda:<local_rank>`` when CUDA is requested (or auto) and present."""
        if requested is None or str(requested) == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return dev

    # ------------------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather one picklable object from every rank (list indexed by rank, identical on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place, returned for convenience)."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def shutdown(self) -> None:
        global _CURRENT
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _CURRENT = None


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Start the process group when launched by torchrun with ``WORLD_SIZE > 1`` (idempotent).

    Args:
        backend: ``'nccl'``, ``'gloo'`` or ``None`` (NCCL when CUDA is present, else gloo).
        timeout_s: collective timeout; a rank that dies makes the others fail after at most this long
            (default: env ``BGSYNTH_DIST_TIMEOUT`` or 1800 s).
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if timeout_s is None:
        timeout_s = float(os.environ.get("BGSYNTH_DIST_TIMEOUT", "1800"))
    if world <= 1:
        _CURRENT = DistContext(timeout_s=timeout_s)
        return _CURRENT
    if not torch.distributed.is_available():
        raise BackendUnavailableError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"init_distributed: expected backend 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
        )
    _CURRENT = DistContext(rank, world, local_rank, backend, timeout_s)
    return _CURRENT


def current() -> DistContext:
    """The context of this process (a single-process context when :func:`init_distributed` was not called)."""
    return _CURRENT if _CURRENT is not None else DistContext.single()


def shard_ids(ids, shard_id: int, num_shards: int) -> list[int]:
    """The image ids of one shard: the sorted ids, every ``num_shards``-th from ``shard_id``.

    The one sharding rule of bgsynth (decode loaders, prepare, challenge): it depends only on the ids, so any
    number of ranks covers every image exactly once.
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"shard_ids: expected 0 <= shard_id < num_shards, got {shard_id}/{num_shards}")
    return sorted(int(i) for i in ids)[shard_id::num_shards]
