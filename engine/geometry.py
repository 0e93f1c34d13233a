"""The one crop geometry of bgsynth: resize the shorter side, centre crop, and carry masks and boxes through it.

Every stage (decode backends, filters, variants, export) goes through :class:`CropPlan`, so masks and boxes agree
bit for bit wherever they are computed.

Conventions:

* Resize follows torchvision's ``Resize(int)``: the shorter side becomes ``resize``, the longer
  ``int(resize * long / short)``. Centre crop follows ``CenterCrop``: offset ``int(round((size - crop) / 2))``.
* Images are resampled bilinearly with antialiasing (the decode backends; decoders differ slightly).
* Masks and boxes use exact integer nearest-neighbour maps: output pixel ``i`` of the resized grid samples source
  pixel ``floor((2 i + 1) * src / (2 * dst))`` (the pixel whose area holds the output pixel's centre).
* Boxes are inclusive ``(x0, y0, x1, y1)``. A box carried through the geometry is the set of output pixels whose
  source pixel lies in the box: an axis-aligned rectangle again, because the maps are monotone.

>>> g = CropGeometry(resize=256, crop=224)
>>> p = g.plan(height=375, width=500)
>>> p.resized, p.offset
((256, 341), (16, 58))
>>> p.box_to_crop((0, 0, 499, 374))
(0, 0, 223, 223)
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["CropGeometry", "CropPlan", "nearest_map", "tile_strips"]


def nearest_map(src: int, dst: int) -> np.ndarray:
    """Source index of every output index when resampling ``src`` pixels to ``dst`` with nearest neighbour.

    Exact integer arithmetic: ``floor((2 i + 1) * src / (2 dst))``, clipped to ``src - 1``.
    """
    i = np.arange(dst, dtype=np.int64)
    return np.minimum(((2 * i + 1) * src) // (2 * dst), src - 1)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """Model input geometry: shorter side to ``resize``, then a ``crop`` x ``crop`` centre crop.

    Args:
        resize: target length of the shorter side.
        crop: side of the square centre crop (``crop <= resize``).
    """

    resize: int = 256
    crop: int = 224

    def __post_init__(self):
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ConfigError(f"CropGeometry: expected integer sizes, got resize={self.resize!r}, crop={self.crop!r}")
        if self.crop <= 0 or self.resize < self.crop:
            raise ConfigError(f"CropGeometry: expected 0 < crop <= resize, got resize={self.resize}, crop={self.crop}")

    def plan(self, height: int, width: int) -> "CropPlan":
        """The :class:`CropPlan` of an image of stored size ``height`` x ``width``."""
        return _plan(self.resize, self.crop, int(height), int(width))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop}


@functools.lru_cache(maxsize=4096)
def _plan(resize: int, crop: int, height: int, width: int) -> "CropPlan":
    if height <= 0 or width <= 0:
        raise ConfigError(f"CropPlan: expected a positive image size, got {height}x{width}")
    if height <= width:
        rh, rw = resize, int(resize * width / height)
    else:
        rh, rw = int(resize * height / width), resize
    top = int(round((rh - crop) / 2.0))
    left = int(round((rw - crop) / 2.0))
    return CropPlan(height, width, rh, rw, top, left, crop)


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """Resize + centre-crop plan of one image (see the module docstring for the exact conventions)."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop: int

    @property
    def resized(self) -> tuple[int, int]:
        return self.resized_height, self.resized_width

    @property
    def offset(self) -> tuple[int, int]:
        return self.top, self.left

    @functools.cached_property
    def resized_rows(self) -> np.ndarray:
        """Source row of every row of the resized (uncropped) grid."""
        return nearest_map(self.height, self.resized_height)

    @functools.cached_property
    def resized_cols(self) -> np.ndarray:
        return nearest_map(self.width, self.resized_width)

    @property
    def crop_rows(self) -> np.ndarray:
        """Source row of every row of the crop."""
        return self.resized_rows[self.top : self.top + self.crop]

    @property
    def crop_cols(self) -> np.ndarray:
        return self.resized_cols[self.left : self.left + self.crop]

    # ------------------------------------------------------------------------------------------------ masks
    def crop_mask(self, mask: np.ndarray) -> np.ndarray:
        """Carry a ``[H, W]`` mask through the geometry with nearest neighbour -> ``[crop, crop]``."""
        mask = np.asarray(mask)
        if mask.shape[:2] != (self.height, self.width):
            raise ConfigError(f"crop_mask: expected a mask of size {(self.height, self.width)}, got {mask.shape[:2]}")
        return mask[np.ix_(self.crop_rows, self.crop_cols)]

    # ------------------------------------------------------------------------------------------------ boxes
    @staticmethod
    def _interval(src_map: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
        i0 = int(np.searchsorted(src_map, lo, side="left"))
        i1 = int(np.searchsorted(src_map, hi, side="right")) - 1
        return None if i0 > i1 else (i0, i1)

    def box_to_crop(self, box) -> tuple[int, int, int, int] | None:
        """Inclusive source box -> inclusive crop box (``None`` if no crop pixel samples the box)."""
        x0, y0, x1, y1 = (int(v) for v in box)
        ys = self._interval(self.crop_rows, y0, y1)
        xs = self._interval(self.crop_cols, x0, x1)
        if ys is None or xs is None:
            return None
        return xs[0], ys[0], xs[1], ys[1]

    def box_to_resized(self, box) -> tuple[int, int, int, int] | None:
        """Inclusive source box -> inclusive box on the resized, uncropped grid."""
        x0, y0, x1, y1 = (int(v) for v in box)
        ys = self._interval(self.resized_rows, y0, y1)
        xs = self._interval(self.resized_cols, x0, x1)
        if ys is None or xs is None:
            return None
        return xs[0], ys[0], xs[1], ys[1]

    @staticmethod
    def box_area(box) -> int:
        if box is None:
            return 0
        x0, y0, x1, y1 = box
        return max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1)

    def box_crop_fraction(self, box) -> float:
        """Fraction of the crop area covered by the box (the paper's "at most 90% of the crop" filter)."""
        return self.box_area(self.box_to_crop(box)) / float(self.crop * self.crop)

    def box_inside_fraction(self, box) -> float:
        """Fraction of the resized box that lies inside the crop (the paper's "at least 50% inside" filter)."""
        full = self.box_area(self.box_to_resized(box))
        return 0.0 if full == 0 else self.box_area(self.box_to_crop(box)) / float(full)


def tile_strips(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """The paper's Only-BG-T strip rule, batched and branchless.

    For each inclusive box ``(x0, y0, x1, y1)`` in an image of ``height`` x ``width``: the left strip is
    ``x < x0`` (width ``x0``), the right ``x >= x1`` (width ``W - x1``), the top ``y < y0`` (height ``y0``), the
    bottom ``y >= y1`` (height ``H - y1``). The left/right pair is used when
    ``max(left, right) * H > max(top, bottom) * W`` (strictly), else top/bottom; within a pair the left (top)
    strip when its margin is strictly larger, else the right (bottom). A box that leaves no margin (or an empty
    box, ``x1 < x0``) has no Only-BG-T.

    Args:
        boxes: ``[B, 4]`` integer tensor of inclusive boxes.
        height, width: image size the boxes live in: integers (one size for the batch, e.g. the crop) or
            integer tensors ``[B]`` (each image's stored size, for the paper's full-resolution tiling).

    Returns:
        ``int32 [B, 4]`` tile rectangles ``(sx0, sy0, tw, th)``; the tiled value at ``(y, x)`` is the image pixel
        ``(sy0 + y % th, sx0 + x % tw)``. All zeros where there is no Only-BG-T.

    >>> tile_strips(torch.tensor([[10, 0, 19, 9]]), 10, 30).tolist()   # right strip is wider
    [[19, 0, 11, 10]]
    >>> tile_strips(torch.tensor([[0, 2, 9, 5], [0, 0, 9, 9]]), torch.tensor([8, 10]), torch.tensor([10, 10])).tolist()
    [[0, 5, 10, 3], [0, 0, 0, 0]]
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ConfigError(f"tile_strips: expected boxes of shape [B, 4], got {tuple(boxes.shape)}")
    b = boxes.to(torch.int64)
    x0, y0, x1, y1 = b.unbind(-1)
    H = torch.as_tensor(height, dtype=torch.int64, device=b.device).expand_as(x0)
    W = torch.as_tensor(width, dtype=torch.int64, device=b.device).expand_as(x0)
    present = (x1 >= x0) & (y1 >= y0)
    margin = (x0 > 0) | (y0 > 0) | (x1 < W - 1) | (y1 < H - 1)
    ok = present & margin
    left, right, top, bottom = x0, W - x1, y0, H - y1
    use_lr = torch.maximum(left, right) * H > torch.maximum(top, bottom) * W
    pick_left = left > right
    pick_top = top > bottom
    zeros = torch.zeros_like(x0)
    full_h = H.clone()
    full_w = W.clone()
    lr = torch.stack(
        [torch.where(pick_left, zeros, x1), zeros, torch.where(pick_left, left, right), full_h], dim=-1
    )
    tb = torch.stack(
        [zeros, torch.where(pick_top, zeros, y1), full_w, torch.where(pick_top, top, bottom)], dim=-1
    )
    out = torch.where(use_lr.unsqueeze(-1), lr, tb)
    out = torch.where(ok.unsqueeze(-1), out, torch.zeros_like(out))
    return out.to(torch.int32)
