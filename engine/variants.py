"""The eight variants of the paper, synthesised in-batch on the batch's device.

:func:`synthesize` turns a decoded :class:`~bgsynth.types.Batch` (and, for Mixed-*, a
:class:`~bgsynth.types.BackgroundPool`) into any subset of the variants of PAPER.md, each one a single
pass of a device kernel (:mod:`bgsynth.kernels`) that can also normalise, cast and lay out the result for a model:

============  =============  ==============================================================  ==================
name          display        definition (per image: crop ``x``, union box ``B``, mask ``M``)  valid when
============  =============  ==============================================================  ==================
original      Original       ``x``                                                           always
only_bg_b     Only-BG-B      ``x``, pixels inside ``B`` black                                 ``B`` in the crop
only_bg_t     Only-BG-T      ``x``, pixels inside ``B`` replaced by the tiled strip            ``has_bgt``
no_fg         No-FG          ``x``, pixels of ``M`` black                                     ``has_mask``
only_fg       Only-FG        ``x``, pixels outside ``M`` black                                ``has_mask``
mixed_same    Mixed-Same     ``M`` of ``x`` over the Only-BG-T of a same-class image           mask + candidate
mixed_rand    Mixed-Rand     ... of an image of any class                                     mask + candidate
mixed_next    Mixed-Next     ... of an image of class ``(y + 1) mod N``                        mask + candidate
============  =============  ==============================================================  ==================

Rows that are not valid still get an image (the kernel's result, e.g. the unchanged crop for Only-BG-T without a
margin, black background for a Mixed-* without a candidate); consumers must use ``valid``.

Geometry (**ours**, PAPER.md): every variant is computed in the crop the model sees. The decode stage carries the
mask (nearest neighbour) and the union box (exact integer maps) through the same resize + centre crop as the
image (:mod:`bgsynth.geometry`). Only-BG-T has two constructions, chosen when the batch is decoded (``tiling``,
recorded in every results and manifest file):

* ``tiling="paper"`` (the default): **the paper's construction**. The strip rule runs on the stored image's
  full-resolution margins (inclusive union box, :func:`bgsynth.geometry.tile_strips` with each image's own size),
  the strip is tiled from the image origin over the box at full resolution, and the tiled image is then resized
  and cropped with the same resampling as Original. The decoders do this while they still hold the full-resolution
  pixels (PIL and torchvision: one ``index_select`` along the strip's axis; DALI: ``fn.multi_paste`` of
  non-overlapping rectangles inside its graph, then the same ``fn.resize`` crop window), so the batch carries
  the Only-BG-T crops (``Batch.bgt``) and this variant is a copy (plus the normalise/cast epilogue). An image
  whose box leaves no full-resolution margin has no Only-BG-T (``valid`` False), even when its crop box leaves a
  margin in the crop, and vice versa.
* ``tiling="crop"``: the faster approximation. The strip rule runs on the crop box inside the crop and the crop is
  tiled from its own origin (:func:`bgsynth.kernels.tile_fill`). It is not the paper's background: on 14 real
  photographs (``benchmarks/measure_tiling_parity.py``, the test fixture ``tests/photos.py``, 256 -> 224) it
  picked a different strip side for 3 of the 12 images that have an Only-BG-T in both modes, one more image has
  one in paper mode only, and inside the box it differs from the paper's by 33.4 grey levels on average with 64%
  of the pixels off by more than 8 (30.5 and 56% where the side agrees, 41.9 and 84% where it differs; for
  scale, the paper's Only-BG-T differs from the untouched crop there by 56.4). On the built-in cartoons the gap is
  smaller (450 val images: 410 same side, 13.7 levels, 42% of pixels > 8), because their backgrounds are flat.

Only-BG-T is also the background of every Mixed-* composite, of the Backgrounds Challenge and of the augmentation
pool, so the setting follows everywhere: a :class:`~bgsynth.types.BackgroundPool` is the Only-BG-T output
of decoded batches (:func:`background_pool_from_batch`), and a Mixed-* composite is ``where(M, x, pool[row])``
in crop space, as the paper composites "in the model's input geometry". Cost of paper tiling (a second resize per
image, in the decoder; ``benchmarks/bench_variants.py``, 108 built-in JPEGs, 256 -> 224, 2 threads): decode +
Only-BG-T ran at 0.85x the crop mode's images/s with torchvision (3.8 vs 3.1 ms CPU per image), 0.83x with DALI
(CPU) and 0.51x with PIL (the plain reference resizes the whole image twice); the resident pool is built once per
run, and a full ``bgsynth eval`` of the demo (430 images x 8 variants, 72 -> 64) ran at the same rate in both
modes within the machine's noise. Only-BG-B, No-FG, Only-FG and the Mixed-* foreground are the same pixels in
either order except along the box/mask edges: blacking out before a bilinear resize blurs the edge, ours keeps
it sharp and uses exactly the mask/box the model's crop has (nearest neighbour, as the paper's filters measure
boxes).

Background choice (Mixed-*), :func:`choose_backgrounds`: a counter-based hash, a pure function of
``(seed, variant, image id)`` and the pool's content, never of the batch size, order, device or number of
workers/ranks:

    key  = splitmix64(splitmix64(seed) XOR code(variant))          (Python integers, mod 2**64)
    h    = splitmix64(key XOR image_id)                              (on the device, int64 two's complement)
    cand = pool entries of the target class (Mixed-Same: y; Mixed-Next: (y + 1) mod N; Mixed-Rand: all),
           without the image itself, ordered by image id
    k    = (h >> 1) mod len(cand);  the background is cand[k]

with ``splitmix64(x) = mix(x + 0x9E3779B97F4A7C15)`` (Steele, Lea & Flood 2014) and the variant codes of
:data:`VARIANTS` (``original`` 0 ... ``mixed_next`` 7). Its bias, ``len(cand) / 2**63``, is negligible. An image
without a candidate gets row -1 (black background) and is invalid.

>>> import torch
>>> from bgsynth.types import Batch
>>> b = Batch(images=torch.full((1, 3, 4, 4), 9, dtype=torch.uint8), masks=torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
...           boxes=torch.tensor([[1, 1, 2, 2]], dtype=torch.int32), strips=torch.tensor([[0, 0, 4, 1]], dtype=torch.int32),
...           labels=torch.tensor([0]), image_ids=torch.tensor([7]), has_mask=torch.tensor([True]),
...           has_bgt=torch.tensor([True]))
>>> out = synthesize(b, ["only_bg_b"])
>>> out["only_bg_b"].images[0, 0].tolist()
[[9, 9, 9, 9], [9, 0, 0, 9], [9, 0, 0, 9], [9, 9, 9, 9]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch

from . import kernels
from .errors import ConfigError
from .rng import hash_bits, srl
from .types import BackgroundPool, Batch, VariantOutput

__all__ = [
    "VARIANTS",
    "VARIANT_NAMES",
    "MIXED_VARIANTS",
    "VariantSpec",
    "VariantOutput",
    "display_name",
    "resolve_variants",
    "synthesize",
    "choose_backgrounds",
    "background_pool_from_batch",
    "composite",
    "tile_in_crop",
]



# ----------------------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class _Request:
    """Everything a variant function needs besides the batch (resolved once per :func:`synthesize` call)."""

    pool: BackgroundPool | None
    seed: int
    out: dict  # mean, std, dtype, channels_last, backend: forwarded to the kernels


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A registered variant.

    Attributes:
        name: registry key, also the folder name of the release layout (``only_bg_t``).
        display: the paper's name (``Only-BG-T``).
        code: stable integer code, part of the background hash.
        needs_mask: uses the foreground mask.
        needs_pool: needs a :class:`BackgroundPool` (Mixed-*).
        fn: ``fn(batch, request) -> VariantOutput``.
    """

    name: str
    display: str
    code: int
    needs_mask: bool
    needs_pool: bool
    fn: Callable[[Batch, _Request], VariantOutput] = dataclasses.field(repr=False, compare=False)


VARIANTS: dict[str, VariantSpec] = {}


def _register(name: str, display: str, code: int, needs_mask: bool = False, needs_pool: bool = False):
    def deco(fn):
        if name in VARIANTS or any(v.code == code for v in VARIANTS.values()):
            raise ConfigError(f"variant {name!r} (code {code}) is already registered")
        VARIANTS[name] = VariantSpec(name, display, code, needs_mask, needs_pool, fn)
        return fn

    return deco


def _no_bg(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    none = torch.full((len(batch),), -1, dtype=torch.int64, device=batch.device)
    return none, none.clone()


def _output(images: torch.Tensor, valid: torch.Tensor, batch: Batch) -> VariantOutput:
    return VariantOutput(images, valid.to(torch.bool), *_no_bg(batch))


def _as_output(images: torch.Tensor, req: _Request) -> torch.Tensor:
    """``images`` in the requested dtype, normalisation and memory format (itself when nothing is to change)."""
    o = req.out
    if o["dtype"] in (None, torch.uint8) and o["mean"] is None:
        fmt = torch.channels_last if o["channels_last"] else torch.contiguous_format
        if images.is_contiguous(memory_format=fmt):
            # nothing to compute: the input itself (aliases the batch's tensor; do not modify it in place)
            return images
    return composite(images, **o)


@_register("original", "Original", 0)
def _original(batch: Batch, req: _Request) -> VariantOutput:
    return _output(_as_output(batch.images, req), torch.ones_like(batch.has_bgt, dtype=torch.bool), batch)


@_register("only_bg_b", "Only-BG-B", 1)
def _only_bg_b(batch: Batch, req: _Request) -> VariantOutput:
    out = kernels.composite(batch.images, boxes=batch.boxes, **req.out)
    box = batch.boxes
    present = (box[:, 2] >= box[:, 0]) & (box[:, 3] >= box[:, 1])
    return _output(out, present, batch)


@_register("only_bg_t", "Only-BG-T", 2)
def _only_bg_t(batch: Batch, req: _Request) -> VariantOutput:
    if batch.tiling == "paper":
        if batch.bgt is None:
            raise ConfigError(
                "synthesize: Only-BG-T with tiling='paper' needs the batch's full-resolution Only-BG-T images "
                "(decode with create_loader(..., tiling='paper', only_bg_t=True))"
            )
        return _output(_as_output(batch.bgt, req), batch.has_bgt, batch)
    out = kernels.tile_fill(batch.images, batch.boxes, batch.strips, **req.out)
    return _output(out, batch.has_bgt, batch)


@_register("no_fg", "No-FG", 3, needs_mask=True)
def _no_fg(batch: Batch, req: _Request) -> VariantOutput:
    out = kernels.composite(batch.images, batch.masks, invert=True, **req.out)
    return _output(out, batch.has_mask, batch)


@_register("only_fg", "Only-FG", 4, needs_mask=True)
def _only_fg(batch: Batch, req: _Request) -> VariantOutput:
    out = kernels.composite(batch.images, batch.masks, **req.out)
    return _output(out, batch.has_mask, batch)


def _mixed(variant: str):
    def fn(batch: Batch, req: _Request) -> VariantOutput:
        pool = req.pool
        rows, bg_ids, bg_labels = choose_backgrounds(batch.image_ids, batch.labels, variant, pool, req.seed)
        out = kernels.composite(batch.images, batch.masks, pool.images, rows, **req.out)
        return VariantOutput(out, batch.has_mask.to(torch.bool) & (rows >= 0), bg_ids, bg_labels)

    return fn


_register("mixed_same", "Mixed-Same", 5, needs_mask=True, needs_pool=True)(_mixed("mixed_same"))
_register("mixed_rand", "Mixed-Rand", 6, needs_mask=True, needs_pool=True)(_mixed("mixed_rand"))
_register("mixed_next", "Mixed-Next", 7, needs_mask=True, needs_pool=True)(_mixed("mixed_next"))

VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)
MIXED_VARIANTS: tuple[str, ...] = tuple(n for n, v in VARIANTS.items() if v.needs_pool)


def display_name(name: str) -> str:
    """The paper's name of a variant: ``display_name('only_bg_t') == 'Only-BG-T'``."""
    return VARIANTS[resolve_variants([name])[0]].display


def _canon(s: str) -> str:
    return s.strip().lower().replace("-", "_").replace(" ", "_")


def resolve_variants(variants: str | Iterable[str] = "all") -> list[str]:
    """Registry names of a variant selection.

    Args:
        variants: ``'all'``, one name, a comma-separated string, or an iterable of names. Registry names
            (``only_bg_t``) and the paper's names (``Only-BG-T``) are both accepted, in any case.

    Returns:
        Registry names in the order given (``'all'``: registry order), without duplicates.

    >>> resolve_variants("Original, Mixed-Rand")
    ['original', 'mixed_rand']
    """
    if isinstance(variants, str):
        if _canon(variants) == "all":
            return list(VARIANTS)
        variants = [v for v in variants.split(",") if v.strip()]
    lookup = {_canon(n): n for n in VARIANTS} | {_canon(v.display): n for n, v in VARIANTS.items()}
    out: list[str] = []
    for v in variants:
        if not isinstance(v, str):
            raise ConfigError(f"expected variant names as strings, got {type(v).__name__}")
        name = lookup.get(_canon(v))
        if name is None:
            raise ConfigError(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)} (or 'all')")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("expected at least one variant, got an empty selection")
    return out


# ----------------------------------------------------------------------------------------------- synthesis
# size: the public entry point: the batch, the selection, the pool and the model-ready output options
def synthesize(
    batch: Batch,
    variants: str | Iterable[str] = "all",
    pool: BackgroundPool | None = None,
    seed: int = 0,
    mean=None,
    std=None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    backend: str = "auto",
    normalize: tuple | None = None,
) -> dict[str, VariantOutput]:
    """Synthesize variants of a batch on its device.

    Args:
        batch: a decoded batch (crop geometry; masks, boxes and strips in crop coordinates).
        variants: ``'all'`` or a selection (see :func:`resolve_variants`).
        pool: the Only-BG-T backgrounds for Mixed-* (same crop size and device as the batch); required when a
            Mixed-* variant is requested.
        seed: seed of the background choice (see the module docstring).
        mean, std: per-channel statistics (0..1 scale): outputs are ``(v / 255 - mean) / std`` (fused path).
        dtype: output dtype: ``uint8``, ``float32``, ``float16``, ``bfloat16``; ``None``: uint8, or float32 with
            statistics. A floating dtype without statistics gives ``v / 255``.
        channels_last: outputs in the channels_last memory format.
        backend: kernel backend, ``'auto'`` | ``'torch'`` | ``'triton'`` (see :mod:`bgsynth.kernels`).
        normalize: alternatively ``(mean, std)`` as one pair.

    Returns:
        ``{name: VariantOutput}`` in the order requested. Each output is one kernel pass over the batch
        (Original in uint8 without conversion returns ``batch.images`` itself).

    Shape:
        ``VariantOutput.images``: ``[B, 3, C, C]``; ``valid``, ``bg_ids``, ``bg_labels``: ``[B]``.

    .. note::
        No host synchronisation: backgrounds are chosen on the device, validity stays a tensor.
    """
    if not isinstance(batch, Batch):
        raise ConfigError(f"synthesize: expected a bgsynth.types.Batch, got {type(batch).__name__}")
    if normalize is not None:
        if mean is not None or std is not None:
            raise ConfigError("synthesize: give either normalize=(mean, std) or mean=/std=, not both")
        if not isinstance(normalize, Sequence) or len(normalize) != 2:
            raise ConfigError(f"synthesize: expected normalize=(mean, std), got {normalize!r}")
        mean, std = normalize
    names = resolve_variants(variants)
    if any(VARIANTS[n].needs_pool for n in names):
        _check_pool(pool, batch)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"synthesize: expected an integer seed, got {seed!r}")
    req = _Request(pool, seed, dict(mean=mean, std=std, dtype=dtype, channels_last=channels_last, backend=backend))
    with kernels.mask_reuse():  # No-FG, Only-FG and Mixed-* share the batch's mask (CPU kernels)
        return {n: VARIANTS[n].fn(batch, req) for n in names}


def _check_pool(pool, batch: Batch) -> None:
    if pool is None:
        raise ConfigError(
            "synthesize: Mixed-* variants need a BackgroundPool (bgsynth.pipeline.build_background_pool); "
            "got pool=None"
        )
    if not isinstance(pool, BackgroundPool):
        raise ConfigError(f"synthesize: expected pool to be a BackgroundPool, got {type(pool).__name__}")
    if tuple(pool.images.shape[2:]) != tuple(batch.images.shape[2:]):
        raise ConfigError(
            f"synthesize: expected pool images of size {tuple(batch.images.shape[2:])} (the batch's crop), got "
            f"{tuple(pool.images.shape[2:])}; build the pool with the same geometry"
        )
    if pool.device != batch.device:
        raise ConfigError(f"synthesize: expected the pool on the batch's device {batch.device}, got {pool.device}")


# ----------------------------------------------------------------------------------------------- backgrounds
def _pool_tables(pool: BackgroundPool):
    """Candidate lists of a pool, independent of its row order.

    Returns ``by_id`` (pool rows sorted by image id), ``ids_sorted``, ``by_class`` (rows sorted by class bucket,
    then id), ``starts``/``counts`` of each class bucket in ``by_class`` (bucket ``N = pool.num_classes`` holds
    labels outside ``0..N-1``) and ``class_rank`` (each row's position within its class's list).
    """
    ids, labels = pool.image_ids.to(torch.int64), pool.labels.to(torch.int64)
    n = ids.shape[0]
    by_id = torch.argsort(ids, stable=True)
    n_cls = pool.num_classes
    bucket = torch.where((labels >= 0) & (labels < n_cls), labels, torch.full_like(labels, n_cls))
    by_class = by_id[torch.argsort(bucket[by_id], stable=True)]
    counts = torch.zeros(n_cls + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, bucket, torch.ones_like(bucket))
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(by_class).scatter_(0, by_class, torch.arange(n, device=ids.device))
    class_rank = position - starts[bucket]
    return by_id, ids[by_id], by_class, starts, counts, class_rank, bucket


def choose_backgrounds(
    image_ids: torch.Tensor,
    labels: torch.Tensor,
    variant: str,
    pool: BackgroundPool | None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Mixed-* background of every image (see the module docstring for the exact rule).

    Args:
        image_ids: image ids of the foregrounds.
        labels: their IN-9 labels.
        variant: ``'mixed_same'``, ``'mixed_rand'`` or ``'mixed_next'`` (display names accepted).
        pool: the candidate backgrounds (image ids are assumed unique); ``None`` or empty: no background.
        seed: the seed of the choice.

    Returns:
        ``(pool_rows, bg_ids, bg_labels)``, each ``int64 [B]`` on the ids' device, -1 where no candidate exists.

    A pure function of ``(seed, variant, image id)`` and the pool's content (not its row order): the same image
    gets the same background in any batch, order, shard or device.
    """
    name = resolve_variants([variant])[0]
    if name not in MIXED_VARIANTS:
        raise ConfigError(f"choose_backgrounds: expected one of {MIXED_VARIANTS}, got {variant!r}")
    image_ids = image_ids.to(torch.int64).contiguous()
    labels = labels.to(device=image_ids.device, dtype=torch.int64)
    if image_ids.ndim != 1 or labels.shape != image_ids.shape:
        raise ConfigError(
            f"choose_backgrounds: expected image_ids and labels of shape [B], got {tuple(image_ids.shape)} and "
            f"{tuple(labels.shape)}"
        )
    dev = image_ids.device
    none = torch.full_like(image_ids, -1)
    if pool is None or len(pool) == 0 or image_ids.numel() == 0:
        return none, none.clone(), none.clone()
    if pool.device != dev:
        raise ConfigError(f"choose_backgrounds: expected the pool on {dev}, got {pool.device}")
    by_id, ids_sorted, by_class, starts, counts, class_rank, bucket = _pool_tables(pool)
    n = ids_sorted.shape[0]

    h = hash_bits(image_ids, seed, VARIANTS[name].code)  # splitmix64(id ^ fold(seed, code)), see the docstring
    draw = srl(h, 1)  # uniform on [0, 2**63)

    # where the image itself sits in the pool (if it does): excluded from its own candidates
    p = torch.searchsorted(ids_sorted, image_ids).clamp(max=n - 1)
    self_in = ids_sorted[p] == image_ids
    self_row = by_id[p]

    if name == "mixed_rand":
        seq, start, count = by_id, torch.zeros_like(image_ids), torch.full_like(image_ids, n)
        excl = self_in
        self_rank = p
    else:
        n_cls = pool.num_classes
        in_range = (labels >= 0) & (labels < n_cls)
        target = labels if name == "mixed_same" else torch.remainder(labels + 1, n_cls)
        target = torch.where(in_range, target, torch.full_like(target, n_cls))  # unlabelled: no candidates
        seq, start = by_class, starts[target]
        count = torch.where(in_range, counts[target], torch.zeros_like(target))
        excl = self_in & (bucket[self_row] == target)
        self_rank = class_rank[self_row]
    eff = count - excl.to(torch.int64)
    ok = eff > 0
    k = torch.remainder(draw, eff.clamp(min=1))
    k = k + (excl & (k >= self_rank)).to(torch.int64)  # skip the image's own slot
    rows = seq[(start + k).clamp(0, n - 1)]
    rows = torch.where(ok, rows, none)
    safe = rows.clamp(min=0)
    bg_ids = torch.where(ok, pool.image_ids.to(torch.int64)[safe], none)
    bg_labels = torch.where(ok, pool.labels.to(torch.int64)[safe], none)
    return rows, bg_ids, bg_labels


# ----------------------------------------------------------------------------------------------- the pixel ops
# size: the functional face of the fused kernel, one argument per stage (see bgsynth.kernels.composite)
def composite(
    fg: torch.Tensor,
    keep: torch.Tensor | None = None,
    backgrounds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    *,
    invert: bool = False,
    boxes: torch.Tensor | None = None,
    mean=None,
    std=None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Foreground pixels over gathered background rows (or black), normalised and cast in one pass.

    The one compositing op of bgsynth: every variant but Only-BG-T, the challenge's (foreground, background)
    pairs and the background-swap augmentation go through it. Per image ``b`` and pixel ``p`` the output takes
    ``fg[b, :, p]`` where ``keep[b, 0, p]`` (XOR ``invert``; every pixel when ``keep`` is ``None``; never inside
    ``boxes[b]``), else ``backgrounds[rows[b], :, p]`` (black when ``backgrounds`` is ``None`` or ``rows[b] < 0``),
    then ``(v / 255 - mean) / std`` (with statistics), cast to ``dtype``, channels_last on request. Implemented by
    :func:`bgsynth.kernels.composite` (Triton on CUDA, torch elsewhere; ``backend`` chooses).

    Shape:
        fg ``uint8 [B, 3, H, W]``; keep ``[B, 1, H, W]`` (bool/uint8); backgrounds ``uint8 [N, 3, H, W]``;
        rows ``int [B]``; boxes ``int [B, 4]`` inclusive; output ``[B, 3, H, W]``.

    >>> fg = torch.full((1, 3, 2, 2), 200, dtype=torch.uint8); keep = torch.tensor([[[[1, 0], [0, 0]]]], dtype=torch.bool)
    >>> composite(fg, keep, torch.full((1, 3, 2, 2), 7, dtype=torch.uint8), torch.tensor([0]))[0, 0].tolist()
    [[200, 7], [7, 7]]
    """
    return kernels.composite(fg, keep, backgrounds, rows, mean=mean, std=std, dtype=dtype,
                             channels_last=channels_last, invert=invert, boxes=boxes, backend=backend)


def tile_in_crop(images: torch.Tensor, boxes: torch.Tensor, strips: torch.Tensor, **out) -> torch.Tensor:
    """Only-BG-T by the crop-space construction (``tiling="crop"``): each crop's box filled with its strip tiled
    from the crop's origin (:func:`bgsynth.kernels.tile_fill`; ``out`` as for :func:`composite`).

    The paper's construction (``tiling="paper"``) is made by the decoders at full resolution (``Batch.bgt``).
    """
    return kernels.tile_fill(images, boxes, strips, **out)


def background_pool_from_batch(batch: Batch, backend: str = "auto") -> BackgroundPool:
    """The Only-BG-T rows of a batch (``has_bgt``) as a :class:`BackgroundPool`, sorted by image id.

    ``bgsynth.pipeline.build_background_pool`` concatenates these over a split. Selecting the rows needs one host
    synchronisation (the number of rows); this is a one-time step, not part of the hot loop.

    Shape:
        ``pool.images``: ``uint8 [N, 3, C, C]`` with ``N = batch.has_bgt.sum()``, in the batch images' memory
        layout (channels_last or contiguous).
    """
    rows = torch.nonzero(batch.has_bgt.to(torch.bool)).flatten()
    if rows.numel():
        rows = rows[torch.argsort(batch.image_ids[rows], stable=True)]
    sub = batch.slice(rows)
    # the pool keeps the crops' memory layout (NHWC from the CPU decoders): the compositing kernel then gathers
    # its rows without a layout change
    nhwc = sub.images.is_contiguous(memory_format=torch.channels_last) and not sub.images.is_contiguous()
    images = synthesize(sub, ["only_bg_t"], backend=backend, channels_last=nhwc)["only_bg_t"].images
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return BackgroundPool(images.contiguous(memory_format=fmt), sub.labels.to(torch.int64),
                          sub.image_ids.to(torch.int64))
