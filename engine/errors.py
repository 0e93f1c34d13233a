"""Typed exceptions of bgsynth.

Every error raised for bad user input derives from :class:`BgsynthError` and says what was expected, what was
found, and which file or tensor is at fault. The device kernels, which import nothing of the rest of bgsynth,
raise their own :class:`~bgsynth.kernels.errors.KernelError` (a ``ValueError`` or ``RuntimeError`` too); the CLI
reports both the same way. (This module imports nothing, so ``bgsynth --help`` does not load torch.)
"""

from __future__ import annotations

__all__ = [
    "BgsynthError",
    "IndexFormatError",
    "DecodeError",
    "BackendUnavailableError",
    "PoolTooLargeError",
    "CheckpointError",
    "ConfigError",
    "EmptyInputError",
]


class BgsynthError(Exception):
    """Base class of every error bgsynth raises on purpose."""


class IndexFormatError(BgsynthError, ValueError):
    """A dataset index (COCO-format JSON) is malformed; the message names the file and the field."""


class DecodeError(BgsynthError, RuntimeError):
    """An image could not be decoded; the message names the file and the reason."""


class BackendUnavailableError(BgsynthError, RuntimeError):
    """A backend (decode, kernel, distributed) was requested but is not installed or not usable here."""


class PoolTooLargeError(BgsynthError, MemoryError):
    """A background pool would not fit in the target device's memory."""


class CheckpointError(BgsynthError, RuntimeError):
    """A model checkpoint or a run checkpoint could not be loaded safely or completely."""


class ConfigError(BgsynthError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class EmptyInputError(ConfigError):
    """A command was given no images to work on (an empty index, or a split or subset without images).

    Every command says it the same way (see :meth:`bgsynth.index.DatasetIndex.require_images`):
    ``<index>: no images to <verb> in split 'x' (splits present: ...)``.
    """

