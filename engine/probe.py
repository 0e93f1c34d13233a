"""Image probing: what a file's bytes are, before (or instead of) decoding its pixels. One set of rules for everyone.

Two entry points share the same header parser, so the ingest, the mask preparation and every decode backend
reject the same files for the same reasons:

* :func:`probe_image` (bytes -> :class:`ImageProbe`, or :class:`SampleError`): JPEG and PNG headers are parsed
  directly (stored size, number of colour components, truncation: a JPEG whose last end-of-image marker lies
  before its first scan was cut short, a PNG without its IEND chunk); anything else is identified by PIL's lazy
  open. It also says whether a fast JPEG decoder (torchvision.io, DALI) handles the file exactly like PIL
  (``route``), the decoders' business.
* :func:`probe_file` (path -> :class:`ProbeResult`, never raises for bad input): the ingest's probe. The same
  header rules, then PIL for the colour mode and EXIF orientation and, with ``verify='full'``, a decode of every
  pixel (catches corrupt data anywhere in the stream).

What counts as usable: any file PIL can decode, whatever its extension says (grey, CMYK and palette JPEGs, PNG
data in a ``.JPEG`` file, RGBA PNGs); decoders convert them to RGB. Sizes are stored sizes: EXIF orientation is
recorded but never applied, because ILSVRC boxes and released masks are in stored-pixel coordinates.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import warnings

from .errors import ConfigError
from .index import Reject

__all__ = ["SampleError", "ImageProbe", "probe_image", "ProbeResult", "probe_file", "sniff_format", "VERIFY_MODES"]

VERIFY_MODES = ("full", "header")
_EXIF_ORIENTATION = 0x0112

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CUT_HEADERS = "JPEG stream ends inside its headers"


class SampleError(Exception):
    """One image could not be used: ``reason`` is a :class:`~bgsynth.index.Reject` string, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------------------
# Probing the encoded bytes (no pixel decode)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageProbe:
    """What the container header says about an encoded image.

    Attributes:
        format: ``"JPEG"``, ``"PNG"`` or the PIL format name of anything else.
        height, width: stored pixel size (before any EXIF orientation).
        components: number of colour components (JPEG: 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK; 0 if unknown).
        route: ``"fast"`` when a JPEG decoder (torchvision.io, DALI) handles it exactly like PIL (8-bit JPEG with 1
            or 3 components), else ``"pil"`` (PIL decodes it in every backend).
        why_pil: why the file takes the PIL route (empty for ``"fast"``).
    """

    format: str
    height: int
    width: int
    components: int
    route: str
    why_pil: str = ""


def _cut(data: bytes) -> SampleError:
    """The stream ran out inside the headers: cut short, unless it ends with an end-of-image marker, in which case
    its headers are garbage (a corrupt file, not a truncated one)."""
    if data.endswith(b"\xff\xd9"):
        return SampleError(Reject.UNREADABLE, "JPEG headers are corrupt: no frame and scan before the end-of-image marker")
    return SampleError(Reject.TRUNCATED, _CUT_HEADERS)


def _probe_jpeg(data: bytes) -> ImageProbe:
    n = len(data)
    pos = 2
    sof: tuple[int, int, int, int] | None = None
    sos = -1
    while True:
        if pos >= n:
            raise _cut(data)
        if data[pos] != 0xFF:  # stray bytes between segments: skip to the next marker as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise _cut(data)
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _cut(data)
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise SampleError(Reject.UNREADABLE, "JPEG stream ends (EOI) before any image data")
        if pos + 2 > n:
            raise _cut(data)
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise SampleError(Reject.UNREADABLE, f"JPEG segment 0x{marker:02x} with length {length}")
        if marker in _SOF_MARKERS:
            if pos + 8 > n:
                raise _cut(data)
            sof = struct.unpack(">BHHB", data[pos + 2 : pos + 8])
        elif marker == 0xDA:
            sos = pos - 2
            break
        pos += length
    if sof is None:  # not a frame this parser knows (e.g. lossless/JPEG-LS): PIL decides
        return _probe_pil(data, "JPEG without a baseline/progressive frame header")
    # EOI (FF D9) cannot occur inside entropy-coded data (0xFF is byte-stuffed there), so a stream whose last
    # EOI lies before the first scan was cut short; an EXIF thumbnail's EOI sits before the scan.
    if data.rfind(b"\xff\xd9") < sos:
        raise SampleError(Reject.TRUNCATED, f"JPEG stream cut after {n} bytes (no end-of-image marker)")
    precision, h, w, comps = sof
    if h == 0 or w == 0:
        raise SampleError(Reject.UNREADABLE, f"JPEG frame header with size {w}x{h}")
    if precision != 8:
        return ImageProbe("JPEG", h, w, comps, "pil", f"{precision}-bit JPEG")
    if comps == 4:
        return ImageProbe("JPEG", h, w, comps, "pil", "CMYK JPEG")
    if comps not in (1, 3):
        return ImageProbe("JPEG", h, w, comps, "pil", f"JPEG with {comps} components")
    return ImageProbe("JPEG", h, w, comps, "fast")


def _probe_pil(data: bytes, why: str) -> ImageProbe:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = str(im.format or "unknown")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(Reject.UNREADABLE, f"not a recognised image format ({e})") from None
    return ImageProbe(fmt, int(h), int(w), 0, "pil", why or f"{fmt} data")


def probe_image(data: bytes) -> ImageProbe:
    """Inspect encoded image bytes without decoding the pixels.

    JPEG and PNG headers are parsed directly (size, components, truncation); any other format is identified
    by PIL's lazy :func:`PIL.Image.open`, which reads the header only.

    Args:
        data: the file's bytes.

    Returns:
        An :class:`ImageProbe`.

    Raises:
        SampleError: zero-byte, truncated or unreadable data (with a :class:`~bgsynth.index.Reject` reason).

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (5, 4)).save(buf, "JPEG")
    >>> p = probe_image(buf.getvalue()); (p.format, p.height, p.width, p.components, p.route)
    ('JPEG', 4, 5, 3, 'fast')
    """
    if len(data) == 0:
        raise SampleError(Reject.ZERO_BYTE, "file has 0 bytes")
    if data[:2] == b"\xff\xd8":
        return _probe_jpeg(data)
    if data[:8] == _PNG_MAGIC:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise SampleError(Reject.TRUNCATED, "PNG stream ends before its header")
        w, h = struct.unpack(">II", data[16:24])
        if data.rfind(b"IEND") < 33:  # the IEND chunk follows the 33-byte signature + IHDR
            raise SampleError(Reject.TRUNCATED, f"PNG stream cut after {len(data)} bytes (no IEND chunk)")
        return ImageProbe("PNG", int(h), int(w), 0, "pil", "PNG data")
    return _probe_pil(data, "")


# --------------------------------------------------------------------------------------------------------------
# Files (the ingest's probe)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What probing one image file found.

    Attributes:
        path: the file probed.
        reason: ``None`` for a usable image, else a :class:`~bgsynth.index.Reject` reason.
        detail: human-readable explanation of a reject (empty when usable).
        width, height: stored pixel size (``0`` when rejected before the header was read).
        format: container format found in the bytes (``'JPEG'``, ``'PNG'``, ...), independent of the extension.
        mode: PIL colour mode (``'RGB'``, ``'L'``, ``'CMYK'``, ``'P'``, ``'RGBA'``, ...).
        exif_orientation: EXIF orientation tag (1..8; 1 when absent). Not applied to width/height.
    """

    path: str
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str | None = None
    mode: str | None = None
    exif_orientation: int = 1

    @property
    def ok(self) -> bool:
        return self.reason is None

    def entry_fields(self) -> dict:
        """The fields an index image entry takes from the probe."""
        return {
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "mode": self.mode,
            "exif_orientation": self.exif_orientation,
        }


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(head: bytes) -> str | None:
    """Container format from the first bytes of a file (``None`` if it is not a known image format)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def probe_file(path: str | os.PathLike, verify: str = "full") -> ProbeResult:
    """Probe one image file without ever raising on bad input.

    Args:
        path: the image file.
        verify: ``'full'`` also decodes every pixel (catches corrupt data anywhere); ``'header'`` stops after the
            header rules of :func:`probe_image` (fast).

    Returns:
        A :class:`ProbeResult`; ``result.ok`` tells whether the image is usable.

    Reject reasons: :attr:`Reject.MISSING_FILE`, :attr:`Reject.ZERO_BYTE`, :attr:`Reject.TRUNCATED` (the data
    ends early), :attr:`Reject.UNREADABLE` (not an image, or corrupt).
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"probe_file: expected verify in {VERIFY_MODES}, got {verify!r}")
    spath = str(path)
    try:
        with open(spath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ProbeResult(spath, Reject.MISSING_FILE, "file not found")
    except (IsADirectoryError, PermissionError, OSError) as e:
        return ProbeResult(spath, Reject.UNREADABLE, f"cannot read file: {e}")
    fmt = sniff_format(data[:16])
    try:
        probe_image(data)
    except SampleError as e:
        return ProbeResult(spath, e.reason, e.detail, format=fmt)

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = int(im.size[0]), int(im.size[1])
            mode = str(im.mode)
            pil_format = str(im.format or fmt)
            try:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block does not make the pixels unusable
                orientation = 1
            if not 1 <= orientation <= 8:
                orientation = 1
            if verify == "full":
                im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ProbeResult(spath, Reject.UNREADABLE, f"{fmt or 'image'} data cannot be decoded: {e}", format=fmt)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        reason = Reject.TRUNCATED if "truncated" in msg.lower() else Reject.UNREADABLE
        return ProbeResult(spath, reason, f"{fmt or 'image'} data cannot be decoded: {msg}", format=fmt)
    return ProbeResult(spath, None, "", width, height, pil_format, mode, orientation)
