"""The one seeded hash scheme of bgsynth: every random choice is a pure function of (seed, what, id).

Background choice (:mod:`bgsynth.variants`), augmentation draws (:mod:`bgsynth.augment`), training order and
subset sampling all draw their randomness here, from a counter-based generator rather than a stateful RNG, so a
choice never depends on the batch size, the order of the samples, the number of workers or ranks, or the device:

    key = fold(w1, w2, ...) = splitmix64(... splitmix64(splitmix64(0 ^ w1) ^ w2) ...)   (host, Python integers)
    h   = splitmix64(id ^ key)                                                      (device, int64 two's complement)

with ``splitmix64(x) = mix(x + 0x9E3779B97F4A7C15)`` (Steele, Lea & Flood 2014). Tensor words (e.g. a per-draw
counter) are mixed in after: ``h = splitmix64(h ^ w)``. The variants' background hash is
``hash_bits(image_id, seed, variant_code)``.

>>> splitmix64(0)
16294208416658607535
>>> hash_bits(torch.tensor([7]), 0, 6).tolist() == [splitmix64(torch.tensor([7]) ^ signed(fold(0, 6))).item()]
True
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["M64", "splitmix64", "signed", "srl", "fold", "hash_bits", "hash_uniform", "hash_below"]

M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def signed(v: int) -> int:
    """A 64-bit pattern (Python integer) as the int64 value with the same bits."""
    v &= M64
    return v - (1 << 64) if v >= 1 << 63 else v


def splitmix64(x):
    """SplitMix64 of a Python integer (unsigned 64-bit result) or of an int64 tensor (two's complement result).

    >>> splitmix64(0)
    16294208416658607535
    """
    if isinstance(x, torch.Tensor):
        z = x.to(torch.int64) + signed(_GAMMA)
        z = (z ^ srl(z, 30)) * signed(_C1)
        z = (z ^ srl(z, 27)) * signed(_C2)
        return z ^ srl(z, 31)
    z = (int(x) + _GAMMA) & M64
    z = ((z ^ (z >> 30)) * _C1) & M64
    z = ((z ^ (z >> 27)) * _C2) & M64
    return z ^ (z >> 31)


def srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def fold(*words: int) -> int:
    """Fold integers into one 64-bit key with :func:`splitmix64` (host arithmetic)."""
    key = 0
    for w in words:
        key = splitmix64(key ^ (int(w) & M64))
    return key


def hash_bits(ids: torch.Tensor, *words: int | torch.Tensor) -> torch.Tensor:
    """64 pseudo-random bits per id, a pure function of ``(ids, *words)``.

    The scheme of :func:`bgsynth.variants.choose_backgrounds` (one RNG scheme for the engine): the integer words
    are folded on the host, ``key = splitmix64(... splitmix64(0 ^ w1) ^ w2 ...)``, then
    ``h = splitmix64(id ^ key)`` on the device; tensor words (e.g. a per-draw counter) are mixed in after,
    ``h = splitmix64(h ^ w)``.

    Args:
        ids: integer tensor (any shape) of image ids.
        *words: integers, e.g. ``(seed, epoch, stream)``, then optionally tensors broadcastable with ``ids``.

    Returns:
        ``int64`` tensor of the broadcast shape (the bits, as signed int64), on ``ids``' device; identical on
        CPU and CUDA.

    >>> hash_bits(torch.tensor([1, 2]), 0).shape
    torch.Size([2])
    """
    is_t = [isinstance(w, torch.Tensor) for w in words]
    first = is_t.index(True) if any(is_t) else len(words)
    if not all(is_t[first:]):
        raise ConfigError("hash_bits: integer words must come before tensor words")
    ints, tens = words[:first], words[first:]
    h = splitmix64(ids.to(torch.int64) ^ signed(fold(*ints)))
    for w in tens:
        h = splitmix64(h ^ w.to(device=h.device, dtype=torch.int64))
    return h


def hash_uniform(ids: torch.Tensor, *words: int | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniforms in ``[0, 1)`` as a pure function of ``(ids, *words)`` (53 bits of :func:`hash_bits`).

    >>> u = hash_uniform(torch.arange(10000), 7, 0, 1)
    >>> 0.48 < float(u.mean()) < 0.52
    True
    """
    return (srl(hash_bits(ids, *words), 11).to(torch.float64) * (1.0 / (1 << 53))).to(dtype)


def hash_below(ids: torch.Tensor, n: torch.Tensor, *words: int) -> torch.Tensor:
    """Integers uniform in ``[0, n)`` (``n >= 1``, int64 tensor broadcastable with ``ids``): Lemire's multiply-shift."""
    top32 = srl(hash_bits(ids, *words), 32)
    return (top32 * n.to(torch.int64)) >> 32
