"""The fast CPU path of the torch backend: :func:`composite_cpu` and :func:`tile_fill_cpu`.

Bit-identical to the plain references (:func:`bgsynth.kernels.composite.composite_torch`,
:func:`bgsynth.kernels.tile.tile_fill_torch`, which stay the readable definition and run on other devices); the
tests compare the two over odd shapes, dtypes, layouts and the empty batch. What makes it fast on a CPU
(``benchmarks/bench_variants.py``, docs/variants.md):

* **uint8 until the last step, in the input's memory layout.** A decoder's crops are channels_last (NHWC) in
  memory. Every uint8 stage runs on tensors of one layout, so torch's elementwise loops see contiguous memory and
  vectorise; the one layout change, if the output wants the other layout, happens in the epilogue's single copy.
* **No broadcast over an inner channel axis.** A ``[B, 1, H, W]`` mask against NHWC pixels makes torch loop over
  3-element rows (about 20x slower than a contiguous pass). In NHWC the mask is expanded to one byte per
  channel (:func:`expand_mask_nhwc`: 8 mask bytes, one int64, give an 8-bit code, and a 256-row table their 24
  mask bytes). In NCHW the ``[B, 1, H, W]`` mask broadcasts over the outer channel axis, which is free.
* **Selection by bit operations**, ``b ^ ((a ^ b) & m)`` with ``m`` = 0xFF where the foreground is taken:
  ``torch.where`` on uint8 is about 10x slower on the CPU.
* **Boxes and tiles as slice copies.** Only-BG-B zeroes one rectangle per image; the Only-BG-T tiling copies one
  period of the strip and then doubles the filled part (``log2(box / tile)`` copies), instead of a full-size box
  mask and a per-pixel gather.
* **One normalise/cast into the output.** The uint8 result is converted once into the preallocated output (or a
  float32 scratch for float16/bfloat16) and normalised there in place with the reference's float32 operations
  (``v / 255``, ``- mean``, ``/ std``), so every value is the reference's exactly; in NHWC the statistics are
  repeated along a row so the passes stay contiguous. (A 256-entry table per channel would be one pass, but
  torch's gathers, and a dividing conversion ``torch.div(uint8, 255, out=float)``, are not vectorised and cost
  several times more per element than the vectorised conversion copy and in-place passes.)
* **Chunks of about :data:`~bgsynth.kernels._common.CPU_CHUNK_BYTES` of pixels** keep each pass in the CPU
  caches, scratch buffers are allocated once per call, and each torch op spreads over torch's intra-op threads
  (``torch.get_num_threads()``).
* **One mask per batch**: inside :func:`mask_reuse` (which :func:`bgsynth.variants.synthesize` opens) the
  composites of one batch share the mask derived from the same ``keep`` tensor.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ._common import CPU_CHUNK_BYTES, OutputSpec, alloc_output

__all__ = ["composite_cpu", "tile_fill_cpu", "expand_mask_nhwc", "mask_reuse"]

_FMT = {True: torch.channels_last, False: torch.contiguous_format}


def _is_nhwc(t: torch.Tensor) -> bool:
    """Whether ``t`` (``[B, C, H, W]``) is laid out channels_last (NHWC) in memory and not also plainly contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _compute_layout(t: torch.Tensor, spec: OutputSpec) -> bool:
    """The layout the uint8 stages run in (True: NHWC): the input's own when it has one, else the output's."""
    if _is_nhwc(t):
        return True
    if t.is_contiguous():
        # both layouts coincide for 1x1 images and C == 1; a plain contiguous input is NCHW otherwise
        return spec.channels_last and t.is_contiguous(memory_format=torch.channels_last)
    return spec.channels_last


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for images ``[..., 3, H, W]``, one channel at a time when it writes NHWC (channel stride 1)
    from another layout: a whole-tensor copy would then loop over 3-element rows."""
    if dst.stride(-3) == 1 and dst.shape[-3] > 1 and src.stride(-3) != 1:
        for c in range(dst.shape[-3]):
            dst.select(-3, c).copy_(src.select(-3, c))
    else:
        dst.copy_(src)


def _in_layout(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """``t`` itself when it is laid out as ``nhwc`` says, else a copy in that layout."""
    if (nhwc and _is_nhwc(t)) or (not nhwc and t.is_contiguous()):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, memory_format=_FMT[nhwc])
    _copy(out, t)
    return out


# ----------------------------------------------------------------------------------------------- the mask
_EXPAND_LUT: torch.Tensor | None = None


def _expand_lut() -> torch.Tensor:
    """``int64 [256, 3]``: for the 8-bit code of 8 pixels' mask bits, their 24 NHWC mask bytes (0x00 / 0xFF)."""
    global _EXPAND_LUT
    if _EXPAND_LUT is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None]) & 1  # [256, 8]
        _EXPAND_LUT = bits.repeat_interleave(3, dim=1).to(torch.uint8).neg_().contiguous().view(torch.int64)
    return _EXPAND_LUT


def expand_mask_nhwc(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Expand ``n`` per-pixel mask bytes (0 or 1) to ``3 n`` bytes (0x00 or 0xFF), each repeated three times.

    Eight mask bytes, read as one int64, fold into an 8-bit code (three shift-or steps), and one ``index_select``
    of a 256-row table gives their 24 bytes: about 10x faster than ``repeat_interleave`` on the CPU.

    Args:
        bits: ``uint8`` contiguous, at least ``ceil(n / 8) * 8`` bytes, starting 8-byte aligned; the bytes after
            ``n`` must be 0 or 1 (they expand into bytes that are cut off).
        n: number of pixels.

    Returns:
        ``uint8 [3 n]``: the NHWC mask of ``n`` pixels.

    >>> expand_mask_nhwc(torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.uint8), 3).tolist()
    [255, 255, 255, 0, 0, 0, 255, 255, 255]
    """
    n8 = (n + 7) // 8
    x = bits[: 8 * n8].view(torch.int64)  # bit 8 i holds pixel i's bit; a non-negative value
    # fold: bits 8i..8i+1 hold pixels i, i+1; then 8i..8i+3 hold i..i+3; then 8i..8i+7 hold i..i+7
    code = torch.bitwise_right_shift(x, 7)
    code |= x
    tmp = torch.bitwise_right_shift(code, 14)
    code |= tmp
    torch.bitwise_right_shift(code, 28, out=tmp)
    code |= tmp
    code &= 255
    return _expand_lut().index_select(0, code).view(torch.uint8).view(-1)[: 3 * n]


def _take_mask(keep: torch.Tensor, invert: bool, nhwc: bool) -> torch.Tensor:
    """The take-the-foreground mask of a chunk as 0x00 / 0xFF bytes: ``[b, 1, H, W]`` (NCHW: broadcast over the
    channels) or ``[b, 3, H, W]`` laid out NHWC (one byte per channel)."""
    b, _, h, w = keep.shape
    n = b * h * w
    bits = torch.empty(((n + 7) // 8) * 8 if nhwc else n, dtype=torch.uint8)
    bits[n:].zero_()  # the padding of the last int64 word (NHWC)
    flat = bits[:n].view(b, 1, h, w)
    if keep.dtype == torch.bool:
        flat.copy_(keep)  # 0 / 1
    else:
        torch.clamp(keep, max=1, out=flat)  # non-zero -> 1 (a comparison into bool is ~20x slower on uint8)
    if nhwc:
        if invert:
            flat ^= 1
        return expand_mask_nhwc(bits, n).view(b, h, w, 3).permute(0, 3, 1, 2)
    return flat.sub_(1) if invert else flat.neg_()  # 0 / 1 -> 0xFF / 0 (invert) or 0 / 0xFF


def _clip_box(box, h: int, w: int):
    """An inclusive box clipped to an ``h x w`` image as ``(x0, y0, x1, y1)``, or ``None`` when nothing is left."""
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
    return None if x1 < x0 or y1 < y0 else (x0, y0, x1, y1)


# ----------------------------------------------------------------------------------------------- the epilogue
def _finish(src: torch.Tensor, out: torch.Tensor, spec: OutputSpec, stats: dict) -> None:
    """Write the uint8 chunk ``src`` into the output chunk ``out`` (laid out as ``spec`` says): a copy, or
    ``v / 255`` / ``(v / 255 - mean) / std`` with the reference's float32 operations done in place, then the cast
    to ``out``'s dtype."""
    if spec.dtype == torch.uint8:
        if src.data_ptr() != out.data_ptr():
            _copy(out, src)
        return
    fmt = _FMT[spec.channels_last]
    work = out if spec.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, memory_format=fmt)
    _copy(work, src)  # the conversion copy is vectorised; a dividing one (torch.div(src, 255, out=work)) is not
    work.div_(255.0)
    if spec.mean is not None:
        if spec.channels_last:  # [b * H, W * 3] rows against the statistics repeated along a row: contiguous
            b, c, h, w = work.shape
            row = work.permute(0, 2, 3, 1).view(b * h, w * c)
            row.sub_(stats["mean"])
            row.div_(stats["std"])
        else:  # [1, 3, 1, 1] broadcasts over the outer channel axis
            work.sub_(spec.mean.view(1, -1, 1, 1))
            work.div_(spec.std.view(1, -1, 1, 1))
    if work is not out:
        out.copy_(work)


def _stats(spec: OutputSpec, w: int) -> dict:
    """The statistics repeated along an NHWC row (``[W * 3]``: ``m0 m1 m2 m0 ...``)."""
    if spec.mean is None or not spec.channels_last:
        return {}
    return {"mean": spec.mean.repeat(w), "std": spec.std.repeat(w)}


def _direct(out: torch.Tensor, spec: OutputSpec, nhwc: bool) -> bool:
    """Whether the uint8 stages can write straight into the output (uint8 output in the compute layout)."""
    return spec.dtype == torch.uint8 and (nhwc == spec.channels_last or out.is_contiguous(memory_format=_FMT[nhwc]))


# ----------------------------------------------------------------------------------------------- scratch and reuse
class _Scratch:
    """uint8 buffers of one call, allocated once at the size of its largest chunk and reused by every chunk (fresh
    memory costs a page fault per 4 KiB on first touch, as much as the pass itself)."""

    def __init__(self, chunk: int, h: int, w: int, nhwc: bool):
        self.shape, self.nhwc, self.bufs = (chunk, 3, h, w), nhwc, {}

    def images(self, name: str, b: int) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.shape, dtype=torch.uint8, memory_format=_FMT[self.nhwc])
        return self.bufs[name][:b]


_REUSE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bgsynth_kernels_mask_reuse", default=None)


@contextlib.contextmanager
def mask_reuse():
    """Within the block, CPU composites reuse the per-pixel mask they derive from a ``keep`` tensor seen before.

    :func:`bgsynth.variants.synthesize` makes several composites of one batch with the same mask (No-FG, Only-FG
    and the three Mixed-*); on NHWC crops the mask is expanded to one byte per channel, which costs about as much
    as a composite, so it is made once per block. A mask is reused only for the same tensor object, unchanged
    (its version counter), with the same ``invert``; the block holds the masks and those tensors until it ends.

    >>> import torch
    >>> from bgsynth import kernels
    >>> fg = torch.full((1, 3, 2, 2), 9, dtype=torch.uint8)
    >>> keep = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.bool)
    >>> with kernels.mask_reuse():
    ...     a = kernels.composite(fg, keep); b = kernels.composite(fg, keep)
    >>> torch.equal(a, b)
    True
    """
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


def _chunk_mask(keep: torch.Tensor, invert: bool, nhwc: bool, i0: int, i1: int, reusable: bool) -> torch.Tensor:
    """:func:`_take_mask` of ``keep[i0:i1]``, from the :func:`mask_reuse` block's store when one is open (where
    the inverted mask of a stored one is one ``bitwise_not`` away)."""
    store = _REUSE.get() if reusable else None
    if store is None:
        return _take_mask(keep[i0:i1], invert, nhwc)
    key = (id(keep), keep._version, nhwc, i0, i1)
    entry = store.get(key)
    if entry is None or entry[0] is not keep:
        entry = store[key] = (keep, {})  # holding keep pins its id for the block
    masks = entry[1]
    if invert not in masks:
        other = masks.get(not invert)
        masks[invert] = _take_mask(keep[i0:i1], invert, nhwc) if other is None else torch.bitwise_not(other)
    return masks[invert]


def _chunk_images(h: int, w: int) -> int:
    """Images per chunk: :data:`~bgsynth.kernels._common.CPU_CHUNK_BYTES` of uint8 pixels, at least one."""
    return max(1, CPU_CHUNK_BYTES // max(1, 3 * h * w))


# ----------------------------------------------------------------------------------------------- composite
def composite_cpu(
    fg: torch.Tensor,
    keep: torch.Tensor | None = None,
    bg: torch.Tensor | None = None,
    bg_index: torch.Tensor | None = None,
    spec: OutputSpec | None = None,
    *,
    invert: bool = False,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~bgsynth.kernels.composite.composite_torch` on CPU tensors, fast and bit-identical (module docstring).

    No argument checks (:func:`bgsynth.kernels.composite` makes them); ``spec=None`` means a uint8 output.

    Shape: as :func:`bgsynth.kernels.composite`.
    """
    spec = OutputSpec(torch.uint8, None, None, False) if spec is None else spec
    B, _, H, W = fg.shape
    out = alloc_output((B, 3, H, W), spec, fg.device)
    if B == 0 or H == 0 or W == 0:
        return out
    nhwc = _compute_layout(fg, spec)
    box_list = boxes.tolist() if boxes is not None else None
    rows = bg_index.tolist() if bg is not None and bg.shape[0] > 0 else None
    stats = _stats(spec, W)
    direct = _direct(out, spec, nhwc)
    chunk = _chunk_images(H, W)
    scratch = _Scratch(min(chunk, B), H, W, nhwc)
    for i0 in range(0, B, chunk):
        i1 = min(i0 + chunk, B)
        x = _in_layout(fg[i0:i1], nhwc)
        dst = out[i0:i1] if direct else scratch.images("dst", i1 - i0)
        if keep is not None:
            m = _chunk_mask(keep, invert, nhwc, i0, i1, reusable=box_list is None)
            if box_list is not None:
                for j, box in enumerate(box_list[i0:i1]):
                    _fill_box(m, j, box)
            if rows is None:
                torch.bitwise_and(x, m, out=dst)
            else:  # dst = back ^ ((x ^ back) & m): x where m is 0xFF, the background row elsewhere
                _gather(dst, bg, rows[i0:i1])
                tmp = scratch.images("tmp", i1 - i0)
                torch.bitwise_xor(x, dst, out=tmp)
                tmp &= m
                dst ^= tmp
        elif box_list is not None:
            _copy(dst, x)
            for j, box in enumerate(box_list[i0:i1]):
                _fill_box(dst, j, box, bg, None if rows is None else rows[i0 + j])
        elif direct:
            _copy(dst, x)
        else:
            dst = x  # Original: the epilogue reads the input itself
        _finish(dst, out[i0:i1], spec, stats)
    return out


def _gather(dst: torch.Tensor, bg: torch.Tensor, rows: list[int]) -> None:
    """Each image's background row into ``dst``; black where the row is negative or out of range."""
    n = bg.shape[0]
    for j, r in enumerate(rows):
        if 0 <= r < n:
            _copy(dst[j], bg[r])
        else:
            dst[j].zero_()


def _fill_box(t: torch.Tensor, j: int, box, bg: torch.Tensor | None = None, row: int | None = None) -> None:
    """Inside image ``j``'s box, ``t`` takes background row ``row`` of ``bg`` (0 without one, or out of range)."""
    h, w = t.shape[-2:]
    clipped = _clip_box(box, h, w)
    if clipped is None:
        return
    x0, y0, x1, y1 = clipped
    region = t[j, :, y0 : y1 + 1, x0 : x1 + 1]
    if bg is None or row is None or not 0 <= row < bg.shape[0]:
        region.zero_()
    else:
        _copy(region, bg[row, :, y0 : y1 + 1, x0 : x1 + 1])


# ----------------------------------------------------------------------------------------------- tile_fill
def tile_fill_cpu(images: torch.Tensor, boxes: torch.Tensor, strips: torch.Tensor,
                  spec: OutputSpec | None = None) -> torch.Tensor:
    """:func:`~bgsynth.kernels.tile.tile_fill_torch` on CPU tensors, fast and bit-identical (module docstring).

    Each box is filled by slice copies: one period of the tiling from the image, then the filled part doubled
    until the box is full (the tiling of a strip that spans the image's height repeats along x only, and that of
    a strip spanning its width along y only). A tile that repeats along both axes (never made by
    :func:`bgsynth.geometry.tile_strips`) is filled by one gather per axis.

    Shape: as :func:`bgsynth.kernels.tile_fill`.
    """
    spec = OutputSpec(torch.uint8, None, None, False) if spec is None else spec
    B, _, H, W = images.shape
    out = alloc_output((B, 3, H, W), spec, images.device)
    if B == 0 or H == 0 or W == 0:
        return out
    nhwc = _compute_layout(images, spec)
    box_list, strip_list = boxes.tolist(), strips.tolist()
    stats = _stats(spec, W)
    direct = _direct(out, spec, nhwc)
    chunk = _chunk_images(H, W)
    scratch = _Scratch(min(chunk, B), H, W, nhwc)
    for i0 in range(0, B, chunk):
        i1 = min(i0 + chunk, B)
        x = _in_layout(images[i0:i1], nhwc)
        dst = out[i0:i1] if direct else scratch.images("dst", i1 - i0)
        _copy(dst, x)
        for j in range(i1 - i0):
            _tile_one(dst, x, j, box_list[i0 + j], strip_list[i0 + j])
        _finish(dst, out[i0:i1], spec, stats)
    return out


def _tile_one(dst: torch.Tensor, src: torch.Tensor, j: int, box, strip) -> None:
    """Fill image ``j``'s box in ``dst`` with the tiling of its strip of ``src`` (see :func:`tile_fill_cpu`)."""
    h, w = src.shape[-2:]
    sx0, sy0, tw, th = strip
    if not (tw > 0 and th > 0 and sx0 >= 0 and sy0 >= 0 and sx0 + tw <= w and sy0 + th <= h):
        return  # no tile (or one outside the image): the row stays unchanged, as in the reference
    clipped = _clip_box(box, h, w)
    if clipped is None:
        return
    x0, y0, x1, y1 = clipped
    if sy0 == 0 and th > y1:  # rows map to themselves: the tiling repeats along x
        _tile_axis(dst[j, :, y0 : y1 + 1], src[j, :, y0 : y1 + 1], 2, x0, x1, sx0, tw)
    elif sx0 == 0 and tw > x1:  # columns map to themselves: along y
        _tile_axis(dst[j, :, :, x0 : x1 + 1], src[j, :, :, x0 : x1 + 1], 1, y0, y1, sy0, th)
    else:  # a tile repeating along both axes: one gather per axis over the box
        ys = sy0 + torch.arange(y0, y1 + 1) % th
        xs = sx0 + torch.arange(x0, x1 + 1) % tw
        dst[j, :, y0 : y1 + 1, x0 : x1 + 1] = src[j].index_select(1, ys).index_select(2, xs)


def _tile_axis(dst: torch.Tensor, src: torch.Tensor, axis: int, a0: int, a1: int, s0: int, period: int) -> None:
    """Along ``axis`` of one image ``[3, h, w]``: ``dst[a] = src[s0 + a % period]`` for ``a0 <= a <= a1``."""
    total = a1 - a0 + 1
    first = min(period, total)
    phase = a0 % period
    n1 = min(period - phase, first)  # up to the end of the strip, then from its start
    dst.narrow(axis, a0, n1).copy_(src.narrow(axis, s0 + phase, n1))
    if first > n1:
        dst.narrow(axis, a0 + n1, first - n1).copy_(src.narrow(axis, s0, first - n1))
    filled = first  # a multiple of the period from here on, so copying the filled part continues the tiling
    while filled < total:
        k = min(filled, total - filled)
        dst.narrow(axis, a0 + filled, k).copy_(dst.narrow(axis, a0, k))
        filled += k
