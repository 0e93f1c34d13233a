"""Helpers that make good, bad and odd dataset files at test time (never committed as binaries).

Every function writes into a folder the test owns (``tmp_path``) and returns what it wrote, so tests can
compare the ingest's output against the independently known truth.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "pattern",
    "write_image",
    "write_png_as_jpeg",
    "write_exif_rotated_jpeg",
    "truncate_file",
    "write_garbage",
    "write_corrupt_jpeg",
    "write_zero_byte",
    "write_voc",
    "write_text",
    "make_imagenet_tree",
    "make_in9_release",
    "rect_mask",
]


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test picture ``uint8 [H, W, 3]`` (smooth gradients plus a few blocks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                    np.full_like(xx, int(rng.integers(0, 256)))], -1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    return img


def write_image(path: str | os.PathLike, width: int = 64, height: int = 48, mode: str = "RGB",
                fmt: str = "JPEG", seed: int = 0, quality: int = 90) -> pathlib.Path:
    """Write a picture in a PIL mode (``'RGB'``, ``'L'``, ``'CMYK'``, ``'P'``, ``'RGBA'``) and format."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pattern(width, height, seed), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    kw = {"quality": quality} if fmt == "JPEG" else {}
    im.save(path, format=fmt, **kw)
    return path


def write_png_as_jpeg(path: str | os.PathLike, width: int = 64, height: int = 48, seed: int = 0) -> pathlib.Path:
    """PNG data in a file named ``.JPEG`` (it happens in ImageNet)."""
    return write_image(path, width, height, "RGB", "PNG", seed)


def write_exif_rotated_jpeg(path: str | os.PathLike, width: int = 64, height: int = 40, orientation: int = 6,
                            seed: int = 0) -> pathlib.Path:
    """A JPEG whose stored pixels are ``width`` x ``height`` with an EXIF orientation tag (6: rotate 90 CW)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pattern(width, height, seed), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


def truncate_file(path: str | os.PathLike, keep: float = 0.5) -> pathlib.Path:
    """Cut a file to the first ``keep`` fraction of its bytes (a truncated download)."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def write_garbage(path: str | os.PathLike, n: int = 500, seed: int = 0) -> pathlib.Path:
    """Random bytes under an image name."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(b"\x00" + data)  # a leading zero byte: never a known magic number
    return path


def write_corrupt_jpeg(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """A JPEG start-of-image marker followed by garbage: looks like a JPEG, cannot be decoded."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 256, 800, dtype=np.uint8).tobytes()
    path.write_bytes(b"\xff\xd8\xff\xe0" + data + b"\xff\xd9")
    return path


def write_zero_byte(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_voc(path: str | os.PathLike, width: int | None, height: int | None,
              boxes: Sequence[tuple[int, int, int, int]], name: str = "n01440764") -> pathlib.Path:
    """An ILSVRC-style XML; ``width=None`` omits the ``<size>`` block."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = "" if width is None else (
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    objs = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.write_text(f"<annotation><folder>x</folder><filename>{path.stem}</filename>{size}{objs}</annotation>")
    return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_imagenet_tree(root: str | os.PathLike, images: Sequence[dict]) -> dict:
    """Write ImageNet-style class folders and XMLs.

    Args:
        root: folder receiving ``images/<wnid>/<name>`` and ``ann/<wnid>/<stem>.xml``.
        images: dicts with ``wnid``, ``name`` and optional ``width``/``height``/``boxes``/``mode``/``fmt``.

    Returns:
        ``{"images": Path, "ann": Path}``.
    """
    root = pathlib.Path(root)
    img_root, ann_root = root / "images", root / "ann"
    for i, spec in enumerate(images):
        w, h = spec.get("width", 64), spec.get("height", 48)
        p = img_root / spec["wnid"] / spec["name"]
        write_image(p, w, h, spec.get("mode", "RGB"), spec.get("fmt", "JPEG"), seed=i)
        boxes = spec.get("boxes", [(5, 6, 40, 30)])
        write_voc(ann_root / spec["wnid"] / f"{p.stem}.xml", w, h, boxes, spec["wnid"])
    return {"images": img_root, "ann": ann_root}


def rect_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/1 mask with the inclusive box ``(x0, y0, x1, y1)`` set."""
    m = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = 1
    return m


def make_in9_release(root: str | os.PathLike, per_class: dict[str, int], size: tuple[int, int] = (40, 56),
                     variants: Sequence[str] = ("original",)) -> dict:
    """Write a small IN-9 release: ``<variant>/val/<folder>/<stem>.JPEG`` and ``fg_mask/val/<folder>/<stem>.npy``.

    Returns:
        ``{relative image path: mask}`` of the ``original`` variant.
    """
    root = pathlib.Path(root)
    h, w = size
    truth = {}
    k = 0
    for folder, n in per_class.items():
        for i in range(n):
            stem = f"n0000000{k}_{i}"
            box = (3 + k % 5, 2 + i % 4, 20 + k % 7, 25 + i % 5)
            m = rect_mask(h, w, box)
            m[box[1], box[0]] = 0  # not exactly a rectangle: the box must come from the extent
            for v in variants:
                write_image(root / v / "val" / folder / f"{stem}.JPEG", w, h, seed=k)
            (root / "fg_mask" / "val" / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / "fg_mask" / "val" / folder / f"{stem}.npy", m)
            truth[f"{folder}/{stem}.JPEG"] = m
            k += 1
    return truth


def coco_json(path: str | os.PathLike, images: list[dict], annotations: list[dict],
              categories: list[dict]) -> pathlib.Path:
    """Write a COCO JSON."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def jpeg_bytes(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(width, height, seed)).save(buf, format="JPEG")
    return buf.getvalue()


__all__ += ["coco_json", "jpeg_bytes"]


def calibrate_batchnorm(net, x):
    """Set every BatchNorm's running statistics to those of the batch ``x`` (one forward in train mode) and return
    the net in eval mode. A randomly initialised net otherwise predicts nearly one class everywhere; calibrated,
    its predictions spread over the classes, so prediction-equality tests are not trivially passed."""
    import torch
    from torch import nn

    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
            mod.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()

