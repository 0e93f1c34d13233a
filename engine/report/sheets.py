"""Contact sheets (PNG, drawn with PIL): the variants of a batch like the paper's figure, and decoded inputs.

Drawing only: the functions take a decoded :class:`~bgsynth.types.Batch` (ids, labels, crops, masks, boxes) and
uint8 variant outputs; decoding and synthesis are :mod:`bgsynth.show`'s (``bgsynth show``).

* :func:`variant_sheet`: one row per image, one column per variant, labelled with the paper's names; composites
  that do not exist for an image (no mask, no margin, no background) are drawn crossed out.
* :func:`decoded_sheet`: decoded crops with the foreground mask overlaid and the union box drawn: what the
  decode stage hands to :func:`~bgsynth.variants.synthesize`.

Sizes are exact: a sheet of ``n`` rows and ``V`` columns at tile side ``t`` is
``LEFT + V * (t + PAD) + PAD`` wide and ``TOP + n * (t + PAD) + PAD`` high (see :func:`sheet_size`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from collections.abc import Sequence

from ..classes import IN9_CLASSES
from ..errors import ConfigError
from ..variants import VARIANTS

__all__ = ["variant_sheet", "decoded_sheet", "sheet_size", "PAD", "TOP", "LEFT"]

PAD = 4  # pixels between tiles
TOP = 30  # title band + column headers
LEFT = 96  # row labels (image id, class)


def sheet_size(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a sheet of ``rows`` x ``cols`` tiles of side ``tile``."""
    return LEFT + cols * (tile + PAD) + PAD, TOP + rows * (tile + PAD) + PAD


def _hwc(img) -> np.ndarray:
    """``[3, H, W]`` uint8 tensor/array -> contiguous ``H x W x 3`` uint8 array."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ConfigError(f"sheet: expected an image of shape [3, H, W], got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ConfigError(f"sheet: expected uint8 images (use dtype=torch.uint8 outputs), got {arr.dtype}")
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def _label(label: int, classes: Sequence[str] | None = None) -> str:
    """The class name of a label in ``classes`` (default: IN-9's), or ``'label k'`` outside it."""
    names = IN9_CLASSES if classes is None else classes
    return str(names[label]) if 0 <= label < len(names) else f"label {label}"


def _canvas(rows: int, cols: int, tile: int, title: str, headers: list[str]):
    w, h = sheet_size(rows, cols, tile)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 2), title, fill=(0, 0, 0), font=font)
    max_chars = max(3, (tile + PAD) // 6)
    for j, text in enumerate(headers):
        draw.text((LEFT + j * (tile + PAD) + PAD, 16), text[:max_chars], fill=(0, 0, 0), font=font)
    return sheet, draw, font


def _row_label(draw, font, i: int, tile: int, image_id: int, label: int, classes) -> None:
    y = TOP + i * (tile + PAD) + PAD
    draw.text((PAD, y + max(0, tile // 2 - 12)), f"id {image_id}", fill=(0, 0, 0), font=font)
    draw.text((PAD, y + max(12, tile // 2)), _label(label, classes)[: (LEFT - PAD) // 6], fill=(0, 0, 0), font=font)


def _save(sheet, out_path) -> pathlib.Path:
    path = pathlib.Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def variant_sheet(
    batch,
    outputs: Mapping,
    out_path: str | os.PathLike,
    tile: int | None = None,
    max_rows: int | None = None,
    title: str | None = None,
    classes: Sequence[str] | None = None,
) -> pathlib.Path:
    """Contact sheet of variants: one row per image, one column per variant (the paper's figure).

    Args:
        batch: the :class:`~bgsynth.types.Batch` the variants were made from (ids and labels of rows).
        outputs: ``{name: VariantOutput}`` from :func:`bgsynth.variants.synthesize` with uint8 images; columns
            follow its order and are headed with the paper's names.
        out_path: PNG to write.
        tile: side of each tile (default: the crop size, at most 128).
        max_rows: at most this many images (default: all of the batch).
        title: text of the title band.
        classes: the class names of the labels (the index's label space; default IN-9's).

    Returns:
        The path written.

    Shape:
        ``outputs[name].images``: ``uint8 [B, 3, C, C]``; the sheet is :func:`sheet_size` ``(rows, V, tile)``.
    """
    if not outputs:
        raise ConfigError("variant_sheet: expected at least one variant output, got none")
    names = list(outputs)
    n = len(batch) if max_rows is None else min(len(batch), int(max_rows))
    c = int(batch.images.shape[-1])
    tile = min(c, 128) if tile is None else int(tile)
    if tile < 8:
        raise ConfigError(f"variant_sheet: expected tile >= 8 pixels, got {tile}")
    headers = [VARIANTS[k].display if k in VARIANTS else str(k) for k in names]
    sheet, draw, font = _canvas(n, len(names), tile, title or f"{len(names)} variants of {n} images", headers)
    ids = batch.image_ids.cpu().tolist()
    labels = batch.labels.cpu().tolist()
    valid = {k: o.valid.cpu().tolist() for k, o in outputs.items()}
    for i in range(n):
        _row_label(draw, font, i, tile, ids[i], labels[i], classes)
        y = TOP + i * (tile + PAD) + PAD
        for j, k in enumerate(names):
            x = LEFT + j * (tile + PAD) + PAD
            im = Image.fromarray(_hwc(outputs[k].images[i]))
            if im.size != (tile, tile):
                im = im.resize((tile, tile), Image.BILINEAR)
            sheet.paste(im, (x, y))
            if not valid[k][i]:
                grey = (160, 160, 160)
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=grey, width=2)
                draw.line([x, y, x + tile - 1, y + tile - 1], fill=grey, width=2)
                draw.line([x, y + tile - 1, x + tile - 1, y], fill=grey, width=2)
    return _save(sheet, out_path)


def decoded_sheet(
    batch,
    out_path: str | os.PathLike,
    tile: int | None = None,
    max_images: int | None = None,
    columns: int = 8,
    alpha: float = 0.45,
    title: str | None = None,
    classes: Sequence[str] | None = None,
) -> pathlib.Path:
    """Decoded crops with the foreground mask overlaid (red) and the union box drawn (yellow), in a grid.

    Args:
        batch: a decoded :class:`~bgsynth.types.Batch`.
        out_path: PNG to write.
        tile: side of each tile (default: the crop size, at most 128).
        max_images: at most this many images.
        columns: images per row.
        alpha: opacity of the mask overlay.
        title: text of the title band.
        classes: the class names of the labels (the index's label space; default IN-9's).

    Returns:
        The path written; the sheet is :func:`sheet_size` ``(ceil(n / columns), columns, tile)``.
    """
    n = len(batch) if max_images is None else min(len(batch), int(max_images))
    if columns < 1:
        raise ConfigError(f"decoded_sheet: expected columns >= 1, got {columns}")
    c = int(batch.images.shape[-1])
    tile = min(c, 128) if tile is None else int(tile)
    if tile < 8:
        raise ConfigError(f"decoded_sheet: expected tile >= 8 pixels, got {tile}")
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    sheet, draw, font = _canvas(rows, cols, tile, title or f"{n} decoded crops: mask (red), union box (yellow)",
                                [])
    scale = tile / c
    ids = batch.image_ids.cpu().tolist()
    labels = batch.labels.cpu().tolist()
    boxes = batch.boxes.cpu().tolist()
    masks = batch.masks[:, 0].cpu().numpy()
    has_mask = batch.has_mask.cpu().tolist()
    red = np.array([255, 0, 0], np.float32)
    for k in range(n):
        r, q = divmod(k, cols)
        x = LEFT + q * (tile + PAD) + PAD
        y = TOP + r * (tile + PAD) + PAD
        arr = _hwc(batch.images[k]).astype(np.float32)
        if has_mask[k]:
            m = masks[k].astype(bool)
            arr[m] = (1 - alpha) * arr[m] + alpha * red
        im = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
        if im.size != (tile, tile):
            im = im.resize((tile, tile), Image.BILINEAR)
        sheet.paste(im, (x, y))
        x0, y0, x1, y1 = boxes[k]
        if x1 >= x0 and y1 >= y0:
            draw.rectangle([x + int(x0 * scale), y + int(y0 * scale),
                            x + int((x1 + 1) * scale) - 1, y + int((y1 + 1) * scale) - 1],
                           outline=(255, 220, 0), width=1)
        caption = f"{ids[k]} {_label(labels[k], classes)}"[: tile // 6]
        draw.text((x + 2, y + 2), caption, fill=(255, 255, 255), font=font)
    return _save(sheet, out_path)
