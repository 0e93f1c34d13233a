"""Label spaces: a dataset's classes, their display and folder names, and how a model's outputs map onto them.

:class:`LabelSpace` is the class list of an index (``info.label_space``; ``categories[]`` are its classes): IN-9
(:data:`IN9`, the default and the paper's), any list of names (COCO categories, ImageNet-1k, a mask folder's
classes, the 2 classes of a Waterbirds-style set). :class:`OutputMap` says how the ``K`` outputs of a model map onto
the ``N`` classes: identity (``K == N``), the IN-1000 -> IN-9 map (the default for a 1000-class model on IN-9
data), or any many-to-one JSON map; an output that maps to no class is a wrong prediction under the ``official``
protocol and is skipped by the ``restricted`` one (argmax over the mapped outputs only).

The IN-9 definition ships inside the package (``engine/data/in9_classes.json``); ImageNet-1k class metadata
(the 1000 WordNet ids in the standard sorted order) comes from timm rather than a hand-written list.

>>> from bgsynth.classes import IN9_CLASSES, in1k_to_in9
>>> IN9_CLASSES[1]
'bird'
>>> int((in1k_to_in9() >= 0).sum())
370
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .fileio import read_json

__all__ = [
    "LabelSpace",
    "OutputMap",
    "IN9",
    "PROTOCOLS",
    "NUM_IN9",
    "IN9_CLASSES",
    "IN9_FOLDERS",
    "IN9_WNIDS",
    "IN9_MEAN",
    "IN9_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "in9_definition",
    "in1k_to_in9",
    "in1k_wnids",
    "wnid_to_in1k",
    "wnid_to_in9",
    "folder_to_in9",
]


@functools.lru_cache(maxsize=None)
def in9_definition() -> dict:
    """The parsed ``in9_classes.json`` shipped with the package."""
    with resources.files("bgsynth.data").joinpath("in9_classes.json").open("r", encoding="utf-8") as f:
        return json.load(f)


_DEF = in9_definition()
NUM_IN9: int = len(_DEF["classes"])
IN9_CLASSES: tuple[str, ...] = tuple(c["name"] for c in _DEF["classes"])
IN9_FOLDERS: tuple[str, ...] = tuple(c["folder"] for c in _DEF["classes"])
IN9_WNIDS: tuple[str, ...] = tuple(c["wnid"] for c in _DEF["classes"])
IN9_MEAN: tuple[float, float, float] = tuple(_DEF["mean"])
IN9_STD: tuple[float, float, float] = tuple(_DEF["std"])
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _in1k_to_in9_array() -> np.ndarray:
    arr = np.asarray(_DEF["imagenet_index_to_in9"], dtype=np.int64)
    if arr.shape != (1000,):
        raise ConfigError(f"in9_classes.json: expected 1000 entries in imagenet_index_to_in9, got {arr.shape}")
    return arr


def in1k_to_in9() -> np.ndarray:
    """IN-1k class index -> IN-9 class id (``-1`` where the ImageNet class maps to no IN-9 class).

    Returns:
        A fresh ``int64`` array of shape ``[1000]``.
    """
    return _in1k_to_in9_array().copy()


@functools.lru_cache(maxsize=None)
def in1k_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in the standard (sorted) class-index order.

    Read from ``in1k_wnids.json`` shipped with the package (the list of timm's ``imagenet_synsets.txt``; a test
    checks they agree): importing timm for it cost an ingest seconds of start-up.
    """
    with resources.files("bgsynth.data").joinpath("in1k_wnids.json").open("r", encoding="utf-8") as f:
        wnids = tuple(json.load(f)["wnids"])
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise ConfigError(f"in1k_wnids.json: expected 1000 sorted wnids, got {len(wnids)}")
    return wnids


@functools.lru_cache(maxsize=None)
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(in1k_wnids())}


def wnid_to_in1k(wnid: str) -> int | None:
    """ImageNet-1k class index of a WordNet id, or ``None`` if it is not one of the 1000 classes."""
    return _wnid_index().get(wnid)


def wnid_to_in9(wnid: str) -> int | None:
    """IN-9 class id of an ImageNet-1k WordNet id, or ``None`` when the class is unknown or unmapped."""
    idx = wnid_to_in1k(wnid)
    if idx is None:
        return None
    y = int(_in1k_to_in9_array()[idx])
    return None if y < 0 else y


def folder_to_in9(folder: str) -> int | None:
    """IN-9 class id of a release class folder name such as ``'02_wheeled vehicle'`` (``None`` if unknown)."""
    try:
        return IN9_FOLDERS.index(folder)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Label spaces
# --------------------------------------------------------------------------------------------------------------

_BAD_FOLDER = re.compile(r"[/\\\x00]|^\.\.?$")


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The classes of a dataset: ``N`` names, their export folder names, and a short identifier.

    Args:
        name: identifier (``'in9'``, ``'coco'``, ``'waterbirds'``, ...), recorded in results.
        classes: the class names, class id = position.
        folders: one folder name per class for exports (default ``f"{id:02d}_{name}"``, as the IN-9 release);
            no path separators, unique.

    >>> ls = LabelSpace.from_names(["landbird", "waterbird"], name="waterbirds")
    >>> ls.num_classes, ls.folders, ls.next_class(1)
    (2, ('0_landbird', '1_waterbird'), 0)
    >>> LabelSpace.from_dict(IN9.to_dict()) == IN9
    True
    """

    name: str
    classes: tuple[str, ...]
    folders: tuple[str, ...] | None = None

    def __post_init__(self):
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise ConfigError(f"LabelSpace {self.name!r}: expected at least one class")
        if len(set(classes)) != len(classes) or any(not c.strip() for c in classes):
            raise ConfigError(f"LabelSpace {self.name!r}: expected unique, non-empty class names, got {list(classes)[:20]}")
        width = max(1, len(str(len(classes) - 1)))
        folders = tuple(self.folders) if self.folders is not None else tuple(
            f"{i:0{width}d}_{c}" for i, c in enumerate(classes))
        if len(folders) != len(classes) or len(set(folders)) != len(folders):
            raise ConfigError(f"LabelSpace {self.name!r}: expected one unique folder name per class")
        bad = [f for f in folders if not f or _BAD_FOLDER.search(f)]
        if bad:
            raise ConfigError(f"LabelSpace {self.name!r}: folder names must not contain path separators: {bad[:3]}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "folders", folders)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def next_class(self, label: int) -> int:
        """Mixed-Next's target class: ``(label + 1) mod N``."""
        return (int(label) + 1) % self.num_classes

    def index(self, name: str) -> int:
        """Class id of a class name (:class:`ConfigError` naming the known ones otherwise)."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise ConfigError(f"label space {self.name!r}: unknown class {name!r}; classes: {list(self.classes)[:20]}") from None

    def categories(self) -> list[dict]:
        """The COCO ``categories[]`` of an index in this label space."""
        return [{"id": i, "name": n, "supercategory": self.name} for i, n in enumerate(self.classes)]

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "folders": list(self.folders)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelSpace":
        if not isinstance(d, Mapping) or not isinstance(d.get("classes"), list):
            raise ConfigError(f"expected a label space as {{'name', 'classes': [...], 'folders': [...]}}, got {d!r:.200}")
        return cls(str(d.get("name", "custom")), tuple(d["classes"]), tuple(d["folders"]) if d.get("folders") else None)

    @classmethod
    def from_names(cls, names: Sequence[str], name: str = "custom") -> "LabelSpace":
        return cls(name, tuple(names))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LabelSpace":
        """A label space from a JSON file: a list of names, or ``{"name": ..., "classes": [...], "folders": [...]}``."""
        d = read_json(path, "class list")
        if isinstance(d, list):
            return cls.from_names(d, name=os.path.splitext(os.path.basename(os.fspath(path)))[0])
        return cls.from_dict(d)


IN9 = LabelSpace("in9", IN9_CLASSES, IN9_FOLDERS)
PROTOCOLS = ("official", "restricted")


@dataclasses.dataclass(frozen=True)
class OutputMap:
    """How a model's ``K`` outputs map onto a label space's ``N`` classes.

    Args:
        table: ``int64 [K]``: the class of each output, ``-1`` for an output that maps to no class; ``None`` means
            the identity (``K == N``).
        name: ``'identity'``, ``'in1k->in9'``, or where a custom map came from.

    The two label protocols of the paper, generalised: ``official`` takes the top-1 output and maps it (an
    unmapped output is a wrong prediction, ``-1``); ``restricted`` takes the argmax over the outputs that map to a
    class.

    >>> m = OutputMap.from_dict({"0": 1, "2": 0}, num_outputs=3)
    >>> import torch
    >>> m.predict(torch.tensor([[0.1, 0.9, 0.5]])).tolist(), m.predict(torch.tensor([[0.1, 0.9, 0.5]]), "restricted").tolist()
    ([-1], [0])
    """

    table: np.ndarray | None = None
    name: str = "identity"

    @classmethod
    def identity(cls) -> "OutputMap":
        return cls(None, "identity")

    @classmethod
    def in1k_to_in9(cls) -> "OutputMap":
        return cls(in1k_to_in9(), "in1k->in9")

    @classmethod
    def from_dict(cls, d: Mapping, num_outputs: int, name: str = "custom") -> "OutputMap":
        """A many-to-one map ``{output index: class id}`` (JSON keys may be strings); outputs not named map to none."""
        table = np.full(int(num_outputs), -1, np.int64)
        for k, v in d.items():
            k, v = int(k), int(v)
            if not 0 <= k < num_outputs:
                raise ConfigError(f"output map {name!r}: output {k} outside 0..{num_outputs - 1}")
            table[k] = v
        return cls(table, name)

    @classmethod
    def from_json(cls, path: str | os.PathLike, num_outputs: int) -> "OutputMap":
        d = read_json(path, "output map")
        if isinstance(d, list):
            d = {i: v for i, v in enumerate(d)}
        if not isinstance(d, Mapping):
            raise ConfigError(f"{path}: expected a JSON object {{output: class}} or a list, got {type(d).__name__}")
        return cls.from_dict(d, num_outputs, name=os.fspath(path))

    def check(self, num_outputs: int, num_classes: int, where: str = "model") -> None:
        """Raise :class:`ConfigError` unless this map takes ``num_outputs`` outputs into ``0..num_classes-1``."""
        if self.table is None:
            if num_outputs != num_classes:
                raise ConfigError(f"{where}: {num_outputs} outputs cannot map one-to-one onto {num_classes} classes; "
                                  f"give an output map")
            return
        if len(self.table) != num_outputs:
            raise ConfigError(f"{where}: the output map {self.name!r} covers {len(self.table)} outputs, the model has {num_outputs}")
        hi = int(self.table.max(initial=-1))
        if hi >= num_classes:
            raise ConfigError(f"{where}: the output map {self.name!r} names class {hi}, the label space has {num_classes}")

    def predict(self, logits, protocol: str = "official"):
        """Class ids (``int64 [B]``, ``-1`` = unmapped) from ``[B, K]`` logits under a protocol."""
        import torch

        if protocol not in PROTOCOLS:
            raise ConfigError(f"expected a label protocol in {PROTOCOLS}, got {protocol!r}")
        if self.table is None:
            return logits.argmax(dim=1)
        table = torch.as_tensor(self.table, device=logits.device)
        if protocol == "restricted":
            masked = logits.masked_fill((table < 0)[None, :], float("-inf"))
            return table[masked.argmax(dim=1)]
        return table[logits.argmax(dim=1)]

    def to_dict(self) -> dict:
        return {"name": self.name, "table": None if self.table is None else self.table.tolist()}

