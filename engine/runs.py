"""Output folders owned by one run configuration: nothing stale, nothing half-written, nothing else touched.

Every writer of bgsynth (export, eval, challenge, report, show, train) claims its output through
:class:`OutputFolder` before it does any work:

* the folder records the writer's **fingerprint** in ``bgsynth-run.json``: the settings that decide its content,
  the digest of the index it read and of the model it ran (:func:`index_digest`, :func:`file_digest`);
* a rerun with an **equal** fingerprint continues (``resume``) or rewrites its own files; with a **different**
  one it is refused before any work, with a message naming every setting that differs, unless ``overwrite``, which
  deletes the files the previous run recorded as its own (and nothing else);
* a folder holding files the writer would own but no record of who wrote them (an earlier version's output, or
  another tool's) is refused likewise: nothing is silently reused;
* files the writer does not own (a stray ``notes.txt``, someone's ``mine.JPEG``) are never counted, never deleted;
* the temporary files of a killed atomic write (``.<name>.<random>.tmp``, :mod:`bgsynth.fileio`) are removed when
  the folder is claimed again.

A single-file output (a contact sheet, a checkpoint) is claimed the same way, its record kept beside it as
``<name>.bgsynth-run.json``.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
>>> OutputFolder(out, Fingerprint("export", {"seed": 0})).claim().commit(["a.png"])
>>> OutputFolder(out, Fingerprint("export", {"seed": 1})).claim()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
bgsynth.errors.ConfigError: ... was written by another export run (settings that differ: seed: 0 -> 1); ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_json

__all__ = ["RUN_FILE", "Fingerprint", "OutputFolder", "index_digest", "file_digest", "remove_partial_files",
           "check_output_path"]

RUN_FILE = "bgsynth-run.json"
_FORMAT = "bgsynth-run/1"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a model checkpoint, a weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_digest(index) -> str:
    """SHA-256 of what an index says about its images (ids, files, sizes, labels, splits, boxes, masks).

    Independent of where the index file lies and of its rejects list, so the same dataset gives the same digest.
    """
    h = hashlib.sha256()
    keys = ("id", "file_name", "width", "height", "label", "split")
    for im in sorted(index.data["images"], key=lambda d: d["id"]):
        h.update(json.dumps([im.get(k) for k in keys], sort_keys=True).encode())
        for a in index.annotations(im["id"]):
            h.update(json.dumps([a.get("bbox"), a.get("segmentation")], sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What decides a writer's output: the writer, its settings, and the digests of its inputs.

    Attributes:
        writer: ``'export'``, ``'eval'``, ``'challenge'``, ``'report'``, ``'show'``, ``'train'``...
        settings: JSON-able settings (seed, geometry, tiling, variants, ...).
        index: :func:`index_digest` of the index read, or ``None``.
        model: :func:`file_digest` of the model file, or ``None``.
    """

    writer: str
    settings: dict
    index: str | None = None
    model: str | None = None

    def to_dict(self) -> dict:
        return {"writer": self.writer, "settings": _jsonable(self.settings), "index": self.index, "model": self.model}

    def differences(self, other: Mapping | None) -> list[str]:
        """Readable ``name: old -> new`` lines of what differs from a recorded fingerprint (``[]``: equal)."""
        if other is None:
            return ["no record"]
        mine = self.to_dict()
        out = []
        if other.get("writer") != mine["writer"]:
            out.append(f"writer: {other.get('writer')} -> {mine['writer']}")
        old, new = other.get("settings") or {}, mine["settings"]
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                out.append(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}")
        for k in ("index", "model"):
            if other.get(k) != mine[k]:
                out.append(f"{k} digest: {_short(other.get(k))} -> {_short(mine[k])}")
        return out


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def remove_partial_files(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete the temporary files killed atomic writes left in ``folder`` (``.<name>.<random>.tmp``); returns how
    many. Only files of exactly that form are touched."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return 0
    pattern = "**/.*.tmp" if recursive else ".*.tmp"
    n = 0
    for p in folder.glob(pattern):
        if p.is_file() and p.name.startswith(".") and p.name.count(".") >= 3:
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


def check_output_path(path: str | os.PathLike, kind: str, flag: str = "--out") -> pathlib.Path:
    """Validate an output path before any work, and create the folder it needs.

    Args:
        path: the output.
        kind: ``'folder'`` (the path is the folder to write into) or ``'file'`` (the path is a file to write).
        flag: the option that named it, for the message.

    Raises:
        ConfigError: a folder was asked for and a file is there (or the reverse), or the folder cannot be created
            or written to (tried for real: permissions, read-only file systems); the message names flag and path.
    """
    if kind not in ("folder", "file"):
        raise ConfigError(f"check_output_path: expected kind 'folder' or 'file', got {kind!r}")
    p = pathlib.Path(path).expanduser()
    if kind == "folder" and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p}: is an existing file, expected a folder (give a new or existing folder)")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{flag} {p}: is an existing folder, expected a file name (e.g. {p / 'out.png'})")
    folder = p if kind == "folder" else p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".bgsynth-write-check.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
    return p


class OutputFolder:
    """An output folder (or single output file) claimed by one run configuration (see the module docstring).

    Args:
        path: the folder (or, with ``single_file=True``, the file) the writer produces.
        fingerprint: the writer's :class:`Fingerprint`.
        overwrite: a different (or unknown) previous run's files may be deleted.
        resume: the writer continues an earlier run; only allowed with an equal fingerprint.
        owned: ``callable(path) -> bool`` telling whether an existing file is of the kind this writer produces
            (used to detect output without a record); default: none is.
        single_file: ``path`` is one file; the record is ``<name>.bgsynth-run.json`` beside it.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: Fingerprint, *, overwrite: bool = False,
                 resume: bool = False, owned=None, single_file: bool = False):
        self.path = pathlib.Path(path).expanduser()
        self.fingerprint = fingerprint
        self.overwrite = bool(overwrite)
        self.resume = bool(resume)
        self.owned = owned
        self.single_file = bool(single_file)
        self.folder = self.path.parent if single_file else self.path
        self.record_path = (self.folder / f"{self.path.name}.{RUN_FILE}") if single_file else self.path / RUN_FILE
        self.previous: dict | None = None
        self.files: set[str] = set()
        self._written: set[str] = set()  # the files this run committed (self.files also holds an equal run's)

    # ------------------------------------------------------------------------------------------ record
    def _read_record(self) -> dict | None:
        if not self.record_path.is_file():
            return None
        try:
            d = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{self.record_path}: unreadable run record ({e}); delete it or use --overwrite") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ConfigError(f"{self.record_path}: not a bgsynth run record; delete it or use --overwrite")
        return d

    def _unrecorded_outputs(self) -> list[pathlib.Path]:
        if self.single_file:
            return [self.path] if self.path.exists() else []
        if self.owned is None or not self.path.is_dir():
            return []
        return [p for p in self.path.rglob("*") if p.is_file() and p.name != RUN_FILE and self.owned(p)]

    def claim(self) -> "OutputFolder":
        """Check the folder against the fingerprint and prepare it; raises :class:`ConfigError` before any work."""
        check_output_path(self.path, "file" if self.single_file else "folder")
        try:
            record = self._read_record()
        except ConfigError:
            if not self.overwrite:
                raise
            record = None
        where = f"{self.path}"
        if record is not None:
            diff = self.fingerprint.differences(record.get("fingerprint"))
            if diff and not self.overwrite:
                raise ConfigError(
                    f"{where} was written by another {record['fingerprint'].get('writer', 'bgsynth')} run "
                    f"(settings that differ: {'; '.join(diff)}); use the same settings, another output, or "
                    f"--overwrite to replace that run's files"
                )
            if diff:
                self._delete(record.get("files", []))
                record = None
            else:
                self.previous = record
                self.files = set(record.get("files", []))
        else:
            stray = self._unrecorded_outputs()
            if stray and not self.overwrite:
                raise ConfigError(
                    f"{where} already holds {len(stray)} output file(s) of no recorded run (e.g. {stray[0]}); "
                    f"use another output, or --overwrite to replace them"
                )
            if stray:
                for p in stray:
                    p.unlink(missing_ok=True)
        if self.resume and self.previous is None and not self.overwrite and record is None and self._has_content():
            raise ConfigError(f"{where}: nothing to resume (no record of an earlier run)")
        remove_partial_files(self.folder, recursive=not self.single_file)
        if not self.single_file:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def _has_content(self) -> bool:
        return self.path.exists() and (self.single_file or any(self.path.iterdir()))

    def _delete(self, files: Iterable[str]) -> None:
        self._delete_files(files)
        self.record_path.unlink(missing_ok=True)

    def _delete_files(self, files: Iterable[str]) -> None:
        for rel in files:
            p = (self.folder / rel) if self.single_file else (self.path / rel)
            try:
                p.resolve().relative_to(self.folder.resolve())
            except ValueError:  # a record never names files outside its folder; refuse to follow one that does
                continue
            p.unlink(missing_ok=True)

    def commit(self, files: Iterable[str | os.PathLike] = ()) -> None:
        """Add ``files`` (paths inside the folder) to the run's own files and write the record atomically."""
        base = self.folder if self.single_file else self.path
        prefix = os.path.join(str(base), "")
        for f in files:
            s = os.fspath(f)
            rel = s[len(prefix):] if os.sep == "/" and s.startswith(prefix) else None
            if not (rel and posixpath.normpath(rel) == rel):  # an export records thousands: strings, not paths
                p = pathlib.Path(f)
                rel = (p.relative_to(base) if p.is_absolute() else p).as_posix()
            self.files.add(rel)
            self._written.add(rel)
        self._write_record()

    def finish(self) -> list[str]:
        """The run is complete: files that an earlier run with the same fingerprint recorded and this run did not
        write again (say, ``provenance.csv`` of a run that asked for it, then a rerun that did not) are deleted,
        so the folder holds exactly this run's output. Returns the deleted names.

        Only for writers whose every run writes its whole output (eval, challenge); a resumable writer that adds
        to an earlier run's files (export) keeps them with :meth:`commit` alone.
        """
        stale = sorted(self.files - self._written)
        self._delete_files(stale)
        self.files = set(self._written)
        self._write_record()
        return stale

    def _write_record(self) -> None:
        atomic_write_json(self.record_path, {
            "format": _FORMAT,
            "fingerprint": self.fingerprint.to_dict(),
            "files": sorted(self.files),
        }, indent=1)
