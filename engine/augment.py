"""Online background-swap augmentation: the paper's training variants made per batch on the device.

The paper's remedy for background reliance is training on Mixed-Rand; its authors wrote every training variant
to disk first. Here each sample of a batch becomes, with configurable probabilities, one of

===============  ====================================================================================
``original``     the image itself
``mixed_rand``   its foreground (mask M) on the Only-BG-T of an image of a random class
``mixed_same``   its foreground on the Only-BG-T of another image of the same class
``only_fg``      its foreground on black
``no_fg``        the image with its foreground blacked out
===============  ====================================================================================

after the usual random resized crop and horizontal flip, applied with the same parameters to the image and its
mask (and to the background) *before* compositing, so the composite's foreground pixels are exactly the
augmented foreground's. The label is always the foreground's label. The paper's training sets are the special
cases with probability 1 (``probs={'mixed_rand': 1.0}`` is its Mixed-Rand training set).

Two layers:

* :class:`BackgroundSwap`: a transform for any loader. Given uint8 images, 0/1 masks, boxes (or tile strips),
  labels and image ids on the device, it returns the augmented, normalised batch (one fused
  :func:`bgsynth.kernels.composite` pass does the select, normalise, cast and memory format).
* :class:`TrainIterator`: ``(images, labels)`` batches of one split of an index, decoded by
  :func:`bgsynth.pipeline.create_loader` (DALI where available), cached on the device, reshuffled per epoch and
  sharded by the one sharding rule, then augmented by :class:`BackgroundSwap`.

Randomness, as in kornia's augmentation generators, is sampled apart from its application and kept
(:class:`AugmentParams`), and it is a pure function of ``(seed, epoch, image id)``: a counter-based hash, no
global RNG state. The variant, crop, flip and pool background of a sample therefore do not depend on the batch
size, the order of the samples, the number of workers or the number of shards, and any batch can be replayed.
(An in-batch background, ``bg_source='batch'``, is by nature drawn from the batch the sample is in.)

Random resized crop follows :class:`torchvision.transforms.RandomResizedCrop` (area fraction in ``scale``,
log-uniform aspect ratio in ``ratio``, 10 attempts, then the central crop), run on the square crop the decode
geometry produced. The crop is resampled bilinearly with half-pixel centres (``align_corners=False``): on the CPU
with ``kornia.geometry.transform.crop_by_indices`` and ``hflip`` (slice + resize per sample, uint8 kept), on a GPU
for the whole batch in one ``grid_sample`` call (no per-sample work, no host synchronisation); the mask with the
exact integer nearest-neighbour map of :mod:`bgsynth.geometry` (one flat gather).

>>> import torch
>>> swap = BackgroundSwap({"only_fg": 1.0}, bg_source="batch", seed=0, random_resized_crop=False, flip=False,
...                       mean=None, std=None, dtype=torch.uint8)
>>> img = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
>>> mask = torch.zeros(2, 1, 8, 8, dtype=torch.uint8); mask[:, :, 2:5, 2:5] = 1
>>> out = swap(img, mask, labels=torch.tensor([3, 5]), image_ids=torch.tensor([10, 11]),
...            boxes=torch.tensor([[2, 2, 4, 4]] * 2))
>>> out.images[0, 0, 3, 3].item(), out.images[0, 0, 0, 0].item(), out.labels.tolist()
(200, 0, [3, 5])
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterator, Mapping, Sequence

import kornia
import torch
from torch import nn

from .classes import IN9_MEAN, IN9_STD
from .config import resolve_device
from .errors import ConfigError
from .geometry import CropGeometry, tile_strips
from .rng import fold, hash_below, hash_bits, hash_uniform, srl
from .types import TILINGS, BackgroundPool, Batch
from .variants import background_pool_from_batch, choose_backgrounds

__all__ = [
    "AUGMENT_VARIANTS",
    "AugmentParams",
    "AugmentedBatch",
    "BackgroundSwap",
    "TrainIterator",
    "parse_probs",
    "resized_crop_flip",
    "sample_params",
    "sample_resized_crops",
]

#: The variants a training sample can become, in the order of their codes (``AugmentParams.variant``).
AUGMENT_VARIANTS: tuple[str, ...] = ("original", "mixed_rand", "mixed_same", "only_fg", "no_fg")
_CODE = {name: i for i, name in enumerate(AUGMENT_VARIANTS)}
_ORIGINAL, _MIXED_RAND, _MIXED_SAME, _ONLY_FG, _NO_FG = range(len(AUGMENT_VARIANTS))
_ALIASES = {"mixed-rand": "mixed_rand", "mixed-same": "mixed_same", "only-fg": "only_fg", "no-fg": "no_fg"}

# Streams of the counter-based generator: every random choice has its own, so adding one never shifts another.
_S_VARIANT, _S_CROP, _S_FLIP, _S_BG, _S_BG_CROP, _S_BG_FLIP, _S_ORDER, _S_EPOCH_SEED = range(1, 9)
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before the central fallback


# ==============================================================================================================
# Probabilities
# ==============================================================================================================


def parse_probs(probs: Mapping[str, float] | str | None) -> dict[str, float]:
    """Resolve augmentation probabilities into one float per variant of :data:`AUGMENT_VARIANTS`.

    Variants not named get 0, except ``original``, which takes the remainder ``1 - sum(others)`` when it is not
    named. The result must sum to 1.

    Args:
        probs: a mapping ``{variant: probability}``, a string ``"mixed_rand=0.5,only_fg=0.1"`` (the CLI form), or
            ``None`` (Original only).

    Returns:
        ``{variant: probability}`` over all of :data:`AUGMENT_VARIANTS`, in that order.

    Raises:
        ConfigError: unknown variant, negative or non-finite probability, or a total other than 1.

    >>> parse_probs("mixed_rand=0.3")
    {'original': 0.7, 'mixed_rand': 0.3, 'mixed_same': 0.0, 'only_fg': 0.0, 'no_fg': 0.0}
    """
    if probs is None:
        probs = {"original": 1.0}
    if isinstance(probs, str):
        parsed: dict[str, float] = {}
        for part in (p.strip() for p in probs.split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"augment probabilities: expected 'variant=probability', got {part!r}")
            try:
                parsed[name.strip()] = float(value)
            except ValueError as e:
                raise ConfigError(
                    f"augment probabilities: expected a number after '{name.strip()}=', got {value!r}"
                ) from e
        probs = parsed
    if not isinstance(probs, Mapping):
        raise ConfigError(f"augment probabilities: expected a mapping or a string, got {type(probs).__name__}")
    out = {name: 0.0 for name in AUGMENT_VARIANTS}
    given = set()
    for name, value in probs.items():
        key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if key not in out:
            raise ConfigError(f"augment probabilities: unknown variant {name!r}; expected one of {AUGMENT_VARIANTS}")
        try:
            v = float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"augment probabilities: expected a number for {name!r}, got {value!r}") from e
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"augment probabilities: expected a probability >= 0 for {name!r}, got {value!r}")
        out[key] = v
        given.add(key)
    if "original" not in given:
        out["original"] = max(0.0, 1.0 - sum(out.values()))
        out["original"] = round(out["original"], 12)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"augment probabilities: expected a total of 1, got {total:g} ({out})")
    return {k: v / total for k, v in out.items()}


def _thresholds(probs: dict[str, float]) -> list[float]:
    """Upper bounds of each variant's interval of ``[0, 1)``; trailing zero-probability variants get ``inf``."""
    cum, acc = [], 0.0
    for name in AUGMENT_VARIANTS:
        acc += probs[name]
        cum.append(acc)
    last = max(i for i, name in enumerate(AUGMENT_VARIANTS) if probs[name] > 0)
    return [c if i < last else math.inf for i, c in enumerate(cum)]


# ==============================================================================================================
# Sampled parameters
# ==============================================================================================================


@dataclasses.dataclass
class AugmentParams:
    """The random choices of one batch (every field a pure function of ``(seed, epoch, image id)``).

    Shape:
        - variant: ``int64 [B]``, the requested variant (index into :data:`AUGMENT_VARIANTS`)
        - crop, bg_crop: ``int64 [B, 4]`` random resized crop boxes ``(x0, y0, w, h)`` of the foreground and of
          its background, in the coordinates of the (square) input images
        - flip, bg_flip: ``bool [B]`` horizontal flips
        - bg_key: ``int64 [B]`` the draw that picks an in-batch partner
    """

    variant: torch.Tensor
    crop: torch.Tensor
    flip: torch.Tensor
    bg_crop: torch.Tensor
    bg_flip: torch.Tensor
    bg_key: torch.Tensor
    seed: int = 0
    epoch: int = 0

    def __len__(self) -> int:
        return int(self.variant.shape[0])

    def slice(self, index) -> "AugmentParams":
        """Rows selected by a slice, an index tensor or a boolean mask."""
        f = {k.name: getattr(self, k.name) for k in dataclasses.fields(self)}
        return AugmentParams(
            **{k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in f.items()}
        )


def sample_resized_crops(
    u: torch.Tensor,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> torch.Tensor:
    """Random resized crop boxes from uniforms, batched and branchless (torchvision's ``get_params`` rule).

    For each row, attempt ``k`` draws an area fraction ``s`` in ``scale`` and a log-uniform aspect ratio ``r`` in
    ``ratio``; ``w = round(sqrt(s * H * W * r))``, ``h = round(sqrt(s * H * W / r))``. The first attempt with
    ``0 < w <= W`` and ``0 < h <= H`` wins, placed uniformly; without one, the central crop clamped to ``ratio``.

    Args:
        u: ``float64 [B, 2 * A + 2]`` uniforms in ``[0, 1)``: per attempt ``(scale, ratio)``, then ``(y, x)``.
        height, width: size of the images the boxes are for.
        scale, ratio: ranges as in :class:`torchvision.transforms.RandomResizedCrop`.

    Returns:
        ``int64 [B, 4]`` boxes ``(x0, y0, w, h)``.
    """
    H, W = int(height), int(width)
    attempts = (u.shape[1] - 2) // 2
    area = float(H * W)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0 : 2 * attempts : 2]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * u[:, 1 : 2 * attempts : 2])
    w = torch.round(torch.sqrt(area * s * r)).to(torch.int64)
    h = torch.round(torch.sqrt(area * s / r)).to(torch.int64)
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first True (0 when none)
    any_ok = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # central fallback
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = H, int(round(H * max(ratio)))
    else:
        fw, fh = W, H
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    # integer placement: floor(u * (n + 1)) in 0..n, as randint(0, n + 1)
    uy, ux = u[:, 2 * attempts], u[:, 2 * attempts + 1]
    y0 = torch.floor(uy * (H - h + 1).to(torch.float64)).to(torch.int64).clamp(max=H - 1)
    x0 = torch.floor(ux * (W - w + 1).to(torch.float64)).to(torch.int64).clamp(max=W - 1)
    y0 = torch.where(any_ok, torch.minimum(y0, H - h), torch.full_like(y0, (H - fh) // 2))
    x0 = torch.where(any_ok, torch.minimum(x0, W - w), torch.full_like(x0, (W - fw) // 2))
    return torch.stack([x0, y0, w, h], dim=1)


def sample_params(
    image_ids: torch.Tensor,
    size: int,
    probs: Mapping[str, float] | str | None,
    seed: int = 0,
    epoch: int = 0,
    random_resized_crop: bool = True,
    flip: bool = True,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
    bg_transform: str = "same",
) -> AugmentParams:
    """Sample the augmentation of every image: a pure function of ``(seed, epoch, image id)``.

    Args:
        image_ids: ``int64 [B]`` ids (the device of the result).
        size: side of the square images the crops are for.
        probs: variant probabilities (see :func:`parse_probs`).
        seed, epoch: what the draws depend on besides the id.
        random_resized_crop: sample crop boxes (else the full image).
        flip: sample horizontal flips with probability ``flip_p`` (else none).
        scale, ratio: random resized crop ranges.
        bg_transform: ``'same'``: the background gets the foreground's crop and flip (the composite is then the
            augmentation of a full-size composite); ``'independent'``: its own draw.

    Returns:
        :class:`AugmentParams`.
    """
    p = parse_probs(probs)
    ids = image_ids.to(torch.int64)
    dev = ids.device
    B = ids.shape[0]
    seed, epoch = int(seed), int(epoch)
    u = hash_uniform(ids, seed, epoch, _S_VARIANT)
    variant = torch.zeros(B, dtype=torch.int64, device=dev)
    for t in _thresholds(p)[:-1]:  # Python scalars: no host-to-device copy (a sync on CUDA)
        variant += (u >= t).to(torch.int64)

    def crops(stream: int) -> torch.Tensor:
        if not random_resized_crop:
            full = torch.zeros(B, 4, dtype=torch.int64, device=dev)
            full[:, 2:] = int(size)
            return full
        k = torch.arange(2 * _ATTEMPTS + 2, device=dev)
        uu = hash_uniform(ids[:, None], seed, epoch, stream, k[None, :])
        return sample_resized_crops(uu, size, size, scale, ratio)

    def flips(stream: int) -> torch.Tensor:
        if not flip:
            return torch.zeros(B, dtype=torch.bool, device=dev)
        return hash_uniform(ids, seed, epoch, stream) < float(flip_p)

    crop, fl = crops(_S_CROP), flips(_S_FLIP)
    if bg_transform == "same":
        bg_crop, bg_fl = crop, fl
    elif bg_transform == "independent":
        bg_crop, bg_fl = crops(_S_BG_CROP), flips(_S_BG_FLIP)
    else:
        raise ConfigError(f"sample_params: expected bg_transform 'same' or 'independent', got {bg_transform!r}")
    key = srl(hash_bits(ids, seed, epoch, _S_BG), 32)
    return AugmentParams(variant, crop, fl, bg_crop, bg_fl, key, seed, epoch)


# ==============================================================================================================
# The resampler: crop + resize + flip, batched
# ==============================================================================================================


def _bilinear_coords(start: torch.Tensor, length: torch.Tensor, out: int, flip: torch.Tensor) -> torch.Tensor:
    """Source coordinate of each of ``out`` samples of ``[start, start + length)`` (half-pixel centres).

    :func:`torch.nn.functional.interpolate`'s ``bilinear``/``align_corners=False`` rule on the cropped slice:
    ``(i + 0.5) * length / out - 0.5``, clamped to ``[0, length - 1]`` (so the taps never leave the crop), then
    offset by ``start``; reversed where ``flip``.
    """
    i = torch.arange(out, device=start.device, dtype=torch.float32)
    src = ((i[None] + 0.5) * (length.to(torch.float32)[:, None] / float(out)) - 0.5).clamp(min=0.0)
    src = torch.minimum(src, (length - 1).to(torch.float32)[:, None]) + start.to(torch.float32)[:, None]
    return torch.where(flip[:, None], src.flip(-1), src)


def _nearest_taps(start: torch.Tensor, length: torch.Tensor, out: int, flip: torch.Tensor) -> torch.Tensor:
    """Source index of each of ``out`` samples of ``[start, start + length)``: :func:`bgsynth.geometry.nearest_map`."""
    i = torch.arange(out, device=start.device, dtype=torch.int64)
    idx = torch.minimum(((2 * i[None] + 1) * length[:, None]) // (2 * out), (length - 1)[:, None]) + start[:, None]
    return torch.where(flip[:, None], idx.flip(-1), idx)


def resized_crop_flip(
    images: torch.Tensor,
    crops: torch.Tensor,
    flips: torch.Tensor,
    size: int | None = None,
    mode: str = "bilinear",
    index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Crop a box of each image, resize it to ``size`` x ``size`` and optionally flip it, for a whole batch at once.

    Args:
        images: ``[N, C, H, W]`` source images (uint8 or floating).
        crops: ``int64 [B, 4]`` boxes ``(x0, y0, w, h)`` inside the images.
        flips: ``bool [B]`` horizontal flips (applied after the resize).
        size: output side (default: ``W``).
        mode: ``'bilinear'`` (images: half-pixel centres, ``F.interpolate(..., align_corners=False)`` on the cropped
            slice without antialiasing, computed by one :func:`torch.nn.functional.grid_sample` call; agrees with it to
            float32 rounding of the sample coordinates; uint8 results are rounded) or ``'nearest'`` (masks: the exact
            integer map of :func:`bgsynth.geometry.nearest_map`, one flat gather).
        index: ``int64 [B]`` row of ``images`` for each output (default: row ``b`` for output ``b``).
        backend: bilinear implementation: ``'grid'`` (one batched :func:`torch.nn.functional.grid_sample` with
            the crop's sample coordinates: no per-sample work, no host synchronisation; the CUDA path),
            ``'kornia'`` (:func:`kornia.geometry.transform.crop_by_indices`, slice + resize per sample, then
            ``hflip``; on the CPU about 2.5x cheaper for uint8 images) or ``'auto'`` (kornia on the CPU, grid
            elsewhere). Both follow ``F.interpolate(..., align_corners=False)`` on the cropped slice and agree
            within one uint8 level.

    Returns:
        ``[B, C, size, size]`` in the dtype of ``images``.

    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> resized_crop_flip(x, torch.tensor([[1, 1, 2, 2]]), torch.tensor([True]), size=2, mode="nearest")[0, 0]
    tensor([[ 6.,  5.],
            [10.,  9.]])
    """
    if images.ndim != 4:
        raise ConfigError(f"resized_crop_flip: expected images [N, C, H, W], got {tuple(images.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ConfigError(f"resized_crop_flip: expected mode 'bilinear' or 'nearest', got {mode!r}")
    if backend not in ("auto", "grid", "kornia"):
        raise ConfigError(f"resized_crop_flip: expected backend 'auto', 'grid' or 'kornia', got {backend!r}")
    B = crops.shape[0]
    if crops.shape != (B, 4) or flips.shape != (B,):
        raise ConfigError(
            f"resized_crop_flip: expected crops [B, 4] and flips [B], got {tuple(crops.shape)} and {tuple(flips.shape)}"
        )
    N, C, H, W = images.shape
    out = int(W if size is None else size)
    src = images if index is None else images[index]
    if src.shape[0] != B:
        raise ConfigError(f"resized_crop_flip: expected {B} source rows (as crops), got {src.shape[0]}")
    crops = crops.to(device=images.device, dtype=torch.int64)
    flips = flips.to(device=images.device, dtype=torch.bool)
    if B == 0:
        return torch.empty((0, C, out, out), dtype=images.dtype, device=images.device)
    x0, y0, w, h = crops.unbind(1)
    no_flip = torch.zeros_like(flips)
    if mode == "nearest":
        # one flat gather: source offset of every output pixel, exact integers
        ry = _nearest_taps(y0, h, out, no_flip)
        rx = _nearest_taps(x0, w, out, flips)
        off = (ry[:, :, None] * W + rx[:, None, :])[:, None]  # [B, 1, out, out]
        off = off + (torch.arange(C, device=off.device) * (H * W)).view(1, C, 1, 1)
        return src.reshape(B, C * H * W).gather(1, off.reshape(B, -1)).view(B, C, out, out)
    if backend == "auto":
        backend = "kornia" if src.device.type == "cpu" else "grid"
    if backend == "kornia":
        # CPU: kornia's slice + resize per sample (uint8 stays uint8: torch's SIMD uint8 bilinear kernel); the box
        # coordinates are host integers here, so its loop costs no device synchronisation
        corners = torch.stack(
            [torch.stack([x0, y0], -1), torch.stack([x0 + w - 1, y0], -1), torch.stack([x0 + w - 1, y0 + h - 1], -1),
             torch.stack([x0, y0 + h - 1], -1)], dim=1,
        )
        res = kornia.geometry.transform.crop_by_indices(
            src, corners.cpu(), (out, out), interpolation="bilinear", align_corners=False
        )
        if res.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            res = res.clone()  # kornia returns a view of the input when no row needs resizing
        rows = flips.nonzero().flatten().cpu()
        if rows.numel():
            res[rows] = kornia.geometry.transform.hflip(res[rows])
        return res
    # bilinear: one fused sampling kernel; the coordinates keep every tap inside the crop
    sx = _bilinear_coords(x0, w, out, flips)
    sy = _bilinear_coords(y0, h, out, no_flip)
    gx = ((2.0 * sx + 1.0) / W - 1.0)[:, None, :].expand(B, out, out)  # grid_sample's normalised coordinates
    gy = ((2.0 * sy + 1.0) / H - 1.0)[:, :, None].expand(B, out, out)
    grid = torch.stack([gx, gy], dim=-1)
    work = src if src.dtype in (torch.float32, torch.float64) else src.to(torch.float32)
    res = torch.nn.functional.grid_sample(work, grid.to(work.dtype), mode="bilinear", padding_mode="border",
                                          align_corners=False)
    if images.dtype == torch.uint8:
        return res.round_().clamp_(0, 255).to(torch.uint8)
    return res.to(images.dtype)


# ==============================================================================================================
# The transform
# ==============================================================================================================


@dataclasses.dataclass
class AugmentedBatch:
    """Output of :class:`BackgroundSwap`, with the provenance of every composite.

    Shape:
        - images: ``[B, 3, C, C]`` in the requested dtype and memory format
        - labels, image_ids: ``int64 [B]`` (the label is the foreground's)
        - variant: ``int64 [B]`` the variant applied (index into :data:`AUGMENT_VARIANTS`)
        - requested: ``int64 [B]`` the variant drawn (differs where a sample fell back to ``original``)
        - bg_ids, bg_labels: ``int64 [B]`` image id and label of the background (``-1`` where none)
        - masks: ``uint8 [B, 1, C, C]`` the augmented foreground masks (``None`` unless asked for)
    """

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    variant: torch.Tensor
    requested: torch.Tensor
    bg_ids: torch.Tensor
    bg_labels: torch.Tensor
    params: AugmentParams
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def fell_back(self) -> torch.Tensor:
        """``bool [B]``: the sample was drawn as another variant but became ``original`` (no mask, no partner)."""
        return self.variant != self.requested

    def variant_names(self) -> list[str]:
        """Names of the applied variants (host sync)."""
        return [AUGMENT_VARIANTS[int(v)] for v in self.variant.tolist()]


def _as_tensor(x, name: str, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"BackgroundSwap: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ConfigError(f"BackgroundSwap: expected {name} of shape {list(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ConfigError(f"BackgroundSwap: expected {name} on {device} (as images), got {x.device}")
    return x.to(dtype)


class BackgroundSwap(nn.Module):
    """Per-sample background swap + random resized crop + flip + normalise, on the device.

    Args:
        probs: variant probabilities (see :func:`parse_probs`); e.g. ``{'mixed_rand': 1.0}``.
        bg_source: ``'pool'`` (backgrounds from a device-resident :class:`~bgsynth.types.BackgroundPool`,
            chosen by :func:`bgsynth.variants.choose_backgrounds` with a per-epoch seed) or ``'batch'``
            (foreground ``i`` onto the Only-BG-T of a sample ``j`` of the same batch, ``j`` drawn from the
            eligible samples by the seeded generator; Mixed-Same falls back to Original when no other sample of the
            class is in the batch).
        pool: the pool for ``bg_source='pool'`` (may also be set later through :attr:`pool`).
        seed: seed of every draw.
        random_resized_crop, flip: the geometric augmentation (applied before compositing).
        scale, ratio: random resized crop ranges (torchvision's defaults).
        flip_p: flip probability.
        bg_transform: ``'same'`` (the background is cropped and flipped with the foreground's parameters) or
            ``'independent'``.
        mean, std: output normalisation (0..1 scale); ``None`` for none.
        dtype: output dtype (``None``: float32 with ``mean``/``std``, uint8 without).
        channels_last: output memory format.
        return_masks: also return the augmented foreground masks.
        kernel_backend: backend of :func:`bgsynth.kernels.composite` / :func:`bgsynth.kernels.tile_fill`.
        resample_backend: bilinear crop implementation of :func:`resized_crop_flip` (``'auto'``: kornia's
            per-sample slice + resize on the CPU, one batched ``grid_sample`` on GPUs).

    Forward args:
        images: ``uint8 [B, 3, C, C]``; masks: ``[B, 1, C, C]`` 0/1 (bool or uint8); labels, image_ids: ``[B]``;
        boxes: inclusive union boxes ``[B, 4]`` in the images' coordinates (needed for ``bg_source='batch'``
        unless ``strips`` and Only-BG-T are given otherwise); strips: ``[B, 4]`` Only-BG-T tiles (computed from
        ``boxes`` with :func:`bgsynth.geometry.tile_strips` when ``None``); has_mask / has_bgt: ``bool [B]``
        (derived when ``None``); epoch: the epoch the draws depend on; params: replay these instead of drawing;
        bgt: ``uint8 [B, 3, C, C]`` the samples' own Only-BG-T images for ``bg_source='batch'`` (the paper's
        full-resolution tiling, ``Batch.bgt``); ``None``: tiled in the crop from ``boxes``/``strips``.

    Attributes:
        counts: ``int64 [len(AUGMENT_VARIANTS), 2]`` on the device: per variant, samples drawn and samples that
            fell back to Original (see :meth:`stats`).

    >>> swap = BackgroundSwap({"no_fg": 1.0}, bg_source="batch", random_resized_crop=False, flip=False)
    >>> x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8); m = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    >>> m[..., :4, :4] = 1
    >>> out = swap(x, m, torch.tensor([0, 1]), torch.tensor([5, 6]), boxes=torch.tensor([[0, 0, 3, 3]] * 2))
    >>> out.images.shape, out.images.dtype
    (torch.Size([2, 3, 8, 8]), torch.float32)
    """

    def __init__(
        self,
        probs: Mapping[str, float] | str | None = None,
        bg_source: str = "pool",
        pool: BackgroundPool | None = None,
        seed: int = 0,
        random_resized_crop: bool = True,
        flip: bool = True,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        bg_transform: str = "same",
        mean: Sequence[float] | None = IN9_MEAN,
        std: Sequence[float] | None = IN9_STD,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        return_masks: bool = False,
        kernel_backend: str = "auto",
        resample_backend: str = "auto",
    ):
        super().__init__()
        self.probs = parse_probs(probs)
        if bg_source not in ("pool", "batch"):
            raise ConfigError(f"BackgroundSwap: expected bg_source 'pool' or 'batch', got {bg_source!r}")
        if bg_transform not in ("same", "independent"):
            raise ConfigError(f"BackgroundSwap: expected bg_transform 'same' or 'independent', got {bg_transform!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"BackgroundSwap: expected 0 < scale[0] <= scale[1] <= 1, got {tuple(scale)}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"BackgroundSwap: expected 0 < ratio[0] <= ratio[1], got {tuple(ratio)}")
        if not 0.0 <= float(flip_p) <= 1.0:
            raise ConfigError(f"BackgroundSwap: expected 0 <= flip_p <= 1, got {flip_p}")
        if (mean is None) != (std is None):
            raise ConfigError("BackgroundSwap: expected both mean and std or neither")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"BackgroundSwap: expected an integer seed, got {seed!r}")
        self.bg_source = bg_source
        self.pool = pool
        self.seed = int(seed)
        self.random_resized_crop = bool(random_resized_crop)
        self.flip = bool(flip)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.bg_transform = bg_transform
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.return_masks = bool(return_masks)
        self.kernel_backend = kernel_backend
        if resample_backend not in ("auto", "grid", "kornia"):
            raise ConfigError(
                f"BackgroundSwap: expected resample_backend 'auto', 'grid' or 'kornia', got {resample_backend!r}"
            )
        self.resample_backend = resample_backend
        self.counts: torch.Tensor | None = None
        self._params: AugmentParams | None = None
        self._stat_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, dev: torch.device):
        """mean/std as float32 tensors on ``dev``, made once (a tensor from a list is a blocking copy on CUDA)."""
        if self.mean is None:
            return None, None
        key = str(dev)
        if key not in self._stat_cache:
            self._stat_cache[key] = (torch.tensor(self.mean, dtype=torch.float32).to(dev),
                                     torch.tensor(self.std, dtype=torch.float32).to(dev))
        return self._stat_cache[key]

    @property
    def needs_background(self) -> bool:
        """Whether any variant with a background (Mixed-*) has a non-zero probability."""
        return self.probs["mixed_rand"] > 0 or self.probs["mixed_same"] > 0

    def extra_repr(self) -> str:
        p = ", ".join(f"{k}={v:g}" for k, v in self.probs.items() if v > 0)
        return (
            f"probs=({p}), bg_source={self.bg_source}, seed={self.seed}, "
            f"random_resized_crop={self.random_resized_crop}, "
            f"scale={self.scale}, flip={self.flip}, bg_transform={self.bg_transform}"
        )

    # ------------------------------------------------------------------------------------------ parameters
    def generate_parameters(self, image_ids: torch.Tensor, size: int, epoch: int = 0) -> AugmentParams:
        """Draw the parameters of a batch (a pure function of ``(seed, epoch, image id)``)."""
        return sample_params(
            image_ids, size, self.probs, self.seed, epoch, self.random_resized_crop, self.flip, self.scale,
            self.ratio, self.flip_p, self.bg_transform,
        )

    def stats(self) -> dict[str, dict[str, int]]:
        """Per variant: samples drawn and samples that fell back to Original, since construction (host sync)."""
        if self.counts is None:
            return {name: {"drawn": 0, "fell_back": 0} for name in AUGMENT_VARIANTS}
        c = self.counts.tolist()
        return {name: {"drawn": int(c[i][0]), "fell_back": int(c[i][1])} for i, name in enumerate(AUGMENT_VARIANTS)}

    # ------------------------------------------------------------------------------------------ backgrounds
    def _pool_rows(self, image_ids, labels, params: AugmentParams):
        """Pool row of each sample's Mixed-Rand and Mixed-Same background (``-1`` where none)."""
        pool = self.pool
        if pool is None:
            raise ConfigError("BackgroundSwap: bg_source='pool' needs a BackgroundPool (pool=...)")
        if pool.device != image_ids.device:
            raise ConfigError(f"BackgroundSwap: expected the pool on {image_ids.device} (as images), got {pool.device}")
        if len(pool) == 0:
            none = torch.full_like(image_ids, -1)
            return none, none, none
        # the variants module's choice is a pure function of (seed, variant, image id): one seed per (seed, epoch)
        epoch_seed = fold(self.seed, params.epoch, _S_EPOCH_SEED)
        none = torch.full_like(image_ids, -1)
        out = {}
        for code, name in ((_MIXED_RAND, "mixed_rand"), (_MIXED_SAME, "mixed_same")):
            if self.probs[name] > 0:
                out[code] = choose_backgrounds(image_ids, labels, name, pool, epoch_seed)
            else:
                out[code] = (none, none, none)
        same = params.variant.to(image_ids.device) == _MIXED_SAME
        return tuple(torch.where(same, a, b) for a, b in zip(out[_MIXED_SAME], out[_MIXED_RAND]))

    @staticmethod
    def _batch_partners(labels, has_bgt, variant, key):
        """Partner ``j`` of each sample within the batch (``-1`` where none): the ``k``-th eligible sample."""
        B = labels.shape[0]
        eye = torch.eye(B, dtype=torch.bool, device=labels.device)
        cand = has_bgt[None, :] & ~eye
        same = labels[:, None] == labels[None, :]
        cand = torch.where((variant == _MIXED_SAME)[:, None], cand & same, cand)
        n = cand.sum(dim=1)
        k = (key * n) >> 32  # uniform in [0, n)
        partner = (cand.cumsum(dim=1) <= k[:, None]).sum(dim=1)
        return torch.where(n > 0, partner, torch.full_like(partner, -1))

    # ------------------------------------------------------------------------------------------ forward
    def apply_batch(self, batch: Batch, epoch: int = 0, params: AugmentParams | None = None) -> AugmentedBatch:
        """:meth:`forward` on a decoded :class:`~bgsynth.types.Batch`."""
        if self.bg_source == "batch" and self.needs_background and batch.tiling == "paper" and batch.bgt is None:
            raise ConfigError(
                "BackgroundSwap: bg_source='batch' with a tiling='paper' batch needs its Only-BG-T images "
                "(decode with only_bg_t=True)"
            )
        return self(
            batch.images, batch.masks, batch.labels, batch.image_ids, boxes=batch.boxes, strips=batch.strips,
            has_mask=batch.has_mask, has_bgt=batch.has_bgt, epoch=epoch, params=params, bgt=batch.bgt,
        )

    def forward(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        image_ids: torch.Tensor,
        boxes: torch.Tensor | None = None,
        strips: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        has_bgt: torch.Tensor | None = None,
        epoch: int = 0,
        params: AugmentParams | None = None,
        bgt: torch.Tensor | None = None,
    ) -> AugmentedBatch:
        from . import kernels

        if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3
                or images.dtype != torch.uint8):
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"BackgroundSwap: expected images uint8 [B, 3, H, W], got {got}")
        B, _, H, W = images.shape
        if H != W:
            raise ConfigError(f"BackgroundSwap: expected square images (the model's crop), got {H}x{W}")
        dev = images.device
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (B, 1, H, W):
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ConfigError(f"BackgroundSwap: expected masks of shape {[B, 1, H, W]}, got {got}")
        if masks.device != dev:
            raise ConfigError(f"BackgroundSwap: expected masks on {dev} (as images), got {masks.device}")
        masks = masks if masks.dtype == torch.uint8 else (masks != 0).to(torch.uint8)
        labels = _as_tensor(labels, "labels", torch.int64, dev, (B,))
        image_ids = _as_tensor(image_ids, "image_ids", torch.int64, dev, (B,))
        if boxes is not None:
            boxes = _as_tensor(boxes, "boxes", torch.int64, dev, (B, 4))
        if strips is None and boxes is not None:
            strips = tile_strips(boxes, H, W)
        if strips is not None:
            strips = _as_tensor(strips, "strips", torch.int64, dev, (B, 4))
        if has_mask is None:
            has_mask = masks.flatten(1).any(dim=1).to(torch.bool)
        else:
            has_mask = _as_tensor(has_mask, "has_mask", torch.bool, dev, (B,))
        if has_bgt is None:
            if strips is not None:
                has_bgt = (strips[:, 2] > 0) & (strips[:, 3] > 0)
            else:
                has_bgt = torch.zeros(B, dtype=torch.bool, device=dev)
        else:
            has_bgt = _as_tensor(has_bgt, "has_bgt", torch.bool, dev, (B,))

        if params is None:
            params = self.generate_parameters(image_ids, W, epoch)
        elif len(params) != B:
            raise ConfigError(f"BackgroundSwap: expected params for {B} samples, got {len(params)}")
        self._params = params
        requested = params.variant.to(dev)

        # ---- backgrounds: where each sample's background comes from (row of a source), validity
        if self.bg_source == "pool" and self.needs_background:
            row, bg_ids, bg_labels = self._pool_rows(image_ids, labels, params)
            bg_images = self.pool.images if len(self.pool) > 0 else None
        elif self.bg_source == "batch" and self.needs_background:
            if bgt is not None:  # the paper's Only-BG-T, made by the decoder at full resolution
                bg_images = _as_tensor(bgt, "bgt", torch.uint8, dev, (B, 3, H, W))
            else:  # crop-space tiling
                if strips is None:
                    raise ConfigError("BackgroundSwap: bg_source='batch' needs boxes or strips to build the Only-BG-T")
                if boxes is None:
                    raise ConfigError("BackgroundSwap: bg_source='batch' needs the union boxes (the region to tile)")
                bg_images = kernels.tile_fill(images, boxes, strips, backend=self.kernel_backend)
            row = self._batch_partners(labels, has_bgt, requested, params.bg_key.to(dev))
            safe = row.clamp(min=0)
            bg_ids = torch.where(row >= 0, image_ids[safe], torch.full_like(row, -1))
            bg_labels = torch.where(row >= 0, labels[safe], torch.full_like(row, -1))
        else:
            row = bg_ids = bg_labels = torch.full((B,), -1, dtype=torch.int64, device=dev)
            bg_images = None

        needs_bg = (requested == _MIXED_RAND) | (requested == _MIXED_SAME)
        needs_mask = requested != _ORIGINAL
        ok = (~needs_mask | has_mask) & (~needs_bg | (row >= 0))
        variant = torch.where(ok, requested, torch.full_like(requested, _ORIGINAL))
        uses_bg = (variant == _MIXED_RAND) | (variant == _MIXED_SAME)
        none = torch.full_like(row, -1)
        bg_ids = torch.where(uses_bg, bg_ids, none)
        bg_labels = torch.where(uses_bg, bg_labels, none)

        counts = torch.zeros(len(AUGMENT_VARIANTS), 2, dtype=torch.int64, device=dev)
        counts[:, 0].index_add_(0, requested, torch.ones_like(requested))
        counts[:, 1].index_add_(0, requested, (~ok).to(torch.int64))
        self.counts = counts if self.counts is None or self.counts.device != dev else self.counts + counts

        # ---- geometry first: foreground, mask and background get their crop + flip, then one composite pass
        crop, flip = params.crop.to(dev), params.flip.to(dev)
        fg = resized_crop_flip(images, crop, flip, W, "bilinear", backend=self.resample_backend)
        m = resized_crop_flip(masks, crop, flip, W, "nearest")
        # keep: where the output takes the foreground image; Original keeps everything, No-FG the complement of M
        keep = torch.where((variant == _ORIGINAL)[:, None, None, None], torch.ones_like(m), m)
        keep = torch.where((variant == _NO_FG)[:, None, None, None], 1 - m, keep)
        if bg_images is not None:
            if dev.type == "cpu":
                # resample only the backgrounds that are used (on the CPU the row selection costs no device sync)
                use = uses_bg.nonzero().flatten()
                bg_index = torch.where(uses_bg, uses_bg.to(torch.int64).cumsum(0) - 1, none)
            else:
                use = torch.arange(B, device=dev)
                bg_index = torch.where(uses_bg, use, none)
            bg = resized_crop_flip(
                bg_images, params.bg_crop.to(dev)[use], params.bg_flip.to(dev)[use], W, "bilinear",
                index=row.clamp(min=0)[use], backend=self.resample_backend,
            )
        else:
            bg, bg_index = None, None
        mean, std = self._stats(dev)
        out = kernels.composite(
            fg, keep, bg, bg_index, mean=mean, std=std, dtype=self.dtype,
            channels_last=self.channels_last, backend=self.kernel_backend,
        )
        return AugmentedBatch(
            images=out, labels=labels, image_ids=image_ids, variant=variant, requested=requested, bg_ids=bg_ids,
            bg_labels=bg_labels, params=params, masks=m if self.return_masks else None,
        )


# ==============================================================================================================
# The training iterator
# ==============================================================================================================


class TrainIterator:
    """``(images, labels)`` training batches of one split, background-swapped on the device.

    Decodes the split through :func:`bgsynth.pipeline.create_loader` (DALI where available), keeps the decoded
    uint8 crops, masks and boxes resident on ``device`` when they fit (``cache``), and per epoch yields them in an
    order that is a pure function of ``(seed, epoch, image id)``, augmented by :class:`BackgroundSwap`.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or the path of one.
        split: split to train on (``None``: every image of the index).
        geometry: decode geometry (default ``CropGeometry()``); the random resized crop works inside its crop.
        batch_size: samples per batch.
        device: where batches are made (``'auto'``: CUDA when present).
        seed: seed of the order and of every augmentation draw.
        epoch: first epoch (each full pass advances it; :meth:`set_epoch` replays one).
        probs: variant probabilities (:func:`parse_probs`), e.g. ``{'mixed_rand': 1.0}``.
        bg_source: ``'pool'`` or ``'batch'`` (see :class:`BackgroundSwap`).
        pool: a :class:`~bgsynth.types.BackgroundPool` (built from the split's Only-BG-T when needed
            and not given: from the cache itself when unsharded, else with
            :func:`bgsynth.pipeline.build_background_pool`, so every shard draws from the same pool).
        random_resized_crop, flip, scale, ratio, bg_transform: the geometric augmentation.
        shard_id, num_shards: this process trains on ``shard_ids(ids, shard_id, num_shards)``
            (:func:`bgsynth.distributed.shard_ids`).
        backend: decode backend.
        mean, std, dtype, channels_last: output of the batches (``channels_last=None``: on for CUDA).
        drop_last: drop the last, partial batch of an epoch (BatchNorm dislikes tiny batches).
        shuffle: reshuffle every epoch (else ascending image id).
        cache: ``True``, ``False`` or ``'auto'`` (cache when the decoded shard takes at most
            ``cache_limit_bytes``). Uncached, each epoch decodes windows of ``window_batches`` batches of the
            epoch's order (one loader per window) and shuffles within each window by the same order.
        num_threads: decoder threads.
        progress: tqdm bars while decoding the cache and the pool.
        kernel_backend: backend of the pixel kernels.

    Attributes:
        swap: the :class:`BackgroundSwap`.
        ids: image ids of this shard (ascending).
        last: the :class:`AugmentedBatch` of the latest batch (provenance: variant, background ids, params).

    .. note:: The order reshuffles per epoch as ``argsort(hash(seed, epoch, id))`` over this shard's ids. The
       shard itself is the same every epoch (the one sharding rule), which lets each rank keep its images decoded.

    >>> # it = TrainIterator("index.json", probs={"mixed_rand": 1.0}, batch_size=64)
    >>> # for images, labels in it: ...
    """

    def __init__(
        self,
        index,
        split: str | None = "train",
        geometry: CropGeometry | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        epoch: int = 0,
        probs: Mapping[str, float] | str | None = None,
        bg_source: str = "pool",
        pool: BackgroundPool | None = None,
        random_resized_crop: bool = True,
        flip: bool = True,
        shard_id: int = 0,
        num_shards: int = 1,
        backend: str = "auto",
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        bg_transform: str = "same",
        mean: Sequence[float] | None = IN9_MEAN,
        std: Sequence[float] | None = IN9_STD,
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        drop_last: bool = True,
        shuffle: bool = True,
        cache: bool | str = "auto",
        cache_limit_bytes: int = 2 << 30,
        window_batches: int = 32,
        num_threads: int | None = None,
        progress: bool = False,
        kernel_backend: str = "auto",
        tiling: str = "paper",
    ):
        from .distributed import shard_ids
        from .index import DatasetIndex

        if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
            index = DatasetIndex.load(index)
        if not isinstance(index, DatasetIndex):
            raise ConfigError(f"TrainIterator: expected a DatasetIndex or an index path, got {type(index).__name__}")
        for name, v, lo in (("batch_size", batch_size, 1), ("epoch", epoch, 0), ("window_batches", window_batches, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"TrainIterator: expected {name} to be an integer >= {lo}, got {v!r}")
        if cache not in (True, False, "auto"):
            raise ConfigError(f"TrainIterator: expected cache True, False or 'auto', got {cache!r}")
        if tiling not in TILINGS:
            raise ConfigError(f"TrainIterator: expected tiling in {TILINGS}, got {tiling!r}")
        self.tiling = tiling
        self.geometry = CropGeometry() if geometry is None else geometry
        if not isinstance(self.geometry, CropGeometry):
            raise ConfigError(
                f"TrainIterator: expected geometry to be a CropGeometry, got {type(self.geometry).__name__}"
            )
        self.index = index.select(split=split) if split is not None else index
        if len(self.index) == 0:
            raise ConfigError(f"TrainIterator: split {split!r} of {index.path or '<in-memory index>'} has no images")
        self.split = split
        self.ids = shard_ids(self.index.ids, shard_id, num_shards)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.backend = backend
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.window_batches = window_batches
        self.num_threads = num_threads
        self.progress = bool(progress)
        self.kernel_backend = kernel_backend
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.swap = BackgroundSwap(
            probs, bg_source=bg_source, pool=pool, seed=self.seed, random_resized_crop=random_resized_crop,
            flip=flip, scale=scale, ratio=ratio, bg_transform=bg_transform, mean=mean, std=std, dtype=dtype,
            channels_last=channels_last, kernel_backend=kernel_backend,
        )
        # bytes per cached image: crop + mask (+ the paper Only-BG-T crop when backgrounds come from the batch/cache)
        self._bgt_needed = tiling == "paper" and self.swap.needs_background
        need = len(self.ids) * (4 + 3 * self._bgt_needed) * self.geometry.crop**2
        self.cache = bool(cache) if cache != "auto" else need <= cache_limit_bytes
        self.store: Batch | None = None
        self.last: AugmentedBatch | None = None
        self.rejects: list[dict] = []

    # ------------------------------------------------------------------------------------------ setup
    def _loader(self, ids: Sequence[int]):
        from .pipeline import create_loader

        return create_loader(
            self.index, backend=self.backend, geometry=self.geometry, batch_size=max(self.batch_size, 64),
            device=self.device, ids=ids, num_threads=self.num_threads, tiling=self.tiling,
            only_bg_t=self._bgt_needed,
        )

    def _decode(self, ids: Sequence[int], desc: str) -> Batch | None:
        loader = self._loader(ids)
        batches = loader
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=desc, unit="batch", leave=False)
        try:
            parts = [b.to(self.device) for b in batches]
        finally:
            loader.close()
        self.rejects.extend(getattr(loader, "rejects", []))
        return Batch.cat(parts) if parts else None

    def prepare(self) -> "TrainIterator":
        """Decode the cache and build the pool now (otherwise done by the first iteration)."""
        if self.cache and self.store is None:
            self.store = self._decode(self.ids, "decode train split")
            if self.store is None:
                raise ConfigError(f"TrainIterator: no image of split {self.split!r} could be decoded")
        if self.swap.bg_source == "pool" and self.swap.needs_background and self.swap.pool is None:
            if self.store is not None and self.num_shards == 1:
                # the cache holds the whole split: its Only-BG-T rows are the pool (no second decode)
                self.swap.pool = background_pool_from_batch(self.store, backend=self.kernel_backend)
            else:
                from .pool import build_background_pool

                self.swap.pool = build_background_pool(
                    self.index, geometry=self.geometry, backend=self.backend, device=self.device,
                    num_threads=self.num_threads, progress=self.progress, tiling=self.tiling,
                )
            if len(self.swap.pool) == 0:
                warnings.warn(
                    "TrainIterator: the background pool is empty (no image has an Only-BG-T); Mixed-* samples fall "
                    "back to Original",
                    stacklevel=2,
                )
        return self

    @property
    def pool(self) -> BackgroundPool | None:
        return self.swap.pool

    # ------------------------------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next pass (order and augmentation draws depend on it)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"TrainIterator.set_epoch: expected an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def num_samples(self) -> int:
        """Samples of this shard per epoch (after decoding, the images that decoded)."""
        return len(self.store) if self.store is not None else len(self.ids)

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, image_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """Positions of ``image_ids`` in the epoch's order: ``argsort(hash(seed, epoch, id))`` (or by id)."""
        key = hash_bits(image_ids, self.seed, epoch, _S_ORDER) if self.shuffle else image_ids.to(torch.int64)
        return torch.argsort(key, stable=True)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        bs = self.batch_size
        if self.store is not None:
            perm = self.order(self.store.image_ids, epoch)
            n = len(perm)
            stop = n - n % bs if self.drop_last else n
            for k in range(0, stop, bs):
                yield self.store.slice(perm[k : k + bs])
            return
        # streaming: windows of the epoch's order, each decoded by one loader and re-ordered by the same key
        ids_t = torch.tensor(self.ids, dtype=torch.int64)
        order_ids = ids_t[self.order(ids_t, epoch)].tolist()
        win = bs * self.window_batches
        carry: Batch | None = None
        for w in range(0, len(order_ids), win):
            batch = self._decode(order_ids[w : w + win], f"decode window {w // win}")
            if batch is None:
                continue
            batch = batch.slice(self.order(batch.image_ids, epoch))
            if carry is not None:
                batch = Batch.cat([carry, batch])
                carry = None
            n = len(batch)
            full = n - n % bs
            for k in range(0, full, bs):
                yield batch.slice(slice(k, k + bs))
            if full < n:
                carry = batch.slice(slice(full, n))
        if carry is not None and not self.drop_last:
            yield carry

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.prepare()
        epoch = self.epoch
        for batch in self._batches(epoch):
            out = self.swap.apply_batch(batch, epoch=epoch)
            self.last = out
            yield out.images, out.labels
        self.epoch = epoch + 1
