"""Robust image probing and the process-pool runner shared by every ingest.

:func:`probe_image` never raises for bad input: it returns a :class:`ProbeResult` that either describes a usable
image (stored pixel size, container format, colour mode, EXIF orientation) or carries a reject reason from
:class:`bgsynth.index.Reject` with a human-readable detail.

What counts as usable: any file PIL can decode fully (``verify='full'``), whatever its extension says:
grayscale (``L``), CMYK and palette JPEGs, PNG data in a ``.JPEG`` file, RGBA PNGs. Decoders convert them to
RGB; the index records ``format``/``mode`` so they know what to expect. The stored size is reported as is:
EXIF orientation is recorded (``exif_orientation``, 1 = none) but never applied, because ILSVRC boxes and the
released masks are in stored-pixel coordinates.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

from ..errors import BgsynthError
from ..index import Reject

__all__ = ["ProbeResult", "probe_image", "sniff_format", "run_pool", "pool_context", "IngestError",
           "WorkerPoolError", "VERIFY_MODES"]

VERIFY_MODES = ("full", "header")
_EXIF_ORIENTATION = 0x0112


class IngestError(BgsynthError, ValueError):
    """An ingest found nothing usable (or was given unusable arguments); the message names the root."""


class WorkerPoolError(IngestError):
    """A worker process of an ingest/build pool died (e.g. a script without a ``__main__`` guard)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What probing one image file found.

    Attributes:
        path: the file probed.
        reason: ``None`` for a usable image, else a :class:`~bgsynth.index.Reject` reason.
        detail: human-readable explanation of a reject (empty when usable).
        width, height: stored pixel size (``0`` when rejected before the header was read).
        format: container format found in the bytes (``'JPEG'``, ``'PNG'``, ...), independent of the extension.
        mode: PIL colour mode (``'RGB'``, ``'L'``, ``'CMYK'``, ``'P'``, ``'RGBA'``, ...).
        exif_orientation: EXIF orientation tag (1..8; 1 when absent). Not applied to width/height.
    """

    path: str
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str | None = None
    mode: str | None = None
    exif_orientation: int = 1

    @property
    def ok(self) -> bool:
        return self.reason is None

    def entry_fields(self) -> dict:
        """The fields an index image entry takes from the probe."""
        return {
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "mode": self.mode,
            "exif_orientation": self.exif_orientation,
        }


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(head: bytes) -> str | None:
    """Container format from the first bytes of a file (``None`` if it is not a known image format)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _complete(data: bytes, fmt: str) -> bool:
    """Cheap completeness check of a file's tail: a JPEG end-of-image marker near the end (some writers pad
    after it), a PNG IEND chunk at the end. Other formats are not checked."""
    if fmt == "JPEG":
        return b"\xff\xd9" in data[-1024:]
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    return True


def probe_image(path: str | os.PathLike, verify: str = "full") -> ProbeResult:
    """Probe one image file without ever raising on bad input.

    Args:
        path: the image file.
        verify: ``'full'`` decodes every pixel (catches corrupt and truncated data anywhere);
            ``'header'`` reads the header and checks that the file ends like a complete JPEG/PNG (fast).

    Returns:
        A :class:`ProbeResult`; ``result.ok`` tells whether the image is usable.

    Reject reasons: :attr:`Reject.MISSING_FILE`, :attr:`Reject.ZERO_BYTE`, :attr:`Reject.TRUNCATED` (the data
    ends early), :attr:`Reject.UNREADABLE` (not an image, or corrupt).
    """
    if verify not in VERIFY_MODES:
        raise IngestError(f"probe_image: expected verify in {VERIFY_MODES}, got {verify!r}")
    spath = str(path)
    try:
        with open(spath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ProbeResult(spath, Reject.MISSING_FILE, "file not found")
    except (IsADirectoryError, PermissionError, OSError) as e:
        return ProbeResult(spath, Reject.UNREADABLE, f"cannot read file: {e}")
    if len(data) == 0:
        return ProbeResult(spath, Reject.ZERO_BYTE, "file is empty (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        return ProbeResult(spath, Reject.UNREADABLE, f"not an image: unknown leading bytes {data[:8].hex()}")

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = int(im.size[0]), int(im.size[1])
            mode = str(im.mode)
            pil_format = str(im.format or fmt)
            try:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block does not make the pixels unusable
                orientation = 1
            if not 1 <= orientation <= 8:
                orientation = 1
            if width <= 0 or height <= 0:
                return ProbeResult(spath, Reject.UNREADABLE, f"invalid image size {width}x{height}", format=fmt)
            if verify == "full":
                im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ProbeResult(spath, Reject.UNREADABLE, f"{fmt} data cannot be decoded: {e}", format=fmt)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        msg = str(e)
        # a decoder failure on a file that ends early is a truncation; anything else is corrupt data
        reason = Reject.UNREADABLE if _complete(data, fmt) else Reject.TRUNCATED
        return ProbeResult(spath, reason, f"{fmt} data cannot be decoded: {msg or type(e).__name__}", format=fmt)
    if not _complete(data, fmt):
        marker = "end-of-image marker" if fmt == "JPEG" else "IEND chunk"
        return ProbeResult(spath, Reject.TRUNCATED, f"{fmt} file ends without its {marker} ({len(data)} bytes)",
                           width=width, height=height, format=pil_format, mode=mode)
    return ProbeResult(spath, None, "", width, height, pil_format, mode, orientation)


# --------------------------------------------------------------------------------------------------------------
# Process pool
# --------------------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    try:
        import cv2

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
    import collections

    rejects = list(rejects)
    counts = collections.Counter(r["reason"] for r in rejects)
    parts = [f"{reason}: {n}" for reason, n in sorted(counts.items())]
    examples = [f"{r['path']} ({r['reason']}: {r.get('detail', '')})" for r in rejects[:limit]]
    text = ", ".join(parts) if parts else "none"
    if examples:
        text += "; e.g. " + "; ".join(examples)
    return text


__all__ += ["summarize_rejects"]
