"""The process-pool runner and the error types shared by every ingest (images are probed by :mod:`bgsynth.probe`)."""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import BgsynthError

__all__ = ["run_pool", "pool_context", "IngestError", "WorkerPoolError", "summarize_rejects", "with_options"]


class IngestError(BgsynthError, ValueError):
    """An ingest found nothing usable (or was given unusable arguments); the message names the root."""


class WorkerPoolError(IngestError):
    """A worker process of an ingest/build pool died (e.g. a script without a ``__main__`` guard)."""


# --------------------------------------------------------------------------------------------------------------
# Process pool
# --------------------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    try:
        import cv2  # OpenCV: only in the pool's workers

        cv2.setNumThreads(1)  # one process per core already
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass


def pool_context(preload: Sequence[str] = ("bgsynth.sources",)):
    """The multiprocessing context of every ingest/build pool.

    Not ``fork``: a process that has already used OpenCV's thread pool (any sizeable cv2 call) leaves it in an
    undefined state in a forked child, which then hangs in its first parallel OpenCV call or in
    ``cv2.setNumThreads``. ``forkserver`` forks workers from a clean server process that imported ``preload``
    once (fast starts); ``spawn`` where there is no forkserver. Like any non-fork start, it requires scripts to
    guard their top-level code with ``if __name__ == "__main__":``.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # effective only before the server starts; harmless after
        return ctx
    return multiprocessing.get_context("spawn")


def run_pool(fn: Callable[[Any], Any], tasks: Sequence, workers: int | None = None, desc: str = "",
             progress: bool = True, serial_below: int = 32, initializer: Callable[[], None] | None = None,
             preload: Sequence[str] = ("bgsynth.sources",)) -> list:
    """``[fn(t) for t in tasks]`` in a process pool, in order, with a tqdm bar.

    Args:
        fn: a picklable module-level function that never raises for bad input.
        tasks: its arguments.
        workers: processes (default: CPU count); small jobs (fewer than ``serial_below`` tasks) run in-process.
        desc: progress bar label.
        progress: show the bar.
        initializer: run once in each worker (default: limit OpenCV to one thread).
        preload: modules the forkserver imports once (see :func:`pool_context`).

    Returns:
        The results in task order.

    Raises:
        WorkerPoolError: when a worker process dies (for example a script without a ``__main__`` guard).
    """
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    n = len(tasks)
    workers = int(workers or os.cpu_count() or 1)
    results: list = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress or n == 0) as bar:
        if workers <= 1 or n < serial_below:
            for t in tasks:
                results.append(fn(t))
                bar.update(1)
            return results
        chunk = max(1, min(32, n // (workers * 8)))
        try:
            with ProcessPoolExecutor(min(workers, n), mp_context=pool_context(preload),
                                     initializer=initializer or _init_worker) as ex:
                for r in ex.map(fn, tasks, chunksize=chunk):
                    results.append(r)
                    bar.update(1)
        except BrokenProcessPool as e:
            raise WorkerPoolError(
                f"{desc or 'pool'}: a worker process died. Workers start with multiprocessing's forkserver (or "
                f"spawn): a script that calls this must guard its top-level code with "
                f"`if __name__ == '__main__':`, or the workers fail on start."
            ) from e
    return results


def summarize_rejects(rejects: Iterable[dict], limit: int = 5) -> str:
    """A short text: counts per reason and the first few rejected paths."""
    rejects = list(rejects)
    counts = collections.Counter(r["reason"] for r in rejects)
    parts = [f"{reason}: {n}" for reason, n in sorted(counts.items())]
    examples = [f"{r['path']} ({r['reason']}: {r.get('detail', '')})" for r in rejects[:limit]]
    text = ", ".join(parts) if parts else "none"
    if examples:
        text += "; e.g. " + "; ".join(examples)
    return text



def with_options(owner: str, config, config_cls: type, options: Mapping[str, Any], error: type = IngestError):
    """``config`` (default ``config_cls()``) with the keyword ``options`` applied (validated again by the frozen
    dataclass); unknown names are an ``error`` (:class:`IngestError`) that lists the valid ones."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        raise error(f"{owner}: unknown option(s) {unknown}; expected {config_cls.__name__} fields {sorted(fields)}")
    if config is None:
        return config_cls(**options)
    return dataclasses.replace(config, **options) if options else config
