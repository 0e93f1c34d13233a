"""Files written so that a reader never sees half of them: a temporary file in the same folder, fsync'd (unless
the writer opts out, see :func:`atomic_write_bytes`), then renamed into place.

Every writer of bgsynth (indexes, results, checkpoints, exports, reports) goes through these two functions, so a
killed run leaves either the old file or the new one, never a truncated one. The temporary files are named
``.<name>.<random>.tmp`` beside the target.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from .errors import ConfigError

__all__ = ["atomic_write_bytes", "atomic_write_json", "read_json"]

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary ``.<name>.<random>.tmp`` in the same folder
    (created, with its parents, when missing), renamed into place.

    Args:
        path: the target file.
        data: its bytes.
        durable: fsync the file before the rename, so the new content survives a power loss too. Writers of many
            small files (export) pass ``False``: a killed process still leaves the old file or the new one, and the
            next claim of the folder removes the temporary (:func:`bgsynth.runs.remove_partial_files`).

    The file gets the permissions an ordinary ``open()`` would give (0666 minus the umask).
    """
    target = os.fspath(path)
    folder, name = os.path.split(target)
    tmp, fd = _open_temporary(folder, name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _open_temporary(folder: str, name: str) -> tuple[str, int]:
    """A new ``.<name>.<random>.tmp`` in ``folder`` (made, with its parents, on the first file) and its descriptor."""
    made = False
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, _NEW_FILE, 0o666)  # raw descriptors: a third cheaper than file objects
        except FileNotFoundError:
            if made:
                raise
            os.makedirs(folder or ".", exist_ok=True)
            made = True
        except FileExistsError:  # another writer's temporary of the same name: draw again
            pass


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialise ``obj`` as JSON and write it atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=False).encode("utf-8"))


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> Any:
    """The parsed content of a JSON file; a file that cannot be read, decoded or parsed raises ``error`` with
    ``"<path>: not a readable <what> (<reason>)"``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable {what} ({e})") from e
