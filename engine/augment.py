"""Online background-swap augmentation: the paper's training variants made per batch on the device.

The paper's remedy for background reliance is training on Mixed-Rand; its authors wrote every training variant
to disk first. Here each sample of a batch becomes, with configurable probabilities, one of the variants of
:data:`AUGMENT_VARIANTS`, a subset of the registry :data:`bgsynth.variants.VARIANTS` (names and codes are the
registry's):

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

What lives here (the functional floor: pure functions of tensors, and one transform):

* :class:`SwapConfig`, the settings of a swap, and :func:`parse_probs`;
* :func:`sample_params` -> :class:`AugmentParams`: every random choice, sampled apart from its application as in
  kornia's augmentation generators, and a pure function of ``(seed, epoch, image id)`` on :mod:`bgsynth.rng` (a
  counter-based hash, no global RNG state). The variant, crop, flip and pool background of a sample therefore do
  not depend on the batch size, the order of the samples, the number of workers or the number of shards, and any
  batch can be replayed. (An in-batch background, ``bg_source='batch'``, is by nature drawn from the batch the
  sample is in.) :func:`sample_resized_crops` is the batched rule of torchvision's ``RandomResizedCrop`` on these
  uniforms;
* :func:`resized_crop_flip`: the geometric op, applying the sampled boxes and flips with kornia
  (:func:`kornia.geometry.transform.crop_by_indices`, slice + bilinear resize with half-pixel centres, as kornia's
  own ``RandomResizedCrop`` in its default slice mode, and :func:`kornia.geometry.transform.hflip`);
* :class:`BackgroundSwap`: the transform. Called on a batch it returns an :class:`AugmentedBatch` (composite,
  labels, provenance); it is also a kornia augmentation usable inside
  :class:`kornia.augmentation.AugmentationSequential` with ``data_keys=["input", "mask"]`` (see its docstring).
  Compositing and crop-space tiling go through the variants layer (:func:`bgsynth.variants.composite`,
  :func:`bgsynth.variants.tile_in_crop`). A caller may choose the pool rows itself
  (``apply_batch(..., backgrounds=(rows, bg_ids, bg_labels))``): the composed datasets of :mod:`bgsynth.compose`
  go through the same path with their rule's backgrounds.

The training iterator that decodes a split and feeds it through the swap is
:class:`bgsynth.trainloader.TrainIterator` (stateful floor).

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
from typing import Any, Mapping, Sequence

import kornia
import torch
from kornia.augmentation import RandomTransplantation
from kornia.constants import DataKey
from kornia.core.check import KORNIA_CHECK_SHAPE

from .classes import IN9_MEAN, IN9_STD
from .errors import ConfigError
from .geometry import tile_strips
from .rng import fold, hash_bits, hash_uniform, srl
from .types import BackgroundPool, Batch
from .variants import VARIANTS, choose_backgrounds, composite, resolve_variants, tile_in_crop

__all__ = [
    "AUGMENT_VARIANTS",
    "AugmentParams",
    "AugmentedBatch",
    "BackgroundSwap",
    "SwapConfig",
    "SWAP_OPTIONS",
    "parse_probs",
    "resized_crop_flip",
    "sample_params",
    "sample_resized_crops",
    "swap_config",
]

#: The variants a training sample can become: a subset of :data:`bgsynth.variants.VARIANTS`, in the order of
#: their probability intervals in ``[0, 1)`` (the draw). ``AugmentParams.variant`` holds their registry codes.
AUGMENT_VARIANTS: tuple[str, ...] = ("original", "mixed_rand", "mixed_same", "only_fg", "no_fg")
_CODE = {name: VARIANTS[name].code for name in AUGMENT_VARIANTS}
_NAME = {code: name for name, code in _CODE.items()}
_ORIGINAL, _MIXED_RAND, _MIXED_SAME, _ONLY_FG, _NO_FG = (_CODE[n] for n in AUGMENT_VARIANTS)
_NUM_CODES = max(v.code for v in VARIANTS.values()) + 1

# Streams of the counter-based generator: every random choice has its own, so adding one never shifts another.
# (_S_ORDER, 7, is the training order's: bgsynth.trainloader.)
_S_VARIANT, _S_CROP, _S_FLIP, _S_BG, _S_BG_CROP, _S_BG_FLIP, _S_EPOCH_SEED = 1, 2, 3, 4, 5, 6, 8
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before the central fallback


# ==============================================================================================================
# Configuration
# ==============================================================================================================


def parse_probs(probs: Mapping[str, float] | str | None) -> dict[str, float]:
    """Resolve augmentation probabilities into one float per variant of :data:`AUGMENT_VARIANTS`.

    Variants not named get 0, except ``original``, which takes the remainder ``1 - sum(others)`` when it is not
    named. The result must sum to 1. Names are resolved by :func:`bgsynth.variants.resolve_variants` (registry
    names or the paper's, ``'Mixed-Rand'``), and must be augmentation variants.

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
        probs = _parse_prob_string(probs)
    if not isinstance(probs, Mapping):
        raise ConfigError(f"augment probabilities: expected a mapping or a string, got {type(probs).__name__}")
    out = {name: 0.0 for name in AUGMENT_VARIANTS}
    given = set()
    for name, value in probs.items():
        key = _augment_name(name)
        try:
            v = float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"augment probabilities: expected a number for {name!r}, got {value!r}") from e
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"augment probabilities: expected a probability >= 0 for {name!r}, got {value!r}")
        out[key] = v
        given.add(key)
    if "original" not in given:
        out["original"] = round(max(0.0, 1.0 - sum(out.values())), 12)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"augment probabilities: expected a total of 1, got {total:g} ({out})")
    return {k: v / total for k, v in out.items()}


def _parse_prob_string(text: str) -> dict[str, float]:
    """``"mixed_rand=0.5,only_fg=0.1"`` -> ``{'mixed_rand': 0.5, 'only_fg': 0.1}``."""
    parsed: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"augment probabilities: expected 'variant=probability', got {part!r}")
        try:
            parsed[name.strip()] = float(value)
        except ValueError as e:
            raise ConfigError(f"augment probabilities: expected a number after '{name.strip()}=', got {value!r}") from e
    return parsed


def _augment_name(name) -> str:
    """Registry name of an augmentation variant (ConfigError for anything else)."""
    try:
        key = resolve_variants([str(name)])[0]
    except ConfigError:
        key = None
    if key not in _CODE:
        raise ConfigError(f"augment probabilities: unknown variant {name!r}; expected one of {AUGMENT_VARIANTS}")
    return key


def _float_pair(value, name: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ConfigError(f"SwapConfig: expected {name} as a pair (low, high), got {value!r}")
    return float(value[0]), float(value[1])


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """The settings of a :class:`BackgroundSwap` (validated here, once).

    Attributes:
        probs: variant probabilities (see :func:`parse_probs`), stored resolved over :data:`AUGMENT_VARIANTS`.
        bg_source: ``'pool'`` (backgrounds from a device-resident :class:`~bgsynth.types.BackgroundPool`, chosen
            by :func:`bgsynth.variants.choose_backgrounds` with a per-epoch seed) or ``'batch'`` (foreground ``i``
            onto the Only-BG-T of a sample ``j`` of the same batch, drawn from the eligible samples by the seeded
            generator; Mixed-Same falls back to Original when no other sample of the class is in the batch).
        seed: seed of every draw.
        random_resized_crop, flip: the geometric augmentation (applied before compositing).
        scale, ratio: random resized crop ranges (torchvision's defaults).
        flip_p: flip probability.
        bg_transform: ``'same'`` (the background gets the foreground's crop and flip: the composite is then the
            augmentation of a full-size composite) or ``'independent'`` (its own draw).
        mean, std: output normalisation (0..1 scale); ``None`` for none.
        dtype: output dtype (``None``: float32 with ``mean``/``std``, uint8 without).
        channels_last: output memory format.
        return_masks: also return the augmented foreground masks.
        kernel_backend: backend of the pixel kernels behind :func:`bgsynth.variants.composite` and
            :func:`bgsynth.variants.tile_in_crop`.
    """

    probs: Mapping[str, float] | str | None = None
    bg_source: str = "pool"
    seed: int = 0
    random_resized_crop: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    bg_transform: str = "same"
    mean: tuple[float, ...] | None = IN9_MEAN
    std: tuple[float, ...] | None = IN9_STD
    dtype: torch.dtype | None = None
    channels_last: bool = False
    return_masks: bool = False
    kernel_backend: str = "auto"

    def __post_init__(self):
        put = object.__setattr__  # frozen: normalise the given values once
        put(self, "probs", parse_probs(self.probs))
        put(self, "scale", _float_pair(self.scale, "scale"))
        put(self, "ratio", _float_pair(self.ratio, "ratio"))
        if self.bg_source not in ("pool", "batch"):
            raise ConfigError(f"SwapConfig: expected bg_source 'pool' or 'batch', got {self.bg_source!r}")
        if self.bg_transform not in ("same", "independent"):
            raise ConfigError(f"SwapConfig: expected bg_transform 'same' or 'independent', got {self.bg_transform!r}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"SwapConfig: expected 0 < scale[0] <= scale[1] <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"SwapConfig: expected 0 < ratio[0] <= ratio[1], got {self.ratio}")
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ConfigError(f"SwapConfig: expected 0 <= flip_p <= 1, got {self.flip_p}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("SwapConfig: expected both mean and std or neither")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"SwapConfig: expected an integer seed, got {self.seed!r}")
        if self.mean is not None:
            put(self, "mean", tuple(float(v) for v in self.mean))
            put(self, "std", tuple(float(v) for v in self.std))
        put(self, "flip_p", float(self.flip_p))

    @property
    def needs_background(self) -> bool:
        """Whether any variant with a background (Mixed-*) has a non-zero probability."""
        return self.probs["mixed_rand"] > 0 or self.probs["mixed_same"] > 0

    def replace(self, **changes) -> "SwapConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: the field names of :class:`SwapConfig`
SWAP_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SwapConfig))


def swap_config(config: SwapConfig | None = None, **options) -> SwapConfig:
    """A :class:`SwapConfig` from a given one (or the defaults) with ``options`` changed; ``None`` values are
    "not said". Unknown names are an error that lists the valid ones.

    >>> swap_config(probs="mixed_rand=1", flip=False).flip
    False
    """
    unknown = sorted(k for k in options if k not in SWAP_OPTIONS)
    if unknown:
        raise ConfigError(f"BackgroundSwap: unknown option(s) {unknown}; expected SwapConfig fields "
                          f"{list(SWAP_OPTIONS)}")
    said = {k: v for k, v in options.items() if v is not None or k in ("mean", "std", "dtype")}
    if config is None:
        return SwapConfig(**said)
    if not isinstance(config, SwapConfig):
        raise ConfigError(f"BackgroundSwap: expected config to be a SwapConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **said) if said else config


# ==============================================================================================================
# Sampled parameters
# ==============================================================================================================


@dataclasses.dataclass
class AugmentParams:
    """The random choices of one batch (every field a pure function of ``(seed, epoch, image id)``).

    Shape:
        - variant: ``int64 [B]``, the requested variant (its :data:`bgsynth.variants.VARIANTS` code)
        - crop, bg_crop: ``int64 [B, 4]`` random resized crop boxes ``(x0, y0, w, h)`` of the foreground and of
          its background, in the coordinates of the (square) input images
        - flip, bg_flip: ``bool [B]`` horizontal flips
        - bg_key: ``int64 [B]`` the draw that picks an in-batch partner

    Attributes:
        resized: ``False`` when every box is the whole image (no random resized crop was drawn): the geometric op
            then only flips.
    """

    variant: torch.Tensor
    crop: torch.Tensor
    flip: torch.Tensor
    bg_crop: torch.Tensor
    bg_flip: torch.Tensor
    bg_key: torch.Tensor
    seed: int = 0
    epoch: int = 0
    resized: bool = True

    def __len__(self) -> int:
        return int(self.variant.shape[0])

    def slice(self, index) -> "AugmentParams":
        """Rows selected by a slice, an index tensor or a boolean mask."""
        f = {k.name: getattr(self, k.name) for k in dataclasses.fields(self)}
        return AugmentParams(**{k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in f.items()})

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The parameters as kornia keeps them (``aug._params``): a dict of tensors."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("seed", "epoch", "resized"):
            d[k] = torch.tensor(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AugmentParams":
        """Back from :meth:`to_dict` (extra keys, e.g. kornia's ``batch_prob``, are ignored)."""
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for k, cast in (("seed", int), ("epoch", int), ("resized", bool)):
            if isinstance(kw.get(k), torch.Tensor):
                kw[k] = cast(kw[k].item())
        return cls(**kw)


def sample_resized_crops(
    u: torch.Tensor,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> torch.Tensor:
    """Random resized crop boxes from uniforms, batched and branchless (torchvision's ``get_params`` rule).

    The parameter sampler of the random resized crop: kornia's and torchvision's draw from torch's global RNG, ours
    from the hashed uniforms ``u`` (so a box is a pure function of ``(seed, epoch, image id)``). For each row,
    attempt ``k`` draws an area fraction ``s`` in ``scale`` and a log-uniform aspect ratio ``r`` in ``ratio``;
    ``w = round(sqrt(s * H * W * r))``, ``h = round(sqrt(s * H * W / r))``. The first attempt with ``0 < w <= W``
    and ``0 < h <= H`` wins, placed uniformly; without one, the central crop clamped to ``ratio``.

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


def _variant_codes(u: torch.Tensor, probs: Mapping[str, float]) -> torch.Tensor:
    """The registry code of the variant whose interval of ``[0, 1)`` holds each uniform.

    The intervals follow :data:`AUGMENT_VARIANTS`' order; trailing zero-probability variants get an infinite bound
    (never drawn). Python scalars throughout: no host-to-device copy (a sync on CUDA).
    """
    names = AUGMENT_VARIANTS
    last = max(i for i, name in enumerate(names) if probs[name] > 0)
    code = torch.full(u.shape, _CODE[names[0]], dtype=torch.int64, device=u.device)
    acc = 0.0
    for k in range(len(names) - 1):
        acc += probs[names[k]]
        bound = acc if k < last else math.inf
        # the index of the interval is the number of bounds <= u; its code telescopes over the steps
        code += (u >= bound).to(torch.int64) * (_CODE[names[k + 1]] - _CODE[names[k]])
    return code


def sample_params(
    image_ids: torch.Tensor,
    size: int,
    probs: Mapping[str, float] | str | None = None,
    seed: int | None = None,
    epoch: int = 0,
    *,
    config: SwapConfig | None = None,
    **options,
) -> AugmentParams:
    """Sample the augmentation of every image: a pure function of ``(seed, epoch, image id)``.

    Args:
        image_ids: ``int64 [B]`` ids (the device of the result).
        size: side of the square images the crops are for.
        probs: variant probabilities (see :func:`parse_probs`; ``None``: the config's, by default Original only).
        seed, epoch: what the draws depend on besides the id (``seed=None``: the config's).
        config: a :class:`SwapConfig` (the draw reads ``probs``, ``seed``, ``random_resized_crop``, ``flip``,
            ``scale``, ``ratio``, ``flip_p`` and ``bg_transform``); ``**options`` change its fields.

    Returns:
        :class:`AugmentParams`.

    >>> p = sample_params(torch.arange(4), 32, {"mixed_rand": 1.0}, seed=0, random_resized_crop=False)
    >>> p.variant.tolist(), p.crop[0].tolist()
    ([6, 6, 6, 6], [0, 0, 32, 32])
    """
    cfg = swap_config(config, probs=probs, seed=seed, **options)
    ids = image_ids.to(torch.int64)
    seed, epoch = cfg.seed, int(epoch)
    variant = _variant_codes(hash_uniform(ids, seed, epoch, _S_VARIANT), cfg.probs)
    crop, fl = _sample_crops(ids, size, cfg, epoch, _S_CROP), _sample_flips(ids, cfg, epoch, _S_FLIP)
    if cfg.bg_transform == "same":
        bg_crop, bg_fl = crop, fl
    else:
        bg_crop, bg_fl = _sample_crops(ids, size, cfg, epoch, _S_BG_CROP), _sample_flips(ids, cfg, epoch, _S_BG_FLIP)
    key = srl(hash_bits(ids, seed, epoch, _S_BG), 32)
    return AugmentParams(variant, crop, fl, bg_crop, bg_fl, key, seed, epoch, cfg.random_resized_crop)


def _sample_crops(ids: torch.Tensor, size: int, cfg: SwapConfig, epoch: int, stream: int) -> torch.Tensor:
    if not cfg.random_resized_crop:
        full = torch.zeros(ids.shape[0], 4, dtype=torch.int64, device=ids.device)
        full[:, 2:] = int(size)
        return full
    k = torch.arange(2 * _ATTEMPTS + 2, device=ids.device)
    uu = hash_uniform(ids[:, None], cfg.seed, epoch, stream, k[None, :])
    return sample_resized_crops(uu, size, size, cfg.scale, cfg.ratio)


def _sample_flips(ids: torch.Tensor, cfg: SwapConfig, epoch: int, stream: int) -> torch.Tensor:
    if not cfg.flip:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    return hash_uniform(ids, cfg.seed, epoch, stream) < cfg.flip_p


# ==============================================================================================================
# The geometric op: crop + resize + flip, batched, with kornia
# ==============================================================================================================


def _nearest_taps(start: torch.Tensor, length: torch.Tensor, out: int, flip: torch.Tensor) -> torch.Tensor:
    """Source index of each of ``out`` samples of ``[start, start + length)``: :func:`bgsynth.geometry.nearest_map`."""
    i = torch.arange(out, device=start.device, dtype=torch.int64)
    idx = torch.minimum(((2 * i[None] + 1) * length[:, None]) // (2 * out), (length - 1)[:, None]) + start[:, None]
    return torch.where(flip[:, None], idx.flip(-1), idx)


def _nearest_crop_flip(src: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, out: int) -> torch.Tensor:
    """Masks: one flat gather with the exact integer map of :func:`bgsynth.geometry.nearest_map`.

    Not kornia's ``'nearest-exact'`` resize: torch computes its source index in float32, which differs from the
    exact rule the decoders resize masks with in a few size pairs (6 of 2334 tested, e.g. 14 -> 23 px, one column
    each), and a mask must keep the geometry of the decoded one.
    """
    B, C, H, W = src.shape
    x0, y0, w, h = crops.unbind(1)
    ry = _nearest_taps(y0, h, out, torch.zeros_like(flips))
    rx = _nearest_taps(x0, w, out, flips)
    off = (ry[:, :, None] * W + rx[:, None, :])[:, None]  # [B, 1, out, out]
    off = off + (torch.arange(C, device=off.device) * (H * W)).view(1, C, 1, 1)
    return src.reshape(B, C * H * W).gather(1, off.reshape(B, -1)).view(B, C, out, out)


def _bilinear_crop(src: torch.Tensor, crops: torch.Tensor, out: int) -> torch.Tensor:
    """Images: :func:`kornia.geometry.transform.crop_by_indices` (slice + bilinear resize, half-pixel centres).

    On the CPU uint8 stays uint8 (torch's SIMD uint8 bilinear kernel); elsewhere the resize runs in float32 and
    is rounded back.
    """
    x0, y0, w, h = crops.unbind(1)
    corners = torch.stack(
        [torch.stack([x0, y0], -1), torch.stack([x0 + w - 1, y0], -1), torch.stack([x0 + w - 1, y0 + h - 1], -1),
         torch.stack([x0, y0 + h - 1], -1)], dim=1,
    )
    work = src if src.device.type == "cpu" or src.is_floating_point() else src.float()
    res = kornia.geometry.transform.crop_by_indices(work, corners.cpu(), (out, out), interpolation="bilinear",
                                                    align_corners=False)
    if work is not src:
        return res.round_().clamp_(0, 255).to(src.dtype)
    if res.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        res = res.clone()  # kornia returns a view of the input when no row needs resizing
    return res


def resized_crop_flip(
    images: torch.Tensor,
    crops: torch.Tensor | None,
    flips: torch.Tensor,
    size: int | None = None,
    mode: str = "bilinear",
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop a box of each image, resize it to ``size`` x ``size`` and optionally flip it, for a whole batch.

    The application half of the random resized crop + flip: the boxes and flips are sampled apart
    (:func:`sample_params`) and handed in.

    Args:
        images: ``[N, C, H, W]`` source images (uint8 or floating).
        crops: ``int64 [B, 4]`` boxes ``(x0, y0, w, h)`` inside the images, or ``None`` for the whole image (no
            resize: ``size`` must be the images' side; nothing is read back to the host).
        flips: ``bool [B]`` horizontal flips (applied after the resize).
        size: output side (default: ``W``).
        mode: ``'bilinear'`` (images: :func:`kornia.geometry.transform.crop_by_indices`, the slice resized with
            ``align_corners=False`` and no antialiasing, as kornia's ``RandomResizedCrop`` in slice mode; uint8
            results rounded; it reads the boxes back to the host, one synchronisation on CUDA, and resizes per
            sample) or ``'nearest'`` (masks: the exact integer map of :func:`bgsynth.geometry.nearest_map`, one
            flat gather on the device). Flips: :func:`kornia.geometry.transform.hflip`, selected per row.
        index: ``int64 [B]`` row of ``images`` for each output (default: row ``b`` for output ``b``).

    Returns:
        ``[B, C, size, size]`` in the dtype of ``images`` (a new tensor).

    >>> x = torch.arange(16.).view(1, 1, 4, 4)
    >>> resized_crop_flip(x, torch.tensor([[1, 1, 2, 2]]), torch.tensor([True]), size=2, mode="nearest")[0, 0]
    tensor([[ 6.,  5.],
            [10.,  9.]])
    """
    if not isinstance(images, torch.Tensor) or not KORNIA_CHECK_SHAPE(images, ["N", "C", "H", "W"], raises=False):
        raise ConfigError(f"resized_crop_flip: expected images [N, C, H, W], got {_describe(images)}")
    if mode not in ("bilinear", "nearest"):
        raise ConfigError(f"resized_crop_flip: expected mode 'bilinear' or 'nearest', got {mode!r}")
    B = flips.shape[0]
    if flips.shape != (B,) or (crops is not None and crops.shape != (B, 4)):
        got = None if crops is None else tuple(crops.shape)
        raise ConfigError(f"resized_crop_flip: expected crops [B, 4] and flips [B], got {got} and {tuple(flips.shape)}")
    N, C, H, W = images.shape
    out = int(W if size is None else size)
    if crops is None and (out, out) != (H, W):
        raise ConfigError(f"resized_crop_flip: crops=None keeps the images' size {H}x{W}, got size={out}")
    src = images if index is None else images[index]
    if src.shape[0] != B:
        raise ConfigError(f"resized_crop_flip: expected {B} source rows (as flips), got {src.shape[0]}")
    flips = flips.to(device=images.device, dtype=torch.bool)
    if B == 0:
        return torch.empty((0, C, out, out), dtype=images.dtype, device=images.device)
    if crops is None:
        res = src if index is not None else src.clone()
    elif mode == "nearest":
        return _nearest_crop_flip(src, crops.to(device=images.device, dtype=torch.int64), flips, out)
    else:
        res = _bilinear_crop(src, crops.to(dtype=torch.int64), out)
    if mode == "nearest" or res.dtype != torch.uint8 or res.device.type != "cpu":
        return torch.where(flips[:, None, None, None], kornia.geometry.transform.hflip(res), res)
    # CPU: flip the selected rows in place (the row selection costs no device synchronisation there)
    rows = flips.nonzero().flatten()
    if rows.numel():
        res[rows] = kornia.geometry.transform.hflip(res[rows])
    return res


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# ==============================================================================================================
# The transform
# ==============================================================================================================


@dataclasses.dataclass
class AugmentedBatch:
    """Output of :class:`BackgroundSwap`, with the provenance of every composite.

    Shape:
        - images: ``[B, 3, C, C]`` in the requested dtype and memory format
        - labels, image_ids: ``int64 [B]`` (the label is the foreground's)
        - variant: ``int64 [B]`` the variant applied (its :data:`bgsynth.variants.VARIANTS` code)
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
        return [_NAME[int(v)] for v in self.variant.tolist()]


@dataclasses.dataclass
class _Choice:
    """What each sample became besides its random draws: the applied variant and its background.

    Shape: every field ``int64 [B]``; ``row`` indexes the background source (pool images or the batch's Only-BG-T),
    ``-1`` where none; ``bg_ids``/``bg_labels`` are ``-1`` where the applied variant has no background.
    """

    variant: torch.Tensor
    row: torch.Tensor
    bg_ids: torch.Tensor
    bg_labels: torch.Tensor

    #: the keys of these fields in kornia's params dict
    KEYS = ("applied", "bg_row", "bg_ids", "bg_labels")

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.KEYS, (self.variant, self.row, self.bg_ids, self.bg_labels)))



#: per-sample fields a batch-form call (and :meth:`BackgroundSwap.set_batch`) may give besides labels and ids
_FIELDS = ("boxes", "strips", "has_mask", "has_bgt", "bgt")


def _as_tensor(x, name: str, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"BackgroundSwap: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ConfigError(f"BackgroundSwap: expected {name} of shape {list(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ConfigError(f"BackgroundSwap: expected {name} on {device} (as images), got {x.device}")
    return x.to(dtype)


def _as_batch(images, masks, labels, image_ids, fields: Mapping[str, Any]) -> Batch:
    """A :class:`~bgsynth.types.Batch` from a batch-form call, the missing fields derived.

    ``strips`` from ``boxes`` (:func:`bgsynth.geometry.tile_strips`), ``has_mask`` from the masks, ``has_bgt`` from
    the strips; without boxes every box is empty (no Only-BG-T). ``bgt`` (the paper's full-resolution Only-BG-T)
    makes it a ``tiling='paper'`` batch.
    """
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"BackgroundSwap: unknown per-sample field(s) {unknown}; expected {list(_FIELDS)}")
    if (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8
            or not KORNIA_CHECK_SHAPE(images, ["B", "3", "H", "W"], raises=False)):
        raise ConfigError(f"BackgroundSwap: expected images uint8 [B, 3, H, W], got {_describe(images)}")
    B, _, H, W = images.shape
    if H != W:
        raise ConfigError(f"BackgroundSwap: expected square images (the model's crop), got {H}x{W}")
    dev = images.device
    expect = [str(B), "1", str(H), str(W)]
    if not isinstance(masks, torch.Tensor) or not KORNIA_CHECK_SHAPE(masks, expect, raises=False):
        raise ConfigError(f"BackgroundSwap: expected masks of shape {[B, 1, H, W]}, got {_describe(masks)}")
    if masks.device != dev:
        raise ConfigError(f"BackgroundSwap: expected masks on {dev} (as images), got {masks.device}")
    masks = masks if masks.dtype == torch.uint8 else (masks != 0).to(torch.uint8)
    boxes, strips, has_mask, has_bgt, bgt = (fields.get(k) for k in _FIELDS)
    if boxes is not None:
        boxes = _as_tensor(boxes, "boxes", torch.int64, dev, (B, 4))
    if strips is None and boxes is not None:
        strips = tile_strips(boxes, H, W)
    if strips is not None:
        strips = _as_tensor(strips, "strips", torch.int64, dev, (B, 4))
    if has_mask is None:
        has_mask = masks.flatten(1).any(dim=1)
    if has_bgt is None:
        has_bgt = ((strips[:, 2] > 0) & (strips[:, 3] > 0) if strips is not None
                   else torch.zeros(B, dtype=torch.bool, device=dev))
    if bgt is not None:
        bgt = _as_tensor(bgt, "bgt", torch.uint8, dev, (B, 3, H, W))
    return Batch(
        images=images, masks=masks,
        boxes=boxes if boxes is not None else torch.tensor([0, 0, -1, -1], device=dev).repeat(B, 1),
        strips=strips if strips is not None else torch.zeros(B, 4, dtype=torch.int64, device=dev),
        labels=_as_tensor(labels, "labels", torch.int64, dev, (B,)),
        image_ids=_as_tensor(image_ids, "image_ids", torch.int64, dev, (B,)),
        has_mask=_as_tensor(has_mask, "has_mask", torch.bool, dev, (B,)),
        has_bgt=_as_tensor(has_bgt, "has_bgt", torch.bool, dev, (B,)),
        bgt=bgt, tiling="paper" if bgt is not None else "crop",
    )


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A kornia image (floating, 0..1) as the uint8 pixels the compositing kernels read."""
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


class BackgroundSwap(RandomTransplantation):
    """Per-sample background swap + random resized crop + flip + normalise, on the device.

    Args:
        probs: variant probabilities (see :func:`parse_probs`); e.g. ``{'mixed_rand': 1.0}``.
        bg_source: ``'pool'`` or ``'batch'`` (see :class:`SwapConfig`).
        pool: the :class:`~bgsynth.types.BackgroundPool` for ``bg_source='pool'`` (may also be set later through
            :attr:`pool`).
        config: a :class:`SwapConfig`; ``probs``, ``bg_source`` and ``**options`` (its fields: ``seed``,
            ``random_resized_crop``, ``flip``, ``scale``, ``ratio``, ``flip_p``, ``bg_transform``, ``mean``,
            ``std``, ``dtype``, ``channels_last``, ``return_masks``, ``kernel_backend``) change it.

    **Batch form**: ``swap(images, masks, labels, image_ids, boxes=None, strips=None, has_mask=None,
    has_bgt=None, bgt=None, epoch=0, params=None) -> AugmentedBatch`` (or :meth:`apply_batch` on a decoded
    :class:`~bgsynth.types.Batch`). ``images``: ``uint8 [B, 3, C, C]``; ``masks``: ``[B, 1, C, C]`` 0/1 (bool or
    uint8); ``labels``, ``image_ids``: ``[B]``; ``boxes``: inclusive union boxes ``[B, 4]`` (needed for
    ``bg_source='batch'`` unless ``bgt`` is given); ``strips``: ``[B, 4]`` Only-BG-T tiles (from ``boxes`` with
    :func:`bgsynth.geometry.tile_strips` when ``None``); ``has_mask`` / ``has_bgt``: ``bool [B]`` (derived when
    ``None``); ``epoch``: the epoch the draws depend on; ``params``: an :class:`AugmentParams` to replay; ``bgt``:
    ``uint8 [B, 3, C, C]`` the samples' own Only-BG-T images for ``bg_source='batch'`` (the paper's
    full-resolution tiling, ``Batch.bgt``); without it the Only-BG-T is tiled in the crop
    (:func:`bgsynth.variants.tile_in_crop`). The output follows the config (normalised float32 by default).

    **Kornia form**: a mix augmentation of kornia's transplantation family (like
    :class:`kornia.augmentation.RandomTransplantation` it draws its parameters from the mask, which
    :class:`~kornia.augmentation.AugmentationSequential` hands it next to the image through
    ``params_from_input``), for ``data_keys`` ``"input"`` and ``"mask"``. Kornia's data keys carry no image ids
    (every draw hashes them) and the container passes no extra arguments to its children, so the per-sample
    labels and ids of the next call are set on the module first, :meth:`set_batch` (consumed by that call's
    draw), and the pool is the module's :attr:`pool`. The draw lands in the container's ``_params`` (the
    :class:`AugmentParams` fields, the applied variant and background rows, the ids, labels and input masks), so
    ``aug(x, m, params=aug._params)`` replays it exactly without :meth:`set_batch`. Images are kornia's floating
    0..1 images: quantised to 8 bits (the compositing kernels' input) and returned as ``v / 255`` in the input's
    dtype, unnormalised (normalise later in the pipeline, e.g. with ``K.Normalize``); the config's ``mean``,
    ``std``, ``dtype`` and ``channels_last`` apply to the batch form only. The mask comes back cropped and
    flipped like the image (nearest neighbour), in its own dtype. Not invertible (a mix augmentation).

    >>> import kornia.augmentation as K
    >>> swap = BackgroundSwap({"only_fg": 1.0}, bg_source="batch", flip=False, random_resized_crop=False)
    >>> aug = K.AugmentationSequential(swap, K.RandomHorizontalFlip(), data_keys=["input", "mask"])
    >>> x = torch.rand(2, 3, 8, 8); m = torch.zeros(2, 1, 8, 8); m[..., 2:6, 2:6] = 1
    >>> swap.set_batch(labels=torch.tensor([0, 1]), image_ids=torch.tensor([5, 6]))
    >>> y, m2 = aug(x, m)
    >>> y2, m3 = aug(x, m, params=aug._params)   # replay: no set_batch needed
    >>> bool((y == y2).all()), bool((y * (1 - m2) == 0).all())
    (True, True)

    Attributes:
        counts: ``int64 [8, 2]`` on the device, indexed by variant code: per variant, samples drawn and samples
            that fell back to Original (see :meth:`stats`).

    >>> swap = BackgroundSwap({"no_fg": 1.0}, bg_source="batch", random_resized_crop=False, flip=False)
    >>> x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8); m = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    >>> m[..., :4, :4] = 1
    >>> out = swap(x, m, torch.tensor([0, 1]), torch.tensor([5, 6]), boxes=torch.tensor([[0, 0, 3, 3]] * 2))
    >>> out.images.shape, out.images.dtype
    (torch.Size([2, 3, 8, 8]), torch.float32)
    """

    def __init__(self, probs=None, bg_source: str | None = None, pool: BackgroundPool | None = None, *,
                 config: SwapConfig | None = None, **options):
        super().__init__(p=1.0, p_batch=1.0, data_keys=[DataKey.INPUT, DataKey.MASK])
        self.config = swap_config(config, probs=probs, bg_source=bg_source, **options)
        self.pool = pool
        self.counts: torch.Tensor | None = None
        self._meta: tuple | None = None
        self._stat_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def probs(self) -> dict[str, float]:
        return self.config.probs

    @property
    def bg_source(self) -> str:
        return self.config.bg_source

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def needs_background(self) -> bool:
        """Whether any variant with a background (Mixed-*) has a non-zero probability."""
        return self.config.needs_background

    def __repr__(self) -> str:
        c = self.config
        p = ", ".join(f"{k}={v:g}" for k, v in c.probs.items() if v > 0)
        return (f"BackgroundSwap(probs=({p}), bg_source={c.bg_source}, seed={c.seed}, "
                f"random_resized_crop={c.random_resized_crop}, scale={c.scale}, flip={c.flip}, "
                f"bg_transform={c.bg_transform})")

    def _stats(self, dev: torch.device):
        """mean/std as float32 tensors on ``dev``, made once (a tensor from a list is a blocking copy on CUDA)."""
        if self.config.mean is None:
            return None, None
        key = str(dev)
        if key not in self._stat_cache:
            self._stat_cache[key] = (torch.tensor(self.config.mean, dtype=torch.float32).to(dev),
                                     torch.tensor(self.config.std, dtype=torch.float32).to(dev))
        return self._stat_cache[key]

    # ------------------------------------------------------------------------------------------ parameters
    def sample(self, image_ids: torch.Tensor, size: int, epoch: int = 0) -> AugmentParams:
        """Draw the parameters of a batch (a pure function of ``(seed, epoch, image id)``, :func:`sample_params`)."""
        return sample_params(image_ids, size, config=self.config, epoch=epoch)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per variant: samples drawn and samples that fell back to Original, since construction (host sync)."""
        if self.counts is None:
            return {name: {"drawn": 0, "fell_back": 0} for name in AUGMENT_VARIANTS}
        c = self.counts.tolist()
        return {name: {"drawn": int(c[_CODE[name]][0]), "fell_back": int(c[_CODE[name]][1])}
                for name in AUGMENT_VARIANTS}

    def _count(self, requested: torch.Tensor, ok: torch.Tensor) -> None:
        counts = torch.zeros(_NUM_CODES, 2, dtype=torch.int64, device=requested.device)
        counts[:, 0].index_add_(0, requested, torch.ones_like(requested))
        counts[:, 1].index_add_(0, requested, (~ok).to(torch.int64))
        self.counts = counts if self.counts is None or self.counts.device != counts.device else self.counts + counts

    # ------------------------------------------------------------------------------------------ backgrounds
    def _pool_rows(self, image_ids, labels, params: AugmentParams):
        """Pool row of each sample's Mixed-Rand and Mixed-Same background (``-1`` where none)."""
        pool = self.pool
        if pool is None:
            raise ConfigError("BackgroundSwap: bg_source='pool' needs a BackgroundPool (pool=...)")
        if pool.device != image_ids.device:
            raise ConfigError(f"BackgroundSwap: expected the pool on {image_ids.device} (as images), got {pool.device}")
        none = torch.full_like(image_ids, -1)
        if len(pool) == 0:
            return none, none, none
        # the variants module's choice is a pure function of (seed, variant, image id): one seed per (seed, epoch)
        epoch_seed = fold(self.config.seed, params.epoch, _S_EPOCH_SEED)
        out = {}
        for name in ("mixed_rand", "mixed_same"):
            out[name] = choose_backgrounds(image_ids, labels, name, pool, epoch_seed) if self.probs[name] > 0 else (
                none, none, none)
        same = params.variant.to(image_ids.device) == _MIXED_SAME
        return tuple(torch.where(same, a, b) for a, b in zip(out["mixed_same"], out["mixed_rand"]))

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

    def _background_rows(self, batch: Batch, params: AugmentParams, requested: torch.Tensor, given=None):
        """``(row, bg_ids, bg_labels)`` of each sample's background in its source (``-1`` where none); ``given``:
        the caller's choice of pool rows (see :meth:`apply_batch`)."""
        if given is not None:
            return self._given_rows(batch, given)
        if not self.needs_background:
            none = torch.full_like(batch.image_ids, -1)
            return none, none, none
        if self.bg_source == "pool":
            return self._pool_rows(batch.image_ids, batch.labels, params)
        row = self._batch_partners(batch.labels, batch.has_bgt, requested, params.bg_key.to(batch.device))
        safe, none = row.clamp(min=0), torch.full_like(row, -1)
        return row, torch.where(row >= 0, batch.image_ids[safe], none), torch.where(row >= 0, batch.labels[safe], none)

    def _given_rows(self, batch: Batch, given) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check a caller's ``(rows, bg_ids, bg_labels)`` of pool rows against the batch and the pool."""
        if self.bg_source != "pool" or self.pool is None:
            raise ConfigError("BackgroundSwap: backgrounds=(rows, bg_ids, bg_labels) index the pool; expected "
                              "bg_source='pool' and a BackgroundPool")
        if not isinstance(given, (tuple, list)) or len(given) != 3:
            raise ConfigError(f"BackgroundSwap: expected backgrounds=(rows, bg_ids, bg_labels), got {type(given).__name__}")
        out = tuple(_as_tensor(t, name, torch.int64, batch.device, (len(batch),))
                    for t, name in zip(given, ("backgrounds rows", "backgrounds bg_ids", "backgrounds bg_labels")))
        return out

    def _background_images(self, batch: Batch) -> torch.Tensor | None:
        """The images the background rows index: the pool's, or the batch's own Only-BG-T (``None``: no source)."""
        if not self.needs_background:
            return None
        if self.bg_source == "pool":
            pool = self.pool
            if len(pool) and tuple(pool.images.shape[1:]) != tuple(batch.images.shape[1:]):
                raise ConfigError(f"BackgroundSwap: expected pool images of shape {tuple(batch.images.shape[1:])} "
                                  f"(as images), got {tuple(pool.images.shape[1:])}")
            return pool.images if len(pool) > 0 else None
        if batch.bgt is not None:  # the paper's Only-BG-T, made by the decoder at full resolution
            return batch.bgt
        return tile_in_crop(batch.images, batch.boxes, batch.strips, backend=self.config.kernel_backend)

    def _decide(self, batch: Batch, params: AugmentParams, given=None) -> _Choice:
        """The variant each sample becomes (Original where the drawn one is impossible) and its background."""
        requested = params.variant.to(batch.device)
        row, bg_ids, bg_labels = self._background_rows(batch, params, requested, given)
        needs_bg = (requested == _MIXED_RAND) | (requested == _MIXED_SAME)
        needs_mask = requested != _ORIGINAL
        ok = (~needs_mask | batch.has_mask) & (~needs_bg | (row >= 0))
        variant = torch.where(ok, requested, torch.full_like(requested, _ORIGINAL))
        uses_bg = (variant == _MIXED_RAND) | (variant == _MIXED_SAME)
        none = torch.full_like(row, -1)
        self._count(requested, ok)
        return _Choice(variant, row, torch.where(uses_bg, bg_ids, none), torch.where(uses_bg, bg_labels, none))

    # ------------------------------------------------------------------------------------------ rendering
    def _augmented_backgrounds(self, bg_images, params: AugmentParams, choice: _Choice, size: int):
        """The used backgrounds, cropped and flipped, and the row of each sample in them (``-1``: none)."""
        uses_bg = (choice.variant == _MIXED_RAND) | (choice.variant == _MIXED_SAME)
        dev, none = uses_bg.device, torch.full_like(choice.row, -1)
        if dev.type == "cpu":
            # resample only the backgrounds that are used (on the CPU the row selection costs no device sync)
            use = uses_bg.nonzero().flatten()
            bg_index = torch.where(uses_bg, uses_bg.to(torch.int64).cumsum(0) - 1, none)
        else:
            use = torch.arange(uses_bg.shape[0], device=dev)
            bg_index = torch.where(uses_bg, use, none)
        crops = params.bg_crop.to(dev)[use] if params.resized else None
        bg = resized_crop_flip(bg_images, crops, params.bg_flip.to(dev)[use], size, index=choice.row.clamp(min=0)[use])
        return bg, bg_index

    def _render(self, images, masks, params: AugmentParams, choice: _Choice, bg_images, out: dict):
        """Geometry first (foreground, mask and background get their crop + flip), then one composite pass.

        Returns ``(composite, augmented masks)``.
        """
        dev, W = images.device, images.shape[-1]
        crops = params.crop.to(dev) if params.resized else None
        flip = params.flip.to(dev)
        fg = resized_crop_flip(images, crops, flip, W)
        m = resized_crop_flip(masks, crops, flip, W, "nearest")
        # keep: where the output takes the foreground image; Original keeps everything, No-FG the complement of M
        variant = choice.variant[:, None, None, None]
        keep = torch.where(variant == _ORIGINAL, torch.ones_like(m), m)
        keep = torch.where(variant == _NO_FG, 1 - m, keep)
        bg, bg_index = (None, None) if bg_images is None else self._augmented_backgrounds(bg_images, params, choice, W)
        return composite(fg, keep, bg, bg_index, **out), m

    def _output(self, dev: torch.device) -> dict:
        mean, std = self._stats(dev)
        c = self.config
        return dict(mean=mean, std=std, dtype=c.dtype, channels_last=c.channels_last, backend=c.kernel_backend)

    # ------------------------------------------------------------------------------------------ batch form
    def apply_batch(self, batch: Batch, epoch: int = 0, params: AugmentParams | None = None,
                    backgrounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> AugmentedBatch:
        """Augment a decoded :class:`~bgsynth.types.Batch` (the batch form; see the class docstring).

        Args:
            batch: the decoded batch.
            epoch: the epoch the draws depend on.
            params: an :class:`AugmentParams` to replay (default: drawn for ``(seed, epoch, image ids)``).
            backgrounds: ``(rows, bg_ids, bg_labels)``, each ``int64 [B]``: the pool row of every sample's
                background, chosen by the caller (e.g. a composition rule, :mod:`bgsynth.compose`) instead of the
                swap's own choice; ``-1`` where none (a Mixed-* sample then falls back to Original). The rest of
                the path (crop, flip, compositing, normalisation) is unchanged.
        """
        if self.bg_source == "batch" and self.needs_background and batch.tiling == "paper" and batch.bgt is None:
            raise ConfigError(
                "BackgroundSwap: bg_source='batch' with a tiling='paper' batch needs its Only-BG-T images "
                "(decode with only_bg_t=True)"
            )
        if params is None:
            params = self.sample(batch.image_ids, batch.size, epoch)
        elif len(params) != len(batch):
            raise ConfigError(f"BackgroundSwap: expected params for {len(batch)} samples, got {len(params)}")
        choice = self._decide(batch, params, backgrounds)
        images, masks = self._render(batch.images, batch.masks, params, choice, self._background_images(batch),
                                     self._output(batch.device))
        self._commit_state(params=params.to_dict())
        return AugmentedBatch(
            images=images, labels=batch.labels, image_ids=batch.image_ids, variant=choice.variant,
            requested=params.variant.to(batch.device), bg_ids=choice.bg_ids, bg_labels=choice.bg_labels,
            params=params, masks=masks if self.config.return_masks else None,
        )

    def _check_tile_region(self, fields: Mapping[str, Any]) -> None:
        """In-batch backgrounds need the union boxes (the region to tile) or the samples' own Only-BG-T."""
        if self.bg_source == "batch" and self.needs_background and fields.get("bgt") is None \
                and fields.get("boxes") is None:
            raise ConfigError("BackgroundSwap: bg_source='batch' needs the union boxes (boxes=..., the region to "
                              "tile) or the samples' Only-BG-T images (bgt=...)")

    def forward(self, *input, params=None, data_keys=None, **kwargs):
        """The batch form (``labels`` and ``image_ids`` given) or the kornia form (see the class docstring)."""
        if len(input) > 2 or "labels" in kwargs or "image_ids" in kwargs:
            names = ("images", "masks", "labels", "image_ids")
            given = dict(zip(names, input)) | {k: kwargs.pop(k) for k in names if k in kwargs}
            missing = [k for k in names if k not in given]
            if missing or len(input) > 4:
                raise ConfigError(f"BackgroundSwap: the batch form takes images, masks, labels, image_ids (at most "
                                  f"4 positional arguments); missing {missing}, got {len(input)} positional")
            epoch = kwargs.pop("epoch", 0)
            self._check_tile_region(kwargs)
            batch = _as_batch(given["images"], given["masks"], given["labels"], given["image_ids"], kwargs)
            if isinstance(params, Mapping):  # a kornia-form draw (``aug._params``) replayed on the batch form
                params = AugmentParams.from_dict(params)
            return self.apply_batch(batch, epoch=epoch, params=params)
        return self._kornia_forward(input, params, data_keys)

    # ------------------------------------------------------------------------------------------ kornia form
    def set_batch(self, labels: torch.Tensor, image_ids: torch.Tensor, epoch: int = 0, **fields) -> None:
        """The per-sample labels and image ids (and ``epoch``, and any of ``boxes``, ``strips``, ``has_bgt``,
        ``bgt`` for ``bg_source='batch'``) of the next kornia-form call; that call's draw consumes them."""
        unknown = sorted(set(fields) - set(_FIELDS) | ({"has_mask"} & set(fields)))
        if unknown:
            raise ConfigError(f"BackgroundSwap.set_batch: unknown field(s) {unknown}; expected labels, image_ids, "
                              f"epoch, boxes, strips, has_bgt, bgt")
        self._meta = (labels, image_ids, int(epoch), dict(fields))

    def params_from_input(self, *input, data_keys, params, extra_args=None) -> dict[str, torch.Tensor]:
        """Complete kornia's ``params`` of a call with the draw (kornia's hook for mask-driven parameters).

        A ``params`` that already holds a draw is used as given (a replay).
        """
        if "variant" in params:
            return params
        keys = [DataKey.get(k) for k in data_keys]
        if DataKey.INPUT not in keys or DataKey.MASK not in keys:
            raise ConfigError(f"BackgroundSwap: the kornia form draws its parameters from the image and its mask; "
                              f"expected data_keys with 'input' and 'mask', got {[k.name.lower() for k in keys]}")
        if self._meta is None:
            raise ConfigError("BackgroundSwap: call set_batch(labels=..., image_ids=...) before each kornia-form "
                              "call (or replay with params=...)")
        labels, image_ids, epoch, fields = self._meta
        self._meta = None
        image, mask = input[keys.index(DataKey.INPUT)], input[keys.index(DataKey.MASK)]
        mask = mask[:, None] if mask.ndim == 3 else mask
        if mask.shape[1] != 1:
            raise ConfigError(f"BackgroundSwap: expected a one-channel foreground mask, got {tuple(mask.shape)}")
        u8 = _to_uint8(image)
        self._check_tile_region(fields)
        batch = _as_batch(u8, (mask != 0).to(torch.uint8), labels, image_ids, fields)
        draw = self.sample(batch.image_ids, batch.size, epoch)
        params.update(draw.to_dict())
        params.update(self._decide(batch, draw).to_dict())
        params.update(masks=batch.masks, labels=batch.labels, image_ids=batch.image_ids, boxes=batch.boxes,
                      strips=batch.strips, has_bgt=batch.has_bgt)
        if batch.bgt is not None:
            params["bgt"] = batch.bgt
        return params

    def _kornia_forward(self, input, params, data_keys):
        keys = self.data_keys if data_keys is None else [DataKey.get(k) for k in data_keys]
        if len(keys) != len(input):
            raise ConfigError(f"BackgroundSwap: expected one input per data key {[k.name.lower() for k in keys]}, "
                              f"got {len(input)}")
        if params is None:
            params = self.forward_parameters(input[0].shape)
        if "variant" not in params:
            params = self.params_from_input(*input, data_keys=keys, params=params)
        self._commit_state(params=params)
        outs = []
        for x, key in zip(input, keys):
            if key == DataKey.INPUT:
                outs.append(self._kornia_image(x, params))
            elif key == DataKey.MASK:
                outs.append(self._kornia_mask(x, params))
            else:
                raise ConfigError(f"BackgroundSwap: data key {key.name.lower()!r} is not supported (input, mask)")
        return outs[0] if len(outs) == 1 else outs

    def _kornia_image(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u8 = _to_uint8(x)
        dev = u8.device
        batch = Batch(images=u8, masks=params["masks"].to(dev), boxes=params["boxes"].to(dev),
                      strips=params["strips"].to(dev), labels=params["labels"].to(dev),
                      image_ids=params["image_ids"].to(dev), has_mask=params["masks"].flatten(1).any(1).to(dev),
                      has_bgt=params["has_bgt"].to(dev), bgt=params.get("bgt"),
                      tiling="paper" if params.get("bgt") is not None else "crop")
        out = dict(mean=None, std=None, dtype=torch.uint8 if x.dtype == torch.uint8 else torch.float32,
                   channels_last=False, backend=self.config.kernel_backend)
        choice = _Choice(*(params[k].to(dev) for k in _Choice.KEYS))
        img, _ = self._render(u8, batch.masks, AugmentParams.from_dict(params), choice,
                              self._background_images(batch), out)
        return img.to(x.dtype)

    def _kornia_mask(self, m: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = AugmentParams.from_dict(params)
        m4 = m[:, None] if m.ndim == 3 else m
        crops = p.crop.to(m.device) if p.resized else None
        out = resized_crop_flip(m4, crops, p.flip.to(m.device), m4.shape[-1], "nearest")
        return out[:, 0] if m.ndim == 3 else out
