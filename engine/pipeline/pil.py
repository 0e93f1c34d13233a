"""The ``pil`` decode backend: the plain reference every other backend is compared with.

Per image: :func:`PIL.Image.open` on the bytes, ``convert("RGB")`` (grey, CMYK, palette and alpha images become
RGB), ``resize`` to the exact ``plan.resized`` with ``Image.BILINEAR`` (PIL's bilinear filter widens its support
when downscaling, i.e. it is antialiased), then the centre crop at ``plan.offset``. This is the same computation
as ``torchvision.transforms.Resize(resize) + CenterCrop(crop)`` on a PIL image. EXIF orientation is not applied
(no ``ImageOps.exif_transpose``): boxes and masks are in stored-pixel coordinates.

Decoding runs on ``num_threads`` threads (PIL releases the GIL while it decodes and resamples).
"""

from __future__ import annotations

from .common import DecodeLoader
from .host import pil_decode_crop, pil_resize_crop

__all__ = ["PILLoader", "pil_decode_crop", "pil_resize_crop"]


class PILLoader(DecodeLoader):
    """Decode backend ``pil``: PIL decode + resize + crop on host threads (see the module docstring).

    The decode itself is :func:`~bgsynth.pipeline.host.pil_decode_crop`, the fallback of every other backend too.
    """

    name = "pil"

    def uses_fast_route(self) -> bool:
        return False  # every file takes the PIL path of the base class (no fallbacks to record)
