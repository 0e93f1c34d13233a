"""Files written so that a reader never sees half of them: temporary file in the same folder, fsync, rename.

Every writer of bgsynth (indexes, results, checkpoints, exports, reports) goes through these two functions, so a
killed run leaves either the old file or the new one, never a truncated one. The temporary files are named
``.<name>.<random>.tmp`` beside the target.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the result the permissions an ordinary open() would (0666 minus umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialise ``obj`` as JSON and write it atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=False).encode("utf-8"))
