"""The ``dali`` decode backend: an NVIDIA DALI pipeline fed with encoded bytes and our exact crop geometry.

The pipeline (built with :func:`nvidia.dali.pipeline_def`) has three external sources: the encoded JPEG bytes
and, per sample, the source-space window of the centre crop (``roi_start``/``roi_end``, derived from the
:class:`~engine.geometry.CropPlan`). It runs

``fn.decoders.image(device="mixed" on CUDA | "cpu", output_type=RGB, adjust_orientation=False)``
-> ``fn.resize(size=[C, C], roi_start, roi_end, roi_relative=False, interp_type=INTERP_LINEAR, antialias=True)``

i.e. the resize and the crop are one operation: output pixel ``j`` of the crop samples the source at
``(left + j + 0.5) * W / rw`` exactly as resizing the whole image to ``plan.resized`` and cropping at
``plan.offset`` would, with the same antialiasing filter scale, but only the ``C x C`` crop is computed (DALI's
CPU resize is otherwise its most expensive step).

Without CUDA the pipeline runs in DALI's CPU-only mode (``device_id=None``). Outputs become torch tensors through
``nvidia.dali.plugin.pytorch.feed_ndarray`` on CUDA (on the loader's side stream) and through NumPy on the CPU.
``adjust_orientation=False``: boxes and masks are in stored-pixel coordinates. A failed DALI run invalidates the
pipeline, so the batch is retried one file at a time in a rebuilt pipeline and the files DALI refuses go to PIL.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .common import DecodeLoader, HostSample, SampleError, check_decoded_size

__all__ = ["DALILoader", "crop_window"]


def crop_window(plan) -> tuple[np.ndarray, np.ndarray]:
    """Source-space ``(y, x)`` start and end of the centre crop of a :class:`~engine.geometry.CropPlan`.

    >>> from engine.geometry import CropGeometry
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


def _build_pipeline(batch_size: int, num_threads: int, device_id: int | None, crop: int):
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
        crops = fn.resize(
            images,
            size=[crop, crop],
            roi_start=roi_start,
            roi_end=roi_end,
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        return crops, shapes

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
            self._pipe = _build_pipeline(self.batch_size, self.num_threads, device_id, self.geometry.crop)
        return self._pipe

    def close(self) -> None:
        self._pipe = None
        super().close()

    def _run(self, samples: Sequence[HostSample]) -> list[torch.Tensor | np.ndarray | SampleError]:
        pipe = self._pipeline()
        windows = [crop_window(s.plan) for s in samples]
        pipe.feed_input("jpegs", [np.frombuffer(s.data, dtype=np.uint8) for s in samples])
        pipe.feed_input("roi_start", [w[0] for w in windows])
        pipe.feed_input("roi_end", [w[1] for w in windows])
        c = self.geometry.crop
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            stream = torch.cuda.current_stream(self.device)
            crops_tl, shapes_tl = pipe.run(stream)
            out = torch.empty((len(samples), c, c, 3), dtype=torch.uint8, device=self.device)
            feed_ndarray(crops_tl.as_tensor(), out, cuda_stream=stream)
            shapes = np.asarray(shapes_tl.as_cpu().as_array())
            out = out.permute(0, 3, 1, 2)
        else:
            crops_tl, shapes_tl = pipe.run()
            out = np.asarray(crops_tl.as_array()).transpose(0, 3, 1, 2)  # views; the loader stacks them once
            shapes = np.asarray(shapes_tl.as_array())
        results: list[torch.Tensor | np.ndarray | SampleError] = []
        for k, s in enumerate(samples):
            try:
                check_decoded_size(s, shapes[k][0], shapes[k][1], "DALI fn.decoders.image")
                results.append(out[k])
            except SampleError as e:
                results.append(e)
        return results

    def decode_fast(self, samples: Sequence[HostSample]) -> list[torch.Tensor | np.ndarray | SampleError]:
        try:
            return self._run(samples)
        except RuntimeError:
            self._pipe = None  # a failed run leaves the pipeline unusable
        results: list[torch.Tensor | np.ndarray | SampleError] = []
        for s in samples:
            try:
                results.extend(self._run([s]))
            except RuntimeError as e:
                self._pipe = None
                msg = [ln for ln in str(e).splitlines() if ln.strip()]
                results.append(SampleError("decoder_refused", f"DALI: {msg[-1] if msg else e}"))
        return results
