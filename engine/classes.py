"""ImageNet-9 (IN-9) classes and the ImageNet-1k -> IN-9 map.

The IN-9 definition ships inside the package (``engine/data/in9_classes.json``); ImageNet-1k class metadata
(the 1000 WordNet ids in the standard sorted order) comes from timm rather than a hand-written list.

>>> from bgsynth.classes import IN9_CLASSES, in1k_to_in9
>>> IN9_CLASSES[1]
'bird'
>>> int((in1k_to_in9() >= 0).sum())
370
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

from .errors import ConfigError

__all__ = [
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
    """The 1000 ImageNet-1k WordNet ids in the standard (sorted) class-index order, from timm's metadata."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = tuple(info.index_to_label_name(i) for i in range(info.num_classes()))
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise ConfigError(f"timm ImageNet-1k metadata: expected 1000 sorted wnids, got {len(wnids)}")
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
