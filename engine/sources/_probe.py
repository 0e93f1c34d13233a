"""The process-pool runner and the error types shared by every ingest (images are probed by :mod:`bgsynth.probe`)."""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import select
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import BgsynthError
from ..index import DatasetIndex, check_file_name

__all__ = ["run_pool", "pool_context", "start_worker", "watch_parent", "IngestError", "WorkerPoolError",
           "summarize_rejects", "with_options", "BAD_FILE_NAME", "reject_bad_name"]

#: reject reason of a file whose name an index cannot hold (:func:`bgsynth.index.check_file_name`)
BAD_FILE_NAME = "bad_file_name"


class IngestError(BgsynthError, ValueError):
    """An ingest found nothing usable (or was given unusable arguments); the message names the root."""


class WorkerPoolError(IngestError):
    """A worker process of an ingest/build pool died (e.g. a script without a ``__main__`` guard)."""


def reject_bad_name(index: DatasetIndex, name: str, where: str = "") -> bool:
    """Record ``name`` as a :data:`BAD_FILE_NAME` reject when the index could not hold it (the rule
    :meth:`~bgsynth.index.DatasetIndex.validate` applies on load); ``True`` when it was rejected.

    Every ingest calls this before it indexes a file, so a bad name (``a\\..\\..\\b.JPEG``, an absolute COCO
    ``file_name``) becomes a recorded reject instead of an index that every later command fails to load.
    """
    why = check_file_name(name)
    if why is None:
        return False
    index.add_reject(name, BAD_FILE_NAME, f"{where}file name {name!r} {why}")
    return True


# --------------------------------------------------------------------------------------------------------------
# Process pool
# --------------------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    try:
        import cv2  # OpenCV: only in the pool's workers

        cv2.setNumThreads(1)  # one process per core already
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass


def _set_death_signal() -> None:
    """Ask the kernel for SIGKILL when this process's parent exits (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux, or no prctl: the pid watch below suffices
        pass


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` has exited (a pidfd where the kernel has them, else polling twice a second)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.5)
    try:
        select.select([fd], [], [])  # a pidfd becomes readable when its process exits
    finally:
        os.close(fd)


def watch_parent(pid: int) -> None:
    """Make this pool worker die with the process that started the pool, even on SIGKILL.

    A killed parent cleans nothing up, and its pool workers would otherwise wait forever: each holds both ends of
    the pool's task pipe (so it never sees end-of-file) and the forkserver's liveness pipe (so the forkserver and the
    resource tracker wait for them in turn). Each worker therefore watches the parent's pid from a daemon thread and
    kills itself when that process is gone; ``PR_SET_PDEATHSIG`` (Linux) adds the same for the worker's own parent
    (the forkserver). Once the workers are gone, the forkserver and the resource tracker exit by themselves.

    Args:
        pid: the process that owns the pool (``os.getpid()`` where the pool is made).
    """
    _set_death_signal()

    def watch() -> None:
        _wait_for_exit(int(pid))
        os.kill(os.getpid(), signal.SIGKILL)  # nothing to clean up: results only ever go to the dead parent

    threading.Thread(target=watch, name="bgsynth-parent-watch", daemon=True).start()


def start_worker(parent_pid: int, initializer: Callable[[], None] | None = None) -> None:
    """A pool worker's initializer: :func:`watch_parent`, then ``initializer`` (default: OpenCV on one thread)."""
    watch_parent(parent_pid)
    (initializer or _init_worker)()


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


#: seconds of work a job does in this process before it starts a pool for the rest (see :func:`run_pool`)
SERIAL_SECONDS = 0.5


# size: the pool's knobs are each needed by some caller (the built-in generator's initializer and preload)
def run_pool(fn: Callable[[Any], Any], tasks: Sequence, workers: int | None = None, desc: str = "",
             progress: bool = True, serial_below: int = 32, initializer: Callable[[], None] | None = None,
             preload: Sequence[str] = ("bgsynth.sources",), serial_seconds: float | None = None) -> list:
    """``[fn(t) for t in tasks]`` in a process pool, in order, with a tqdm bar.

    A pool costs a forkserver that imports ``preload`` and one process per core (about a second on a small
    machine), which a short job never earns back. So the tasks run in this process first; only when
    ``serial_seconds`` of work are done and the rest would take more than twice as long again does a pool take
    the remaining tasks. Ingesting a few dozen images therefore starts no process at all, and a long job loses
    at most ``serial_seconds`` of parallelism. The results do not depend on where a task ran.

    Args:
        fn: a picklable module-level function that never raises for bad input.
        tasks: its arguments.
        workers: processes (default: CPU count); ``1`` runs everything in this process.
        desc: progress bar label.
        progress: show the bar.
        serial_below: jobs of fewer tasks always run in this process.
        initializer: run once in each worker (default: limit OpenCV to one thread); every worker also dies with
            this process (:func:`watch_parent`).
        preload: modules the forkserver imports once (see :func:`pool_context`).
        serial_seconds: in-process work before a pool is considered (default :data:`SERIAL_SECONDS`; ``0``: start
            the pool at once).

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
    parallel = workers > 1 and n >= serial_below
    serial_seconds = SERIAL_SECONDS if serial_seconds is None else float(serial_seconds)
    results: list = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress or n == 0) as bar:
        start = time.perf_counter()
        while len(results) < n:
            done = len(results)
            elapsed = time.perf_counter() - start
            if parallel and done and elapsed >= serial_seconds and elapsed / done * (n - done) > 2 * serial_seconds:
                break
            results.append(fn(tasks[done]))
            bar.update(1)
        rest = tasks[len(results):]
        if not rest:
            return results
        chunk = max(1, min(32, len(rest) // (workers * 8)))
        try:
            with ProcessPoolExecutor(min(workers, len(rest)), mp_context=pool_context(preload),
                                     initializer=start_worker, initargs=(os.getpid(), initializer)) as ex:
                for r in ex.map(fn, rest, chunksize=chunk):
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
