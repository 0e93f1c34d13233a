"""The ``pil`` decode backend: the plain reference every other backend is compared with.

Per image: :func:`PIL.Image.open` on the bytes, ``convert("RGB")`` (grey, CMYK, palette and alpha images become
RGB), ``resize`` to the exact ``plan.resized`` with ``Image.BILINEAR`` (PIL's bilinear filter widens its support
when downscaling, i.e. it is antialiased), then the centre crop at ``plan.offset``. This is the same computation
as ``torchvision.transforms.Resize(resize) + CenterCrop(crop)`` on a PIL image. EXIF orientation is not applied
(no ``ImageOps.exif_transpose``): boxes and masks are in stored-pixel coordinates.

Decoding runs on ``num_threads`` threads (PIL releases the GIL while it decodes and resamples).
"""

from __future__ import annotations

import io

import numpy as np

from ..index import Reject
from .common import DecodeLoader, HostSample, SampleError, check_decoded_size, only_bg_t_full

__all__ = ["PILLoader", "pil_decode_crop", "pil_resize_crop"]


def pil_resize_crop(image, plan) -> np.ndarray:
    """Resize a PIL image to ``plan.resized`` (bilinear, antialiased) and centre-crop it -> ``uint8 [C, C, 3]``.

    Args:
        image: an RGB :class:`PIL.Image.Image` of the stored size ``(plan.width, plan.height)``.
        plan: its :class:`~bgsynth.geometry.CropPlan`.
    """
    from PIL import Image

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
            (:func:`~bgsynth.pipeline.common.only_bg_t_full`), then resized and cropped exactly like the image.

    Returns:
        ``(crop, bgt_crop)``: ``uint8 [3, C, C]`` NumPy views (channel-first views of ``[C, C, 3]`` crops),
        ``bgt_crop`` ``None`` unless asked for; or a :class:`SampleError` (truncated/undecodable data, or a
        decoded size other than the index's).
    """
    from PIL import Image, UnidentifiedImageError

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


class PILLoader(DecodeLoader):
    """Decode backend ``pil``: PIL decode + resize + crop on host threads (see the module docstring)."""

    name = "pil"

    def uses_fast_route(self) -> bool:
        return False  # every file takes the PIL path of the base class (no fallbacks to record)
