"""The ``dali`` decode backend: an NVIDIA DALI pipeline fed with encoded bytes and our exact crop geometry.

The pipeline (built with :func:`nvidia.dali.pipeline_def`) has three external sources: the encoded JPEG bytes
and, per sample, the source-space window of the centre crop (``roi_start``/``roi_end``, derived from the
:class:`~bgsynth.geometry.CropPlan`). It runs

``fn.decoders.image(device="mixed" on CUDA | "cpu", output_type=RGB, adjust_orientation=False)``
-> ``fn.resize(size=[C, C], roi_start, roi_end, roi_relative=False, interp_type=INTERP_LINEAR, antialias=True)``

i.e. the resize and the crop are one operation: output pixel ``j`` of the crop samples the source at
``(left + j + 0.5) * W / rw`` exactly as resizing the whole image to ``plan.resized`` and cropping at
``plan.offset`` would, with the same antialiasing filter scale, but only the ``C x C`` crop is computed (DALI's
CPU resize is otherwise its most expensive step).

With ``tiling="paper"`` the graph has a second branch for the paper's Only-BG-T, built from the decoded
full-resolution pixels inside the pipeline (no Python callback, so it runs on the GPU with ``mixed`` decode):
``fn.multi_paste`` copies the image onto itself as a set of non-overlapping rectangles (:func:`paste_plan`): the
four bands outside the union box unchanged, and inside the box one rectangle per period of the tiled strip, each
taken from the strip at the right phase. The result is resized with the same crop window as the Original.

Without CUDA the pipeline runs in DALI's CPU-only mode (``device_id=None``). Outputs become torch tensors through
``nvidia.dali.plugin.pytorch.feed_ndarray`` on CUDA (on the loader's side stream) and through NumPy on the CPU.
``adjust_orientation=False``: boxes and masks are in stored-pixel coordinates. A failed DALI run invalidates the
pipeline, so the batch is retried one file at a time in a rebuilt pipeline and the files DALI refuses go to PIL.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..probe import SampleError
from .common import DecodeLoader
from .host import HostSample, check_decoded_size

__all__ = ["DALILoader", "crop_window", "paste_plan"]


def crop_window(plan) -> tuple[np.ndarray, np.ndarray]:
    """Source-space ``(y, x)`` start and end of the centre crop of a :class:`~bgsynth.geometry.CropPlan`.

    >>> from bgsynth.geometry import CropGeometry
    >>> s, e = crop_window(CropGeometry(4, 2).plan(4, 8))   # resized 4x8, crop offset (1, 3)
    >>> s.tolist(), e.tolist()
    ([1.0, 3.0], [3.0, 5.0])
    """
    rh, rw = plan.resized
    top, left = plan.offset
    sy, sx = plan.height / rh, plan.width / rw
    start = np.array([top * sy, left * sx], dtype=np.float32)
    end = np.array([(top + plan.crop) * sy, (left + plan.crop) * sx], dtype=np.float32)
    return start, end


def paste_plan(height: int, width: int, box, strip) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fn.multi_paste`` arguments that turn an ``H x W`` image into its paper Only-BG-T (see the module doc).

    Args:
        height, width: stored image size.
        box: inclusive union box ``(x0, y0, x1, y1)`` in stored pixels (clipped to the image here).
        strip: the tile ``(sx0, sy0, tw, th)`` of :func:`bgsynth.geometry.tile_strips` (a full-height left/right
            strip or a full-width top/bottom strip), or ``None``: the image is copied unchanged.

    Returns:
        ``(in_anchors, shapes, out_anchors)``, each ``int32 [K, 2]`` in ``(y, x)`` order; the ``K`` rectangles
        tile the ``H x W`` output exactly once.

    >>> ia, sh, oa = paste_plan(4, 6, (2, 1, 4, 2), (5, 0, 1, 4))   # right strip of width 1 tiles the box
    >>> [tuple(r) for r in oa.tolist()], [tuple(r) for r in ia.tolist()[-3:]]
    ([(0, 0), (3, 0), (1, 0), (1, 5), (1, 2), (1, 3), (1, 4)], [(1, 5), (1, 5), (1, 5)])
    """
    H, W = int(height), int(width)
    if strip is None:
        whole = np.array([[0, 0]], np.int32)
        return whole, np.array([[H, W]], np.int32), whole.copy()
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W - 1), min(y1, H - 1)
    sx0, sy0, tw, th = (int(v) for v in strip)
    rects = []  # (in_y, in_x, h, w, out_y, out_x)
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    if y0 > 0:
        rects.append((0, 0, y0, W, 0, 0))
    if y1 < H - 1:
        rects.append((y1 + 1, 0, H - 1 - y1, W, y1 + 1, 0))
    if x0 > 0:
        rects.append((y0, 0, bh, x0, y0, 0))
    if x1 < W - 1:
        rects.append((y0, x1 + 1, bh, W - 1 - x1, y0, x1 + 1))
    if th == H:  # a left/right strip: the tiling repeats along x
        for k in range(x0 // tw, x1 // tw + 1):
            xa, xb = max(x0, k * tw), min(x1, k * tw + tw - 1)
            rects.append((y0, sx0 + xa - k * tw, bh, xb - xa + 1, y0, xa))
    else:  # a top/bottom strip: along y
        for k in range(y0 // th, y1 // th + 1):
            ya, yb = max(y0, k * th), min(y1, k * th + th - 1)
            rects.append((sy0 + ya - k * th, x0, yb - ya + 1, bw, ya, x0))
    r = np.asarray(rects, np.int32)
    return np.ascontiguousarray(r[:, 0:2]), np.ascontiguousarray(r[:, 2:4]), np.ascontiguousarray(r[:, 4:6])


def _build_pipeline(batch_size: int, num_threads: int, device_id: int | None, crop: int, bgt: bool = False):
    # nvidia.dali: a heavy optional dependency, imported only when a DALI pipeline is built
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    decoder_device = "cpu" if device_id is None else "mixed"

    @pipeline_def
    def graph():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
        shapes = images.shape(dtype=types.INT32)

        def resize_crop(x):
            return fn.resize(
                x,
                size=[crop, crop],
                roi_start=roi_start,
                roi_end=roi_end,
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )

        if not bgt:
            return resize_crop(images), shapes
        tiled = fn.multi_paste(
            images,
            in_ids=fn.external_source(name="paste_ids", dtype=types.INT32, ndim=1),
            in_anchors=fn.external_source(name="paste_in", dtype=types.INT32, ndim=2),
            shapes=fn.external_source(name="paste_shape", dtype=types.INT32, ndim=2),
            out_anchors=fn.external_source(name="paste_out", dtype=types.INT32, ndim=2),
            output_size=fn.external_source(name="paste_size", dtype=types.INT32, ndim=1),
        )
        return resize_crop(images), shapes, resize_crop(tiled)

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    pipe.build()
    return pipe


class DALILoader(DecodeLoader):
    """Decode backend ``dali`` (see the module docstring)."""

    name = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            device_id = None if self.device.type == "cpu" else int(self.device.index or 0)
            self._pipe = _build_pipeline(self.batch_size, self.num_threads, device_id, self.geometry.crop,
                                         bgt=self.make_bgt)
        return self._pipe

    def close(self) -> None:
        self._pipe = None
        super().close()

    def _feed_pastes(self, pipe, samples: Sequence[HostSample]) -> None:
        plans = [
            paste_plan(s.record.height, s.record.width, s.record.union_box, s.strip if self.wants_bgt(s) else None)
            for s in samples
        ]
        pipe.feed_input("paste_ids", [np.full(len(p[0]), k, np.int32) for k, p in enumerate(plans)])
        pipe.feed_input("paste_in", [p[0] for p in plans])
        pipe.feed_input("paste_shape", [p[1] for p in plans])
        pipe.feed_input("paste_out", [p[2] for p in plans])
        pipe.feed_input("paste_size", [np.array([s.record.height, s.record.width], np.int32) for s in samples])

    def _run(self, samples: Sequence[HostSample]) -> list[tuple | SampleError]:
        pipe = self._pipeline()
        windows = [crop_window(s.plan) for s in samples]
        pipe.feed_input("jpegs", [np.frombuffer(s.data, dtype=np.uint8) for s in samples])
        pipe.feed_input("roi_start", [w[0] for w in windows])
        pipe.feed_input("roi_end", [w[1] for w in windows])
        if self.make_bgt:
            self._feed_pastes(pipe, samples)
        c = self.geometry.crop
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray  # optional dependency (see _build_pipeline)

            stream = torch.cuda.current_stream(self.device)
            outs = pipe.run(stream)

            def to_torch(tl):
                t = torch.empty((len(samples), c, c, 3), dtype=torch.uint8, device=self.device)
                feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
                return t.permute(0, 3, 1, 2)

            out = to_torch(outs[0])
            shapes = np.asarray(outs[1].as_cpu().as_array())
            tiled = to_torch(outs[2]) if self.make_bgt else None
        else:
            outs = pipe.run()
            out = np.asarray(outs[0].as_array()).transpose(0, 3, 1, 2)  # views; the loader stacks them once
            shapes = np.asarray(outs[1].as_array())
            tiled = np.asarray(outs[2].as_array()).transpose(0, 3, 1, 2) if self.make_bgt else None
        results: list[tuple | SampleError] = []
        for k, s in enumerate(samples):
            try:
                check_decoded_size(s, shapes[k][0], shapes[k][1], "DALI fn.decoders.image")
                results.append((out[k], tiled[k] if tiled is not None and self.wants_bgt(s) else None))
            except SampleError as e:
                results.append(e)
        return results

    def decode_fast(self, samples: Sequence[HostSample]) -> list[tuple | SampleError]:
        try:
            return self._run(samples)
        except RuntimeError:
            self._pipe = None  # a failed run leaves the pipeline unusable
        results: list[tuple | SampleError] = []
        for s in samples:
            try:
                results.extend(self._run([s]))
            except RuntimeError as e:
                self._pipe = None
                msg = [ln for ln in str(e).splitlines() if ln.strip()]
                results.append(SampleError("decoder_refused", f"DALI: {msg[-1] if msg else e}"))
        return results
