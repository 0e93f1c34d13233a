"""Host-side preparation of one image, and the PIL reference decode every backend falls back to.

What every decode backend shares per image (:mod:`bgsynth.pipeline.common` builds the loaders on it):

* reading the index record and the file bytes, probed by the one header probe (:func:`bgsynth.probe.probe_image`)
  so that every backend rejects the same files for the same reasons;
* the :class:`~bgsynth.geometry.CropPlan` of each image (exact resize size and crop offset that each backend obeys);
* masks (``plan.crop_mask`` of the decoded RLE), union boxes (``plan.box_to_crop``), Only-BG-T strips
  (:func:`bgsynth.geometry.tile_strips`), labels and ids, made here so they are identical across backends;
* with ``tiling="paper"``, the paper's Only-BG-T at full resolution (:func:`only_bg_t_full`);
* the PIL reference decode (:func:`pil_decode_crop`): the ``pil`` backend, and the per-file fallback of the fast
  ones for data they do not handle.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
import torch

from ..errors import IndexFormatError
from ..geometry import CropGeometry, CropPlan, tile_strips
from ..index import ImageRecord, Reject
from ..probe import ImageProbe, SampleError, probe_image
from ..types import Batch

__all__ = [
    "HostSample",
    "read_sample",
    "crop_targets",
    "full_strips",
    "only_bg_t_full",
    "check_decoded_size",
    "assemble_batch",
    "to_device",
    "pil_resize_crop",
    "pil_decode_crop",
]

# --------------------------------------------------------------------------------------------------------------
# Host-side preparation of one image
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostSample:
    """One image ready for a decoder: its record, crop plan, encoded bytes and header probe.

    ``strip`` is the full-resolution Only-BG-T tile ``(sx0, sy0, tw, th)`` of the paper's construction when the
    decoder must make it (``tiling="paper"``, see :func:`full_strips`), else ``None``.
    """

    record: ImageRecord
    plan: CropPlan
    data: bytes
    probe: ImageProbe
    mask: np.ndarray | None = None
    box: tuple[int, int, int, int] = (0, 0, -1, -1)
    strip: tuple[int, int, int, int] | None = None

    @property
    def path(self) -> str:
        return self.record.path


def read_sample(record: ImageRecord, geometry: CropGeometry) -> HostSample:
    """Read and probe one image's file and make its :class:`~bgsynth.geometry.CropPlan`.

    Raises:
        SampleError: missing, unreadable, zero-byte or truncated file, or a stored size that differs from the
            index's ``width``/``height`` (masks and boxes would not line up).
    """
    try:
        with open(record.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SampleError(Reject.MISSING_FILE, "file not found") from None
    except OSError as e:
        raise SampleError(Reject.UNREADABLE, f"cannot read file ({e})") from None
    probe = probe_image(data)
    if (probe.height, probe.width) != (record.height, record.width):
        raise SampleError(
            Reject.SIZE_MISMATCH,
            f"index says {record.width}x{record.height}, file holds {probe.width}x{probe.height} {probe.format}",
        )
    return HostSample(record, geometry.plan(record.height, record.width), data, probe)


def crop_targets(sample: HostSample) -> HostSample:
    """Fill ``sample.mask`` (``uint8 [C, C]`` or ``None``) and ``sample.box`` (inclusive crop box) in place.

    The mask is the index RLE decoded at the stored size and carried through ``plan.crop_mask`` (nearest); the
    box is the union box carried through ``plan.box_to_crop``, ``(0, 0, -1, -1)`` when there is no box or no crop
    pixel samples it.

    Raises:
        SampleError: the index mask's size differs from the image's (``mask_shape_mismatch``).
    """
    rec = sample.record
    try:
        m = rec.mask()
    except IndexFormatError as e:
        raise SampleError(Reject.MASK_SHAPE, str(e)) from None
    sample.mask = None if m is None else sample.plan.crop_mask(m)
    ub = rec.union_box
    cb = None if ub is None else sample.plan.box_to_crop(ub)
    sample.box = (0, 0, -1, -1) if cb is None else tuple(int(v) for v in cb)
    return sample


def full_strips(samples: Sequence[HostSample]) -> list[tuple[int, int, int, int] | None]:
    """The paper's Only-BG-T tile of each sample at its stored resolution, or ``None`` without a margin.

    The strip rule (:func:`bgsynth.geometry.tile_strips`, batched over the samples' own sizes) applied to the
    inclusive union box in stored pixels: PAPER.md's construction, before any resize.
    """
    if not samples:
        return []
    boxes = torch.tensor([s.record.union_box or (0, 0, -1, -1) for s in samples], dtype=torch.int64)
    h = torch.tensor([s.record.height for s in samples], dtype=torch.int64)
    w = torch.tensor([s.record.width for s in samples], dtype=torch.int64)
    strips = tile_strips(boxes, h, w).tolist()
    return [tuple(st) if st[2] > 0 else None for st in strips]


def only_bg_t_full(image: torch.Tensor | np.ndarray, sample: HostSample) -> torch.Tensor | np.ndarray:
    """The paper's Only-BG-T of one decoded image at its stored resolution.

    Pixels inside the inclusive union box take the strip ``sample.strip`` tiled from the image origin, the others
    keep their value: the same result as :func:`bgsynth.kernels.tile_fill` on the full-resolution pixels, computed for
    one image by using the strip's shape. The strip rule always picks a full-height (left/right) or a full-width
    (top/bottom) strip, so the tiling repeats along one axis only and the box region is one ``index_select``
    along that axis (an order of magnitude cheaper on the CPU than the batched kernel's two-axis gather over the
    whole image, which matters at full resolution).

    Args:
        image: ``uint8 [3, H, W]`` tensor (any device) or ``uint8 [H, W, 3]`` NumPy array (as PIL gives it).
        sample: the sample; ``sample.strip`` must be set.

    Returns:
        The same layout and type as ``image``, new memory.
    """
    hwc = isinstance(image, np.ndarray)
    # NumPy input: one writable copy is both the source and the output (index_select materialises the tiled box
    # before it is written, so reading strip pixels that lie inside the box is safe)
    x = torch.from_numpy(np.array(image, copy=True)) if hwc else image
    ay, ax = (0, 1) if hwc else (1, 2)  # axes of y and x
    H, W = x.shape[ay], x.shape[ax]
    x0, y0, x1, y1 = sample.record.union_box
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W - 1), min(y1, H - 1)
    sx0, sy0, tw, th = sample.strip
    out = x if hwc else x.clone()
    if x1 < x0 or y1 < y0:  # no pixel of the box lies in the image: nothing to tile
        return out.numpy() if hwc else out
    rows = (slice(y0, y1 + 1), slice(x0, x1 + 1)) if hwc else (slice(None), slice(y0, y1 + 1), slice(x0, x1 + 1))
    if th == H:  # a left/right strip: source column sx0 + x % tw, same row
        cols = sx0 + torch.arange(x0, x1 + 1, device=x.device) % tw
        band = x[y0 : y1 + 1] if hwc else x[:, y0 : y1 + 1]
        out[rows] = band.index_select(ax, cols)
    else:  # a top/bottom strip: source row sy0 + y % th, same column
        src = sy0 + torch.arange(y0, y1 + 1, device=x.device) % th
        band = x[:, x0 : x1 + 1] if hwc else x[:, :, x0 : x1 + 1]
        out[rows] = band.index_select(ay, src)
    return out.numpy() if hwc else out


def check_decoded_size(sample: HostSample, height: int, width: int, decoder: str) -> None:
    """Raise :class:`SampleError` when a decoder returned another size than the stored one."""
    if (int(height), int(width)) != (sample.record.height, sample.record.width):
        raise SampleError(
            Reject.SIZE_MISMATCH,
            f"{decoder} decoded {width}x{height}, index says {sample.record.width}x{sample.record.height}",
        )


def assemble_batch(
    samples: Sequence[HostSample],
    images: torch.Tensor,
    geometry: CropGeometry,
    device: torch.device,
    tiling: str = "crop",
    bgt: torch.Tensor | None = None,
) -> Batch:
    """Build a :class:`Batch` from decoded crops and the host samples they came from.

    Masks, boxes, strips, labels, ids and ``has_bgt`` are computed here and only here, from the index and the
    :class:`~bgsynth.geometry.CropPlan`; no backend touches them.

    Args:
        samples: the ``B`` successfully decoded samples, in batch order.
        images: ``uint8 [B, 3, C, C]`` crops (any device; moved to ``device``).
        geometry: the crop geometry (``C = geometry.crop``).
        device: target device of the batch.
        tiling: ``"paper"``: ``has_bgt`` is the full-resolution margin rule (``sample.strip``); ``"crop"``: the
            crop box's margin in the crop.
        bgt: ``uint8 [B, 3, C, C]`` paper Only-BG-T crops (``tiling="paper"`` only), or ``None``.

    Each sample's ``mask``/``box`` must have been filled by :func:`crop_targets`.
    """
    c = geometry.crop
    n = len(samples)
    masks = np.zeros((n, 1, c, c), np.uint8)
    boxes = np.empty((n, 4), np.int32)
    has_mask = np.zeros(n, bool)
    for i, s in enumerate(samples):
        if s.mask is not None:
            masks[i, 0] = s.mask
            has_mask[i] = True
        boxes[i] = s.box
    boxes_t = torch.from_numpy(boxes)
    strips = tile_strips(boxes_t, c, c)
    host = dict(
        masks=torch.from_numpy(masks),
        boxes=boxes_t,
        strips=strips,
        labels=torch.tensor([s.record.label for s in samples], dtype=torch.int64),
        image_ids=torch.tensor([s.record.id for s in samples], dtype=torch.int64),
        has_mask=torch.from_numpy(has_mask),
        has_bgt=(
            torch.tensor([s.strip is not None for s in samples], dtype=torch.bool) if tiling == "paper"
            else strips[:, 2] > 0
        ),
    )
    if device.type == "cuda":
        host = {k: (v.pin_memory() if torch.cuda.is_available() else v) for k, v in host.items()}
    host = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    return Batch(
        images=images.to(device, non_blocking=True),
        bgt=None if bgt is None else bgt.to(device, non_blocking=True),
        tiling=tiling,
        **host,
    )


def to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    return t.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------------------
# The PIL reference decode
# --------------------------------------------------------------------------------------------------------------


def pil_resize_crop(image, plan) -> np.ndarray:
    """Resize a PIL image to ``plan.resized`` (bilinear, antialiased) and centre-crop it -> ``uint8 [C, C, 3]``.

    Args:
        image: an RGB :class:`PIL.Image.Image` of the stored size ``(plan.width, plan.height)``.
        plan: its :class:`~bgsynth.geometry.CropPlan`.
    """
    from PIL import Image  # Pillow: imported where an image is decoded

    rh, rw = plan.resized
    top, left = plan.offset
    c = plan.crop
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), Image.BILINEAR)
    return np.array(image.crop((left, top, left + c, top + c)))


def pil_decode_crop(sample: HostSample, bgt: bool = False) -> tuple[np.ndarray, np.ndarray | None] | SampleError:
    """Decode one sample with PIL and bring it into its crop geometry.

    Args:
        sample: the host sample.
        bgt: also make the paper's Only-BG-T crop: the decoded RGB pixels tiled at full resolution
            (:func:`only_bg_t_full`), then resized and cropped exactly like the image.

    Returns:
        ``(crop, bgt_crop)``: ``uint8 [3, C, C]`` NumPy views (channel-first views of ``[C, C, 3]`` crops),
        ``bgt_crop`` ``None`` unless asked for; or a :class:`SampleError` (truncated/undecodable data, or a
        decoded size other than the index's).
    """
    from PIL import Image, UnidentifiedImageError  # Pillow: imported where an image is decoded

    try:
        with Image.open(io.BytesIO(sample.data)) as im:
            im.load()
            check_decoded_size(sample, im.height, im.width, "PIL")
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            arr = pil_resize_crop(rgb, sample.plan)
            tiled = None
            if bgt:
                full = only_bg_t_full(np.asarray(rgb), sample)
                tiled = pil_resize_crop(Image.fromarray(full), sample.plan).transpose(2, 0, 1)
    except SampleError as e:
        return e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        msg = str(e)
        reason = Reject.TRUNCATED if "truncated" in msg.lower() else Reject.DECODE_FAILED
        return SampleError(reason, f"PIL: {msg}")
    return arr.transpose(2, 0, 1), tiled
