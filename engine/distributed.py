"""torch.distributed glue: every long command runs unchanged under ``torchrun``.

The launcher is torchrun (or ``srun ... torchrun`` on Slurm); this module only reads its environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), starts the
process group (NCCL on GPUs, gloo on CPUs) with a bounded timeout so a dead or stuck rank makes the job fail
instead of hang, and offers the few collectives the commands need: gather of picklable per-image records, gather
of variable-length tensors (background pools), reductions and a barrier. Without torchrun (or with
``WORLD_SIZE=1``) everything degrades to a single process with no process group, and every collective is the
identity.

How the commands use it (each through its public API, see ``docs/cluster.md``):

* ``eval``: each rank evaluates ``shard_ids(ids, rank, world)``; the Only-BG-T pool of the whole split is
  gathered from the ranks' shards (:func:`gather_background_pool`), the per-image records are gathered and
  merged, so every metric equals a single-process run's.
* ``challenge``: each rank searches its shard of the foregrounds with its own checkpoint; results are gathered
  and merged.
* ``prepare``: each rank runs GrabCut on its shard with its own journal; rank 0 assembles the one index.
* ``train``: DistributedDataParallel over the ranks' shards; rank 0 saves the checkpoint.

Failures: torchrun tears the whole group down when a rank exits (``--max-restarts 0``, its default), and every
collective here raises :class:`DistributedError` (a :class:`~bgsynth.errors.BgsynthError`, so the CLI exits
non-zero with a one-line message) when a peer died or did not answer within ``BGSYNTH_DIST_TIMEOUT`` seconds.

>>> ctx = DistContext.single()
>>> ctx.rank, ctx.world_size, ctx.is_main
(0, 1, True)
>>> ctx.all_gather_object({"a": 1})
[{'a': 1}]
>>> ctx.shard([5, 3, 9, 1])
[1, 3, 5, 9]
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import math
import os
from typing import Any, Iterator, Sequence

import torch

from .config import available_cores, resolve_device
from .errors import BackendUnavailableError, BgsynthError, ConfigError

__all__ = [
    "DistContext",
    "DistributedError",
    "init_distributed",
    "current",
    "shard_ids",
]

_CURRENT: "DistContext | None" = None
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(BgsynthError, RuntimeError):
    """A collective failed: a peer rank died, was killed, or did not answer within the timeout."""


@dataclasses.dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job, and the collectives it may call.

    Every collective must be called by every rank, in the same order (torch.distributed's rule); on a single
    process each one returns its input.

    Attributes:
        rank, world_size: this process and the number of processes of the job.
        local_rank, local_world_size: the same on this node (GPU index; CPU share).
        backend: ``'nccl'``, ``'gloo'`` or ``None`` (no process group).
        timeout_s: collective timeout in seconds.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    local_world_size: int = 1

    @classmethod
    def single(cls) -> "DistContext":
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def device(self, requested: str | torch.device | None = None) -> torch.device:
        """The device of this rank: ``cuda:<local_rank>`` when CUDA is requested (or auto) and present."""
        return resolve_device(requested, self.local_rank)

    @property
    def collective_device(self) -> torch.device:
        """Where tensors must live for a collective: this rank's GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def cpu_share(self) -> int:
        """CPU cores this rank may use: the cores of the node divided by the ranks on it (at least 1)."""
        return max(1, available_cores() // max(1, self.local_world_size))

    def shard(self, ids: Sequence[int]) -> list[int]:
        """This rank's share of ``ids`` by the one sharding rule (:func:`shard_ids`)."""
        return shard_ids(ids, self.rank, self.world_size)

    # ------------------------------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:  # DistBackendError, DistStoreError, gloo/NCCL timeouts: all RuntimeErrors
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {op} failed; another rank died, was killed or did not reach "
                f"this point within the timeout of {self.timeout_s:g} s (BGSYNTH_DIST_TIMEOUT); see the other "
                f"ranks' output for the first error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            with self._guard("barrier"):
                if self.backend == "nccl":
                    torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
                else:
                    torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather one picklable object from every rank (list indexed by rank, identical on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._guard("all_gather_object"):
            torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        with self._guard("broadcast_object"):
            torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor over ranks (``'sum'``, ``'min'`` or ``'max'``); returns the reduced tensor on the
        input's device (the input itself is reduced in place when it lives on the collective device)."""
        ops = {"sum": "SUM", "min": "MIN", "max": "MAX"}
        if op not in ops:
            raise ConfigError(f"all_reduce: expected op in {tuple(ops)}, got {op!r}")
        if not self.enabled:
            return t
        work = t if t.device == self.collective_device else t.to(self.collective_device)
        with self._guard(f"all_reduce({op})"):
            torch.distributed.all_reduce(work, op=getattr(torch.distributed.ReduceOp, ops[op]))
        if work is not t:
            t.copy_(work.to(t.device))
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place, returned for convenience)."""
        return self.all_reduce(t, "sum")

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (for decisions that every rank must take alike)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.collective_device)
        return bool(self.all_reduce(t, "min").item())

    def all_gather_tensors(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose first dimension may differ between ranks (the other dimensions and the dtype
        must agree). Returns the list indexed by rank, on the input's device.

        Shape:
            - t: ``[n_r, *S]`` on rank ``r``; output: ``[[n_0, *S], ..., [n_{W-1}, *S]]``
        """
        if not self.enabled:
            return [t]
        if t.ndim == 0:
            raise ConfigError("all_gather_tensors: expected a tensor with a first dimension, got a scalar")
        dev = self.collective_device
        rest = tuple(t.shape[1:])
        width = math.prod(rest) * t.element_size()
        # as raw bytes: every dtype travels (gloo has no int16/bool/bfloat16 collectives), rows stay rows
        work = t.detach().contiguous().to(dev).reshape(t.shape[0], math.prod(rest)).view(torch.uint8)
        n = torch.tensor([t.shape[0], width], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        with self._guard("all_gather (sizes)"):
            torch.distributed.all_gather(sizes, n)
        counts = [int(s[0].item()) for s in sizes]
        if len({int(s[1].item()) for s in sizes}) != 1:
            raise ConfigError(f"all_gather_tensors: the ranks' rows differ in shape or dtype (this rank: {rest}, {t.dtype})")
        m = max(counts)
        if m == 0:
            return [t.new_empty((0, *rest)) for _ in counts]
        if work.shape[0] < m:  # all_gather needs equal shapes: pad to the longest, cut after
            work = torch.cat([work, work.new_zeros((m - work.shape[0], width))])
        out = [torch.empty_like(work) for _ in range(self.world_size)]
        with self._guard("all_gather (tensors)"):
            torch.distributed.all_gather(out, work)
        return [o[:c].contiguous().view(t.dtype).reshape(c, *rest).to(t.device) for o, c in zip(out, counts)]

    @contextlib.contextmanager
    def main_first(self, local: bool = True) -> Iterator[None]:
        """Run the body on the main rank first (``local``: the first rank of each node), then on the others.

        For work every rank needs but only one should do, e.g. building a dataset into a shared cache: the
        others then find it done.
        """
        first = self.is_local_main if local else self.is_main
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()

    def shutdown(self) -> None:
        """Destroy the process group (idempotent)."""
        global _CURRENT
        if self.enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if _CURRENT is self:
            _CURRENT = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"init_distributed: expected an integer in ${name}, got {raw!r}") from None


def _shutdown_at_exit() -> None:
    if _CURRENT is not None:
        try:
            _CURRENT.shutdown()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit (a peer may already be gone)
            pass


def _timeout(timeout_s: float | None) -> float:
    """The collective timeout: ``timeout_s``, else ``$BGSYNTH_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`."""
    if timeout_s is None:
        raw = os.environ.get("BGSYNTH_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ConfigError(f"init_distributed: expected seconds in $BGSYNTH_DIST_TIMEOUT, got {raw!r}") from None
    if not timeout_s > 0:
        raise ConfigError(f"init_distributed: expected a timeout > 0 seconds, got {timeout_s}")
    return timeout_s


def _check_launcher(world: int, rank: int) -> None:
    """The torchrun environment of a multi-rank job is complete and consistent."""
    if not torch.distributed.is_available():
        raise BackendUnavailableError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not 0 <= rank < world:
        raise ConfigError(f"init_distributed: expected 0 <= RANK < WORLD_SIZE={world}, got RANK={os.environ.get('RANK')!r}")
    if not torch.distributed.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ConfigError(
                f"init_distributed: WORLD_SIZE={world} but {' and '.join(missing)} not set; launch with torchrun "
                f"(e.g. torchrun --nproc_per_node=N -m bgsynth.cli ...)"
            )


def _backend(backend: str | None, local_rank: int, local_world: int) -> str:
    """The process group backend (NCCL on GPUs, gloo on CPUs, or as asked); selects this rank's GPU for NCCL."""
    if backend is None:
        backend = os.environ.get("BGSYNTH_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"init_distributed: expected backend 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise BackendUnavailableError("init_distributed: backend 'nccl' needs CUDA, which is not available")
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise ConfigError(
                f"init_distributed: {local_world} ranks on this node but {gpus} GPU(s); NCCL needs one GPU per rank: "
                f"launch with --nproc_per_node={gpus}, or set BGSYNTH_DIST_BACKEND=gloo"
            )
        torch.cuda.set_device(local_rank % gpus)
    return backend


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Start the process group when launched by torchrun with ``WORLD_SIZE > 1`` (idempotent).

    Args:
        backend: ``'nccl'``, ``'gloo'`` or ``None`` (env ``BGSYNTH_DIST_BACKEND``, else NCCL when CUDA is
            present, else gloo).
        timeout_s: collective timeout; a rank that dies or stalls makes the others fail after at most this long
            (default: env ``BGSYNTH_DIST_TIMEOUT`` or 1800 s).

    Returns:
        The :class:`DistContext` of this process (also returned by :func:`current` from now on).

    Raises:
        ConfigError: inconsistent launcher environment (``RANK`` out of range, no ``MASTER_ADDR``, ...).
        BackendUnavailableError: ``WORLD_SIZE > 1`` without torch.distributed, or NCCL without CUDA.
        DistributedError: the ranks did not all join within the timeout.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = _env_int("WORLD_SIZE", 1)
    timeout_s = _timeout(timeout_s)
    if world < 1:
        raise ConfigError(f"init_distributed: expected WORLD_SIZE >= 1, got {world}")
    if world == 1:
        _CURRENT = DistContext(timeout_s=timeout_s)
        return _CURRENT
    rank, local_rank, local_world = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    _check_launcher(world, rank)
    backend = _backend(backend, local_rank, local_world)
    ctx = DistContext(rank, world, local_rank, backend, float(timeout_s), local_world)
    if not torch.distributed.is_initialized():
        with ctx._guard("init_process_group (rendezvous)"):
            torch.distributed.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
            )
    _CURRENT = ctx
    atexit.register(_shutdown_at_exit)
    return _CURRENT


def current() -> DistContext:
    """The context of this process (a single-process context when :func:`init_distributed` was not called)."""
    return _CURRENT if _CURRENT is not None else DistContext.single()


def shard_ids(ids, shard_id: int, num_shards: int) -> list[int]:
    """The image ids of one shard: the sorted ids, every ``num_shards``-th from ``shard_id``.

    The one sharding rule of bgsynth (decode loaders, eval, prepare, challenge, train): it depends only on the
    ids, so any number of ranks covers every image exactly once, and neighbouring ids (which in a class-major
    index share a class, hence a cost profile) land on different ranks.

    >>> shard_ids([4, 0, 3, 1, 2], 1, 2)
    [1, 3]
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"shard_ids: expected 0 <= shard_id < num_shards, got {shard_id}/{num_shards}")
    return sorted(int(i) for i in ids)[shard_id::num_shards]
