"""The tensor containers that flow between the stages: :class:`Batch`, :class:`BackgroundPool`, :class:`VariantOutput`.

The ground floor of bgsynth: decoders produce a :class:`Batch`, the variants layer turns batches into
:class:`VariantOutput` s and :class:`BackgroundPool` s, and every consumer reads them. Nothing here imports a
module of bgsynth above this floor.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import torch

from .classes import NUM_IN9
from .errors import ConfigError, PoolTooLargeError
from .fileio import atomic_write_bytes

__all__ = ["Batch", "BackgroundPool", "VariantOutput", "TILINGS"]


TILINGS = ("paper", "crop")


@dataclasses.dataclass
class Batch:
    """A decoded batch in the model's crop geometry.

    Shape:
        - images: ``uint8 [B, 3, C, C]``
        - masks: ``uint8 [B, 1, C, C]`` (0/1; all zeros where ``has_mask`` is False)
        - boxes: ``int32 [B, 4]`` inclusive union box ``(x0, y0, x1, y1)`` in crop coordinates;
          ``(0, 0, -1, -1)`` where the box falls outside the crop (an empty box)
        - strips: ``int32 [B, 4]`` the crop-space Only-BG-T tile ``(sx0, sy0, tw, th)`` of ``tiling="crop"``
          (see :func:`bgsynth.geometry.tile_strips`)
        - labels, image_ids: ``int64 [B]``
        - has_mask, has_bgt: ``bool [B]``; ``has_bgt``: the image has an Only-BG-T under ``tiling`` (paper: its
          union box leaves a margin in the stored image; crop: the crop box leaves a margin in the crop)
        - bgt: ``uint8 [B, 3, C, C]`` or ``None``: with ``tiling="paper"``, the paper's Only-BG-T of every image,
          tiled at full resolution and then resized and cropped like ``images`` (rows without an Only-BG-T hold
          the unchanged crop); ``None`` when the decoder was asked not to make it, and always with ``"crop"``
          (the tiling is then done in the crop by :func:`bgsynth.kernels.tile_fill`).

    Attributes:
        tiling: ``"paper"`` or ``"crop"``: how this batch's Only-BG-T is defined (see :mod:`bgsynth.variants`).
    """

    images: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    strips: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    has_mask: torch.Tensor
    has_bgt: torch.Tensor
    bgt: torch.Tensor | None = None
    tiling: str = "crop"

    def __post_init__(self):
        b = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ConfigError(f"Batch.images: expected uint8 [B,3,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        for name in ("masks", "boxes", "strips", "labels", "image_ids", "has_mask", "has_bgt"):
            t = getattr(self, name)
            if t.shape[0] != b:
                raise ConfigError(f"Batch.{name}: expected batch size {b}, got {tuple(t.shape)}")
        if self.tiling not in TILINGS:
            raise ConfigError(f"Batch.tiling: expected one of {TILINGS}, got {self.tiling!r}")
        if self.bgt is not None:
            if self.tiling != "paper":
                raise ConfigError("Batch.bgt: full-resolution Only-BG-T images come only with tiling='paper'")
            if self.bgt.shape != self.images.shape or self.bgt.dtype != torch.uint8:
                raise ConfigError(
                    f"Batch.bgt: expected uint8 {tuple(self.images.shape)} (as images), got {self.bgt.dtype} "
                    f"{tuple(self.bgt.shape)}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def size(self) -> int:
        """Side of the square crop."""
        return int(self.images.shape[-1])

    def _map(self, fn) -> "Batch":
        """A batch whose tensors are ``fn(tensor)`` (``bgt`` only when present), same tiling."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = fn(v)
        return Batch(**kw)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def slice(self, index) -> "Batch":
        """Rows of the batch selected by a slice, an index tensor or a boolean mask."""
        return self._map(lambda t: t[index])

    @classmethod
    def cat(cls, batches: list["Batch"]) -> "Batch":
        if not batches:
            raise ConfigError("Batch.cat: expected at least one batch")
        tilings = {b.tiling for b in batches}
        with_bgt = {b.bgt is not None for b in batches}
        if len(tilings) > 1 or len(with_bgt) > 1:
            raise ConfigError("Batch.cat: expected batches of one tiling, all with or all without bgt images")
        kw = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(b, f.name) for b in batches]
            kw[f.name] = torch.cat(vals) if isinstance(vals[0], torch.Tensor) else vals[0]
        return cls(**kw)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


@dataclasses.dataclass
class BackgroundPool:
    """The Only-BG-T images of a split, resident on a device, with their labels and ids (sorted by id).

    Shape:
        - images: ``uint8 [N, 3, C, C]``
        - labels, image_ids: ``int64 [N]``

    Attributes:
        num_classes: size of the label space the labels belong to (Mixed-Next's ``(y + 1) mod num_classes``;
            IN-9's 9 by default).
    """

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    num_classes: int = NUM_IN9

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ConfigError(
                f"BackgroundPool.images: expected uint8 [N,3,H,W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (n,) or self.image_ids.shape != (n,):
            raise ConfigError(
                f"BackgroundPool: expected labels/image_ids of shape [{n}], got {tuple(self.labels.shape)}, "
                f"{tuple(self.image_ids.shape)}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"BackgroundPool: expected num_classes a positive integer, got {self.num_classes!r}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @staticmethod
    def estimate_bytes(n: int, crop: int) -> int:
        """Device memory of a pool of ``n`` backgrounds at ``crop`` x ``crop`` (uint8 images + ids and labels)."""
        return int(n) * (3 * crop * crop + 16)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.labels, self.image_ids))

    @staticmethod
    def check_fits(n: int, crop: int, device: torch.device | str, headroom: float = 0.5) -> None:
        """Raise :class:`PoolTooLargeError` if a pool would take more than ``headroom`` of the device's free memory."""
        device = torch.device(device)
        need = BackgroundPool.estimate_bytes(n, crop)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
        else:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return
        if need > headroom * free:
            raise PoolTooLargeError(
                f"a background pool of {n} images at {crop}x{crop} needs {need / 2**30:.2f} GiB, more than "
                f"{headroom:.0%} of the {free / 2**30:.2f} GiB free on {device}; use fewer backgrounds "
                f"(--pool-per-class) or a smaller crop"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BackgroundPool":
        return BackgroundPool(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.image_ids.to(device, non_blocking=non_blocking),
            self.num_classes,
        )

    def select(self, index) -> "BackgroundPool":
        return BackgroundPool(self.images[index], self.labels[index], self.image_ids[index], self.num_classes)

    def save(self, path: str | os.PathLike) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"images": self.images.cpu(), "labels": self.labels.cpu(), "image_ids": self.image_ids.cpu(),
                    "num_classes": self.num_classes}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "BackgroundPool":
        d = torch.load(pathlib.Path(path), map_location="cpu", weights_only=True)
        return cls(d["images"], d["labels"], d["image_ids"], int(d.get("num_classes", NUM_IN9))).to(device)


@dataclasses.dataclass(frozen=True)
class VariantOutput:
    """One variant of a batch.

    Shape:
        - images: ``[B, 3, C, C]`` (uint8, or the requested floating dtype/normalisation/memory format)
        - valid: ``bool [B]``: the variant exists for this image (see the module table)
        - bg_ids: ``int64 [B]``: image id of the background used (Mixed-*), -1 otherwise or when none
        - bg_labels: ``int64 [B]``: its IN-9 label, -1 likewise
    """

    images: torch.Tensor
    valid: torch.Tensor
    bg_ids: torch.Tensor
    bg_labels: torch.Tensor
