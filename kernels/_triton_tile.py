"""Triton kernel of :func:`bgsynth.kernels.tile.tile_fill` (imported lazily by its launcher)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import store_pixels

__all__ = ["tile_fill_kernel"]


# size: a Triton kernel takes every pointer, stride and compile-time flag as an argument
@triton.jit
def tile_fill_kernel(
    img_ptr, box_ptr, strip_ptr, mean_ptr, std_ptr, out_ptr,
    H, W, n_blocks,
    s_ib, s_ic, s_iy, s_ix,
    s_ob, s_oc, s_oy, s_ox,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program = one block of BLOCK pixels of one image (all 3 channels); grid = B * n_blocks
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    y = offs // W
    x = offs % W

    b64 = b.to(tl.int64)
    x0 = tl.load(box_ptr + b64 * 4 + 0)
    y0 = tl.load(box_ptr + b64 * 4 + 1)
    x1 = tl.load(box_ptr + b64 * 4 + 2)
    y1 = tl.load(box_ptr + b64 * 4 + 3)
    sx0 = tl.load(strip_ptr + b64 * 4 + 0)
    sy0 = tl.load(strip_ptr + b64 * 4 + 1)
    tw = tl.load(strip_ptr + b64 * 4 + 2)
    th = tl.load(strip_ptr + b64 * 4 + 3)
    # a tile outside the image (or empty) means "no Only-BG-T": the row is copied unchanged (memory-safe)
    has_tile = (tw > 0) & (th > 0) & (sx0 >= 0) & (sy0 >= 0) & (sx0 + tw <= W) & (sy0 + th <= H)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & has_tile
    tw_s = tl.maximum(tw, 1)
    th_s = tl.maximum(th, 1)
    sy = tl.where(inside, sy0 + y % th_s, y)
    sx = tl.where(inside, sx0 + x % tw_s, x)

    src = img_ptr + b64 * s_ib + sy * s_iy + sx * s_ix
    dst = out_ptr + b64 * s_ob + y * s_oy + x * s_ox
    for c in tl.static_range(3):
        v = tl.load(src + c * s_ic, mask=valid, other=0)
        store_pixels(dst + c * s_oc, v, c, mean_ptr, std_ptr, valid, MODE)
