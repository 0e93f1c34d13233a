"""The ``torchvision`` decode backend: :func:`torchvision.io.decode_jpeg` + ``transforms.v2.functional.resize``.

* CPU target: each JPEG is decoded with libjpeg-turbo (``decode_jpeg(..., device="cpu")``) on ``num_threads``
  threads, resized to the exact ``plan.resized`` with ``resize(..., BILINEAR, antialias=True)`` (torchvision's
  uint8 path, which follows PIL's filter) and centre-cropped at ``plan.offset``.
* CUDA target: the whole batch is decoded at once with nvJPEG (``decode_jpeg(list_of_tensors, device="cuda")``),
  then resized and cropped on the GPU. Should the batched call fail, files are retried one by one on the GPU,
  then on the CPU, then with PIL.

``apply_exif_orientation=False``: boxes and masks are in stored-pixel coordinates. Files that are not 8-bit
grey/YCbCr JPEGs (CMYK, PNG data, other formats) are decoded by PIL (see :mod:`bgsynth.pipeline.common`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..probe import SampleError
from .common import DecodeLoader
from .host import HostSample, check_decoded_size, only_bg_t_full

__all__ = ["TorchvisionLoader", "tv_resize_crop"]


def tv_resize_crop(image: torch.Tensor, plan) -> torch.Tensor:
    """Resize a ``uint8 [3, H, W]`` tensor to ``plan.resized`` (bilinear, antialiased) and centre-crop it.

    Returns:
        ``uint8 [3, C, C]`` on the input's device.
    """
    from torchvision.transforms.v2 import functional as F  # optional backend: imported when it runs

    rh, rw = plan.resized
    top, left = plan.offset
    c = plan.crop
    if (rh, rw) != tuple(image.shape[-2:]):
        image = F.resize(image, [rh, rw], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return image[:, top : top + c, left : left + c]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


class TorchvisionLoader(DecodeLoader):
    """Decode backend ``torchvision`` (see the module docstring)."""

    name = "torchvision"

    def _crops(self, img: torch.Tensor, sample: HostSample) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(crop, paper Only-BG-T crop or None)`` of a decoded full-resolution ``uint8 [3, H, W]`` image."""
        crop = tv_resize_crop(img, sample.plan)
        if not self.wants_bgt(sample):
            return crop, None
        return crop, tv_resize_crop(only_bg_t_full(img, sample), sample.plan)

    def _decode_one_cpu(self, sample: HostSample) -> tuple | SampleError:
        from torchvision.io import ImageReadMode, decode_jpeg  # optional backend, looked up at call time

        try:
            img = decode_jpeg(_as_tensor(sample.data), mode=ImageReadMode.RGB, apply_exif_orientation=False)
            check_decoded_size(sample, img.shape[-2], img.shape[-1], "torchvision.io.decode_jpeg")
            return self._crops(img, sample)
        except SampleError as e:
            return e
        except RuntimeError as e:
            return SampleError("decoder_refused", f"torchvision.io.decode_jpeg: {str(e).splitlines()[-1]}")

    def _decode_cuda(self, samples: Sequence[HostSample]) -> list[tuple | SampleError]:
        from torchvision.io import ImageReadMode, decode_jpeg  # optional backend, looked up at call time

        datas = [_as_tensor(s.data) for s in samples]
        kw = dict(mode=ImageReadMode.RGB, apply_exif_orientation=False, device=self.device)
        try:
            decoded: list = list(decode_jpeg(datas, **kw))
        except RuntimeError:
            decoded = []
            for d in datas:
                try:
                    decoded.append(decode_jpeg(d, **kw))
                except RuntimeError:
                    decoded.append(None)
        out: list[tuple | SampleError] = []
        for s, img in zip(samples, decoded):
            if img is None:  # nvJPEG refused this file: libjpeg-turbo on the CPU, then PIL (in the base class)
                cpu = self._decode_one_cpu(s)
                out.append(cpu if isinstance(cpu, SampleError) else tuple(
                    None if t is None else t.to(self.device, non_blocking=True) for t in cpu))
                continue
            try:
                check_decoded_size(s, img.shape[-2], img.shape[-1], "torchvision.io.decode_jpeg (cuda)")
            except SampleError as e:
                out.append(e)
                continue
            out.append(self._crops(img, s))
        return out

    def decode_fast(self, samples: Sequence[HostSample]) -> list[tuple | SampleError]:
        if self.device.type == "cuda":
            return self._decode_cuda(samples)
        return self._map(self._decode_one_cpu, samples)
