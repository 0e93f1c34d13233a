"""Procedural rendering of the built-in dataset: scene backgrounds and foreground objects.

Everything here is a pure function of a :class:`numpy.random.Generator`: the same generator state gives the
same pixels, on any machine with the same numpy/OpenCV. Images are ``uint8 [H, W, 3]`` RGB; masks are
``uint8 [H, W]`` 0/1 and exact (objects are drawn as binary polygons, so a mask is precisely the set of pixels
whose colour came from the object).

Objects are described in a canonical frame (x to the right, y down, the object roughly inside ``[-1, 1]^2``,
facing right) and drawn through an affine map (scale, aspect, rotation, mirror, translation) straight at the
output resolution, so there is no resampling of masks or colours.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import cv2
import numpy as np

__all__ = [
    "SCENE_FAMILIES",
    "OBJECT_KINDS",
    "render_background",
    "render_object",
    "ObjectLayer",
]

#: The 9 scene families; family ``k`` is the "own" background of IN-9 class ``k``.
SCENE_FAMILIES: tuple[str, ...] = (
    "grass",  # 0 dog
    "sky",  # 1 bird
    "road",  # 2 wheeled vehicle
    "sand",  # 3 reptile
    "snow",  # 4 carnivore
    "rock",  # 5 insect
    "indoor",  # 6 musical instrument
    "forest",  # 7 primate
    "water",  # 8 fish
)

#: The kind of object drawn for each IN-9 class.
OBJECT_KINDS: tuple[str, ...] = ("dog", "bird", "car", "lizard", "fox", "ladybug", "guitar", "ape", "fish")

_SHIFT = 4  # sub-pixel bits for cv2 polygon filling
_ONE = 1 << _SHIFT


# ==============================================================================================================
# Noise and colour helpers
# ==============================================================================================================


def _noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth value noise in ``[0, 1]`` of shape ``[h, w]`` with a feature size of about ``cell`` pixels."""
    cell_x = cell_y if cell_x is None else cell_x
    gh = max(2, int(math.ceil(h / max(cell_y, 1.0))) + 2)
    gw = max(2, int(math.ceil(w / max(cell_x, 1.0))) + 2)
    grid = rng.random((gh, gw), dtype=np.float32)
    # upsample a little larger than needed and crop at a random offset so the grid is not aligned to the origin
    th, tw = int(round(gh * max(cell_y, 1.0))), int(round(gw * max(cell_x, 1.0)))
    big = cv2.resize(grid, (max(tw, w + 1), max(th, h + 1)), interpolation=cv2.INTER_CUBIC)
    oy = int(rng.integers(0, big.shape[0] - h + 1))
    ox = int(rng.integers(0, big.shape[1] - w + 1))
    return np.clip(big[oy : oy + h, ox : ox + w], 0.0, 1.0)


def _fractal(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, gain: float = 0.5,
             aniso: float = 1.0) -> np.ndarray:
    """Sum of ``octaves`` value-noise layers (cell halves, amplitude times ``gain``), normalised to ``[0, 1]``."""
    acc = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        acc += amp * _noise(rng, h, w, cell * aniso, cell)
        total += amp
        amp *= gain
        cell = max(cell / 2.0, 1.0)
    acc /= total
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / max(e1 - e0, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _col(rgb, rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """An RGB colour as float32 ``[3]`` in 0..255, optionally jittered per channel and in brightness."""
    c = np.asarray(rgb, np.float32)
    if rng is not None and jitter > 0:
        c = c * (1.0 + rng.uniform(-jitter, jitter)) + rng.uniform(-jitter, jitter, 3).astype(np.float32) * 60.0
    return np.clip(c, 0.0, 255.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two colours (``[3]`` or ``[H, W, 3]``) with weight ``t`` ``[H, W]`` towards ``b``."""
    t = t[..., None]
    return a * (1.0 - t) + b * t


def _vgrad(h: int, w: int, gamma: float = 1.0) -> np.ndarray:
    return np.broadcast_to((np.linspace(0.0, 1.0, h, dtype=np.float32) ** gamma)[:, None], (h, w))


# ==============================================================================================================
# Backgrounds: one function per scene family, each (rng, h, w) -> float32 [h, w, 3] in 0..255
# ==============================================================================================================


def _bg_sky(rng, h, w):
    sunset = rng.random() < 0.15
    if sunset:
        top, bottom = _col((40, 60, 130), rng, 0.15), _col((250, 170, 110), rng, 0.1)
    else:
        top, bottom = _col((45, 105, 200), rng, 0.15), _col((175, 210, 240), rng, 0.08)
    img = _mix(top, bottom, _vgrad(h, w, rng.uniform(0.6, 1.6)))
    n = _fractal(rng, h, w, rng.uniform(0.2, 0.5) * max(h, w), octaves=5, gain=0.55)
    cover = rng.uniform(0.35, 0.75)
    alpha = _smoothstep(cover, cover + rng.uniform(0.15, 0.35), n) * rng.uniform(0.6, 1.0)
    shade = 0.82 + 0.18 * _noise(rng, h, w, max(h, w) * 0.15)
    cloud = _col((250, 250, 252), rng, 0.03)[None, None, :] * shade[..., None]
    return _mix(img, cloud, alpha)


def _bg_water(rng, h, w):
    deep = _col(rng.choice([(10, 55, 110), (10, 80, 95), (20, 45, 85)]), rng, 0.15)
    light = _col((70, 150, 185), rng, 0.12)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    img = _mix(light, deep, np.broadcast_to(y ** rng.uniform(0.5, 1.2), (h, w)))
    # waves: horizontal bands whose period grows towards the viewer, phase warped by noise
    period = rng.uniform(6, 14) * (1.0 + 2.5 * y)
    warp = _fractal(rng, h, w, rng.uniform(30, 80), octaves=3) * rng.uniform(4, 10)
    ys = np.arange(h, dtype=np.float32)[:, None]
    waves = np.sin(2 * np.pi * ys / period + warp)
    img = img * (1.0 + 0.12 * waves[..., None])
    spark = _noise(rng, h, w, 2.0) * (waves > 0.7)
    img = _mix(img, np.asarray((235, 245, 250), np.float32), np.clip((spark - 0.7) * 3.0, 0, 1) * 0.8)
    if rng.random() < 0.35:  # a horizon with a strip of sky
        hz = int(h * rng.uniform(0.05, 0.2))
        sky = _mix(_col((120, 170, 225), rng, 0.1), _col((200, 225, 245), rng, 0.05), _vgrad(hz, w))
        img[:hz] = sky
    return img


def _bg_grass(rng, h, w):
    base = _col(rng.choice([(70, 135, 45), (95, 150, 55), (50, 110, 40), (120, 150, 60)]), rng, 0.12)
    dark = base * rng.uniform(0.45, 0.65)
    light = np.clip(base * 1.35 + 10, 0, 255)
    patches = _fractal(rng, h, w, rng.uniform(60, 160), octaves=3)
    blades = _fractal(rng, h, w, rng.uniform(1.5, 3.0), octaves=2, aniso=rng.uniform(5, 9))
    t = np.clip(0.55 * patches + 0.6 * (blades - 0.5) + 0.2, 0, 1)
    img = _mix(dark, light, t)
    if rng.random() < 0.3:  # a few flowers
        fl = _noise(rng, h, w, 2.5) > rng.uniform(0.9, 0.95)
        img[fl] = _col(rng.choice([(250, 250, 240), (245, 220, 60), (230, 90, 150)]), rng, 0.05)
    return img


def _bg_sand(rng, h, w):
    base = _col(rng.choice([(220, 195, 150), (205, 175, 125), (235, 215, 175), (200, 160, 110)]), rng, 0.08)
    dunes = _fractal(rng, h, w, rng.uniform(120, 300), octaves=2)
    img = base[None, None, :] * (0.8 + 0.3 * dunes[..., None])
    ang = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = xx * math.cos(ang) + yy * math.sin(ang)
    warp = _fractal(rng, h, w, rng.uniform(40, 90), octaves=2) * rng.uniform(6, 14)
    ripples = np.sin(2 * np.pi * proj / rng.uniform(9, 20) + warp)
    img = img * (1.0 + 0.07 * ripples[..., None])
    grain = rng.normal(0, 7, (h, w)).astype(np.float32)
    return img + grain[..., None]


def _bg_road(rng, h, w):
    g = rng.uniform(55, 100)
    base = _col((g, g, g * rng.uniform(0.95, 1.08)), rng, 0.04)
    stains = _fractal(rng, h, w, rng.uniform(50, 150), octaves=3)
    img = base[None, None, :] * (0.8 + 0.35 * stains[..., None])
    img = img + rng.normal(0, 9, (h, w)).astype(np.float32)[..., None]
    # lane markings: one or two dashed/solid lines along a near-vertical or near-horizontal direction
    vertical = rng.random() < 0.5
    n_lines = int(rng.integers(1, 3))
    paint = _col(rng.choice([(235, 235, 230), (235, 200, 50)]), rng, 0.05)
    marks = np.zeros((h, w), np.uint8)
    L = h if vertical else w
    for _ in range(n_lines):
        pos = rng.uniform(0.15, 0.85) * (w if vertical else h)
        slope = rng.uniform(-0.25, 0.25)
        thick = int(rng.integers(5, 14))
        dash, gap = int(rng.integers(25, 60)), int(rng.integers(15, 45))
        solid = rng.random() < 0.3
        s = 0
        while s < L:
            e = L if solid else min(L, s + dash)
            p0, p1 = pos + slope * s, pos + slope * e
            pts = [(p0, s), (p1, e)] if vertical else [(s, p0), (e, p1)]
            cv2.line(marks, tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1]), 1, thick)
            s = e + gap
    img = _mix(img, paint[None, None, :] * (0.85 + 0.2 * stains[..., None]), marks.astype(np.float32) * 0.9)
    if rng.random() < 0.4:  # a curb along one edge
        cw = int(min(h, w) * rng.uniform(0.05, 0.12))
        curb = _col((165, 160, 150), rng, 0.08)
        if vertical:
            img[:, :cw] = curb
        else:
            img[h - cw :] = curb
    return img


def _bg_snow(rng, h, w):
    white = _col((244, 247, 252), rng, 0.03)
    shadow = _col((170, 190, 220), rng, 0.08)
    drifts = _fractal(rng, h, w, rng.uniform(80, 220), octaves=3)
    img = _mix(white, shadow, _smoothstep(0.45, 1.0, drifts) * rng.uniform(0.5, 0.9))
    img = img + rng.normal(0, 4, (h, w)).astype(np.float32)[..., None]
    sparkle = _noise(rng, h, w, 1.5) > 0.97
    img[sparkle] = 255.0
    if rng.random() < 0.35:  # a distant dark tree line under a grey sky
        hz = int(h * rng.uniform(0.08, 0.22))
        ridge = (hz * (0.6 + 0.4 * _noise(rng, 1, w, 1, rng.uniform(8, 30))[0])).astype(int)
        yy = np.arange(h)[:, None]
        sky = yy < (ridge[None, :] * 0.6).astype(int)
        trees = (yy < ridge[None, :]) & ~sky
        img[sky] = _col((200, 205, 215), rng, 0.05)
        img[trees] = _col((55, 70, 65), rng, 0.1)
    return img


def _bg_rock(rng, h, w):
    base = _col(rng.choice([(125, 120, 115), (140, 125, 105), (100, 100, 105), (150, 140, 130)]), rng, 0.1)
    n = _fractal(rng, h, w, rng.uniform(40, 120), octaves=5, gain=0.6)
    img = base[None, None, :] * (0.55 + 0.8 * n[..., None])
    img = img + rng.normal(0, 8, (h, w)).astype(np.float32)[..., None]
    cracks = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ang = rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(int(rng.integers(4, 10))):
            pts.append((int(x), int(y)))
            ang += rng.normal(0, 0.5)
            step = rng.uniform(10, 40)
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
        cv2.polylines(cracks, [np.asarray(pts, np.int32)], False, 1, int(rng.integers(1, 4)))
    img = img * (1.0 - 0.55 * cracks[..., None].astype(np.float32))
    if rng.random() < 0.4:  # lichen
        li = _fractal(rng, h, w, 12, octaves=2) > rng.uniform(0.75, 0.85)
        img[li] = img[li] * 0.5 + _col((170, 175, 90), rng, 0.1) * 0.5
    return img


def _bg_indoor(rng, h, w):
    wall = _col(rng.choice([(230, 220, 195), (205, 220, 200), (200, 215, 230), (235, 205, 200), (225, 225, 225)]),
                rng, 0.06)
    img = np.broadcast_to(wall, (h, w, 3)).astype(np.float32).copy()
    xs = np.arange(w, dtype=np.float32)[None, :]
    if rng.random() < 0.55:  # striped wallpaper
        period = rng.uniform(18, 50)
        stripes = (np.sin(2 * np.pi * xs / period) > rng.uniform(-0.3, 0.5)).astype(np.float32)
        img = img * (1.0 - rng.uniform(0.06, 0.15) * stripes[..., None])
    # soft lighting from one side
    light = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0), w, dtype=np.float32)[None, :, None]
    img = img * light
    img = img * (0.96 + 0.08 * _noise(rng, h, w, 40)[..., None])
    if rng.random() < 0.35:  # a picture frame or window
        fw, fh = int(w * rng.uniform(0.15, 0.3)), int(h * rng.uniform(0.15, 0.3))
        fx, fy = int(rng.uniform(0, w - fw)), int(rng.uniform(0, h * 0.4))
        frame = _col((90, 60, 35), rng, 0.1)
        inner = _col(rng.choice([(150, 190, 225), (120, 140, 90), (200, 150, 120)]), rng, 0.15)
        img[fy : fy + fh, fx : fx + fw] = frame
        b = max(3, fw // 12)
        img[fy + b : fy + fh - b, fx + b : fx + fw - b] = inner
    # floor: wooden planks under a skirting board
    fy = int(h * rng.uniform(0.62, 0.85))
    wood = _col(rng.choice([(150, 100, 60), (180, 135, 85), (110, 70, 45)]), rng, 0.08)
    fh = h - fy
    grain = _fractal(rng, fh, w, 3, octaves=2, aniso=1 / 8.0)
    floor = wood[None, None, :] * (0.8 + 0.35 * grain[..., None])
    plank = int(rng.integers(14, 30))
    floor[(np.arange(fh) % plank) < 2] *= 0.55
    img[fy:] = floor
    img[fy : fy + max(2, h // 60)] = _col((245, 245, 240), rng, 0.03)
    return img


def _bg_forest(rng, h, w):
    canopy_dark = _col((25, 55, 30), rng, 0.12)
    canopy_light = _col((95, 140, 60), rng, 0.15)
    n = _fractal(rng, h, w, rng.uniform(15, 40), octaves=4, gain=0.6)
    img = _mix(canopy_dark, canopy_light, n ** 1.5)
    bokeh = _noise(rng, h, w, rng.uniform(6, 14)) > rng.uniform(0.82, 0.9)
    img[bokeh] = img[bokeh] * 0.4 + _col((210, 225, 170), rng, 0.05) * 0.6
    # tree trunks: slightly slanted vertical bands with bark texture
    bark = _fractal(rng, h, w, 2.0, octaves=2, aniso=6.0)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(int(rng.integers(3, 8))):
        x0 = rng.uniform(0, w)
        half = rng.uniform(5, 28)
        slant = rng.uniform(-0.08, 0.08)
        trunk = np.abs(xs - (x0 + slant * ys)) < half * (1.0 + 0.3 * ys / h)
        colour = _col(rng.choice([(75, 55, 40), (95, 80, 65), (55, 45, 40)]), rng, 0.12)
        tex = (0.65 + 0.55 * bark[..., None]) * colour[None, None, :]
        img = np.where(trunk[..., None], tex, img)
    floor_y = int(h * rng.uniform(0.8, 1.0))
    if floor_y < h:
        img[floor_y:] = _col((85, 70, 45), rng, 0.1) * (0.8 + 0.4 * _noise(rng, h - floor_y, w, 6)[..., None])
    return img


_BACKGROUNDS: dict[str, Callable] = {
    "grass": _bg_grass,
    "sky": _bg_sky,
    "road": _bg_road,
    "sand": _bg_sand,
    "snow": _bg_snow,
    "rock": _bg_rock,
    "indoor": _bg_indoor,
    "forest": _bg_forest,
    "water": _bg_water,
}


def render_background(family: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Render one background of a scene family.

    Args:
        family: one of :data:`SCENE_FAMILIES`.
        rng: the random generator (consumed).
        height, width: output size.

    Returns:
        ``float32 [height, width, 3]`` RGB in roughly 0..255 (not yet clipped).
    """
    if family not in _BACKGROUNDS:
        raise KeyError(f"unknown scene family {family!r}; expected one of {SCENE_FAMILIES}")
    return np.asarray(_BACKGROUNDS[family](rng, height, width), np.float32)


# ==============================================================================================================
# Objects
# ==============================================================================================================


class _Canvas:
    """Draws object parts given in the canonical frame into a label map through an affine map.

    Each part has a role (a palette key); the label map stores ``1 + role index`` so colours can be looked up
    once at the end.
    """

    def __init__(self, h: int, w: int, M: np.ndarray, scale: float, roles: list[str]):
        self.labels = np.zeros((h, w), np.uint8)
        self.M = M  # 2x3, canonical -> pixel
        self.scale = scale
        self.roles = roles

    def _px(self, pts) -> np.ndarray:
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        q = p @ self.M[:, :2].T + self.M[:, 2]
        return np.round(q * _ONE).astype(np.int32)

    def _code(self, role: str) -> int:
        return self.roles.index(role) + 1

    def _paint(self, tmp: np.ndarray, role: str, clip: tuple[str, ...] | None) -> None:
        code = self._code(role)
        if clip is None:
            self.labels[tmp > 0] = code
        else:
            allowed = np.isin(self.labels, [self._code(r) for r in clip])
            self.labels[(tmp > 0) & allowed] = code

    def poly(self, pts, role: str, clip: tuple[str, ...] | None = None) -> None:
        if clip is None:
            cv2.fillPoly(self.labels, [self._px(pts)], self._code(role), cv2.LINE_8, _SHIFT)
            return
        tmp = np.zeros_like(self.labels)
        cv2.fillPoly(tmp, [self._px(pts)], 1, cv2.LINE_8, _SHIFT)
        self._paint(tmp, role, clip)

    def ellipse(self, cx, cy, ax, ay, role: str, angle: float = 0.0, clip=None, n: int = 48) -> None:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        ca, sa = math.cos(angle), math.sin(angle)
        x, y = ax * np.cos(t), ay * np.sin(t)
        self.poly(np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], 1), role, clip)

    def line(self, pts, width: float, role: str, clip=None) -> None:
        """A thick polyline; ``width`` in canonical units (at least one pixel)."""
        thick = max(1, int(round(width * self.scale)))
        tmp = np.zeros_like(self.labels)
        cv2.polylines(tmp, [self._px(pts)], False, 1, thick, cv2.LINE_8, _SHIFT)
        self._paint(tmp, role, clip)

    def rect(self, x0, y0, x1, y1, role: str, clip=None) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], role, clip)


@dataclasses.dataclass
class _Style:
    palette: dict[str, tuple]
    fur: float = 0.15  # amplitude of multiplicative fine noise
    fur_cell: float = 0.04  # its feature size in canonical units
    grain: float = 0.0  # amplitude of stripes along canonical x (wood grain)
    shade: float = 0.25  # top-to-bottom shading in canonical y


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


# --- one function per object kind: (canvas, rng) -> None; the palette keys used are the canvas roles ----------


def _dog_style(rng):
    pal = _pick(rng, [
        dict(body=(215, 165, 85), dark=(150, 100, 45), nose=(30, 25, 25), light=(240, 215, 160)),  # golden
        dict(body=(120, 80, 50), dark=(70, 45, 30), nose=(25, 20, 20), light=(200, 160, 120)),  # brown
        dict(body=(40, 38, 38), dark=(20, 20, 20), nose=(10, 10, 10), light=(170, 130, 90)),  # black
        dict(body=(240, 235, 225), dark=(140, 95, 60), nose=(25, 20, 20), light=(250, 250, 245)),  # white/brown
    ])
    return _Style(pal, fur=0.18, fur_cell=0.05)


def _draw_dog(c: _Canvas, rng):
    leg = rng.uniform(0.55, 0.8)
    for x in (-0.45, -0.3, 0.3, 0.45):
        sw = rng.uniform(-0.12, 0.12)
        c.line([(x, 0.05), (x + sw, leg)], 0.11, "body")
        c.ellipse(x + sw + 0.03, leg, 0.07, 0.04, "dark")
    tail_up = rng.uniform(-0.7, -0.1)
    c.line([(-0.55, -0.1), (-0.8, tail_up), (-0.95, tail_up - 0.1)], 0.08, "body")
    c.ellipse(0, 0, 0.62, rng.uniform(0.24, 0.32), "body")
    c.ellipse(0.15, 0.12, 0.35, 0.12, "light", clip=("body",))
    hy = rng.uniform(-0.5, -0.3)
    c.line([(0.45, -0.1), (0.62, hy + 0.05)], 0.22, "body")
    c.ellipse(0.7, hy, 0.22, 0.19, "body")
    c.ellipse(0.9, hy + 0.06, 0.14, 0.09, "light")
    c.ellipse(1.02, hy + 0.03, 0.045, 0.04, "nose")
    c.ellipse(0.62, hy + 0.05, 0.08, 0.2, "dark", angle=rng.uniform(-0.3, 0.3))  # floppy ear
    c.ellipse(0.78, hy - 0.06, 0.03, 0.03, "nose")


def _bird_style(rng):
    pal = _pick(rng, [
        dict(body=(245, 215, 40), wing=(25, 25, 25), bar=(245, 245, 245), beak=(235, 150, 90), cap=(20, 20, 20)),
        dict(body=(200, 90, 50), wing=(95, 75, 60), bar=(200, 190, 170), beak=(230, 190, 70), cap=(60, 50, 45)),
        dict(body=(40, 90, 200), wing=(25, 45, 110), bar=(140, 170, 230), beak=(60, 60, 60), cap=(30, 60, 150)),
        dict(body=(235, 235, 230), wing=(60, 60, 65), bar=(235, 235, 230), beak=(240, 160, 40), cap=(30, 30, 30)),
    ])
    return _Style(pal, fur=0.08, fur_cell=0.03, shade=0.3)


def _draw_bird(c: _Canvas, rng):
    c.poly([(-0.35, -0.02), (-0.95, -0.2 + rng.uniform(-0.1, 0.1)), (-0.95, 0.22)], "wing")  # tail
    c.ellipse(0, 0, 0.45, rng.uniform(0.25, 0.32), "body", angle=rng.uniform(-0.2, 0.1))
    c.line([(0.05, 0.25), (0.05, 0.55)], 0.03, "beak")
    c.line([(-0.1, 0.25), (-0.12, 0.55)], 0.03, "beak")
    c.ellipse(0.45, -0.28, 0.2, 0.19, "body")
    c.ellipse(0.47, -0.38, 0.17, 0.1, "cap", clip=("body",))
    c.poly([(0.6, -0.34), (0.84, -0.27), (0.6, -0.2)], "beak")
    c.ellipse(0.53, -0.28, 0.035, 0.035, "cap")
    spread = rng.uniform(0.0, 1.0)  # folded wing .. raised wing
    tip = (-0.25 - 0.2 * spread, -0.2 - 0.75 * spread)
    c.poly([(-0.25, -0.05), (0.25, -0.08), (tip[0] + 0.15, tip[1]), tip, (-0.5, -0.02)], "wing")
    c.line([(-0.1, -0.08), (tip[0] + 0.1, tip[1] + 0.25)], 0.05, "bar", clip=("wing",))


def _car_style(rng):
    body = _pick(rng, [(245, 200, 30), (200, 30, 35), (30, 70, 160), (235, 235, 235), (40, 120, 70), (50, 50, 55)])
    pal = dict(body=body, window=(150, 190, 215), tyre=(25, 25, 25), hub=(180, 180, 185), light=(255, 245, 200),
               trim=(70, 70, 75))
    return _Style(pal, fur=0.03, fur_cell=0.05, shade=0.35)


def _draw_car(c: _Canvas, rng):
    roof = rng.uniform(-0.5, -0.35)
    c.poly([(-1.0, 0.0), (-0.95, -0.12), (-0.55, -0.14), (-0.35, roof), (0.35, roof), (0.6, -0.12), (0.98, -0.08),
            (1.0, 0.05), (1.0, 0.4), (-1.0, 0.4)], "body")
    c.poly([(-0.48, -0.13), (-0.32, roof + 0.05), (-0.03, roof + 0.05), (-0.03, -0.13)], "window")
    c.poly([(0.03, -0.13), (0.03, roof + 0.05), (0.32, roof + 0.05), (0.52, -0.13)], "window")
    c.line([(-1.0, 0.18), (1.0, 0.18)], 0.03, "trim", clip=("body",))
    c.rect(0.9, -0.05, 1.0, 0.06, "light")
    c.rect(-1.0, -0.06, -0.93, 0.06, "trim")
    for x in (-0.6, 0.6):
        c.ellipse(x, 0.4, 0.22, 0.22, "tyre")
        c.ellipse(x, 0.4, 0.11, 0.11, "hub")


def _lizard_style(rng):
    pal = _pick(rng, [
        dict(body=(80, 150, 60), scale=(40, 90, 35), belly=(170, 200, 110), eye=(20, 20, 20)),
        dict(body=(130, 120, 70), scale=(80, 70, 40), belly=(190, 180, 130), eye=(20, 20, 20)),
        dict(body=(60, 130, 110), scale=(30, 75, 60), belly=(150, 190, 160), eye=(20, 20, 20)),
    ])
    return _Style(pal, fur=0.12, fur_cell=0.025, shade=0.2)


def _draw_lizard(c: _Canvas, rng):
    amp, ph = rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
    xs = np.linspace(-1.0, 0.75, 40)
    ys = amp * np.sin(2.2 * xs + ph)
    half = np.where(xs > -0.2, 0.14, 0.14 * (xs + 1.0) / 0.8 + 0.01)
    half = np.where(xs > 0.55, 0.14 - (xs - 0.55) * 0.25, half)
    top = np.stack([xs, ys - half], 1)
    bot = np.stack([xs[::-1], ys[::-1] + half[::-1]], 1)
    for xl in (-0.1, 0.4):
        yl = amp * np.sin(2.2 * xl + ph)
        for sgn in (-1, 1):
            kx = rng.uniform(-0.15, 0.15)
            c.line([(xl, yl), (xl + kx, yl + sgn * 0.3), (xl + kx + 0.12, yl + sgn * 0.36)], 0.06, "body")
    c.poly(np.concatenate([top, bot]), "body")
    c.ellipse(0.85, amp * np.sin(2.2 * 0.8 + ph), 0.17, 0.11, "body")
    for x0 in np.arange(-0.6, 0.6, 0.16):  # dark bands
        y0 = amp * np.sin(2.2 * x0 + ph)
        c.ellipse(x0, y0, 0.04, 0.16, "scale", clip=("body",))
    c.ellipse(0.9, amp * np.sin(2.2 * 0.8 + ph) - 0.04, 0.025, 0.025, "eye")


def _fox_style(rng):
    pal = _pick(rng, [
        dict(body=(215, 95, 35), white=(245, 240, 235), dark=(35, 25, 20)),  # red fox
        dict(body=(210, 110, 45), white=(240, 235, 220), dark=(60, 40, 30)),
        dict(body=(140, 135, 130), white=(230, 230, 225), dark=(40, 35, 35)),  # grey fox
    ])
    return _Style(pal, fur=0.16, fur_cell=0.04)


def _draw_fox(c: _Canvas, rng):
    leg = rng.uniform(0.5, 0.65)
    for x in (-0.4, -0.28, 0.3, 0.42):
        sw = rng.uniform(-0.1, 0.1)
        c.line([(x, 0.0), (x + sw, leg)], 0.06, "body")
        c.line([(x + sw * 0.6, leg * 0.6), (x + sw, leg)], 0.065, "dark")
    tail = rng.uniform(-0.1, 0.35)
    c.ellipse(-0.75, tail, 0.35, 0.13, "body", angle=0.5 * tail)
    c.ellipse(-1.0, tail + 0.05, 0.1, 0.08, "white")
    c.ellipse(0.0, 0.0, 0.55, 0.2, "body")
    c.ellipse(0.1, 0.12, 0.3, 0.08, "white", clip=("body",))
    hy = rng.uniform(-0.4, -0.25)
    c.line([(0.42, -0.05), (0.58, hy)], 0.16, "body")
    c.ellipse(0.62, hy, 0.16, 0.14, "body")
    c.poly([(0.68, hy - 0.08), (0.98, hy + 0.04), (0.68, hy + 0.1)], "white")  # muzzle
    c.ellipse(0.97, hy + 0.03, 0.03, 0.03, "dark")
    for ex in (0.52, 0.66):  # pointed ears
        c.poly([(ex - 0.06, hy - 0.08), (ex + 0.01, hy - 0.34), (ex + 0.07, hy - 0.08)], "body")
        c.poly([(ex - 0.01, hy - 0.2), (ex + 0.01, hy - 0.32), (ex + 0.03, hy - 0.2)], "dark")
    c.ellipse(0.72, hy - 0.04, 0.025, 0.025, "dark")


def _ladybug_style(rng):
    pal = _pick(rng, [
        dict(shell=(215, 30, 30), spot=(15, 15, 15), head=(20, 20, 20), rim=(245, 245, 235)),
        dict(shell=(240, 120, 20), spot=(15, 15, 15), head=(20, 20, 20), rim=(245, 245, 235)),
        dict(shell=(235, 200, 30), spot=(15, 15, 15), head=(25, 25, 25), rim=(245, 245, 235)),
    ])
    return _Style(pal, fur=0.04, fur_cell=0.05, shade=0.4)


def _draw_ladybug(c: _Canvas, rng):
    for x in (-0.25, 0.05, 0.3):  # six legs
        for sgn in (-1, 1):
            kx = rng.uniform(-0.1, 0.1)
            c.line([(x, 0), (x + kx, sgn * 0.72), (x + kx - 0.1, sgn * 0.85)], 0.045, "head")
    for sgn in (-1, 1):
        c.line([(0.7, sgn * 0.06), (0.95, sgn * 0.25), (1.0, sgn * 0.33)], 0.03, "head")
    c.ellipse(0.62, 0, 0.18, 0.22, "head")
    c.ellipse(0.7, -0.1, 0.05, 0.05, "rim")
    c.ellipse(0.7, 0.1, 0.05, 0.05, "rim")
    c.ellipse(0.0, 0.0, 0.6, 0.55, "shell")
    c.line([(-0.6, 0.0), (0.6, 0.0)], 0.03, "spot", clip=("shell",))
    n = int(rng.integers(4, 9))
    for _ in range(n):
        c.ellipse(rng.uniform(-0.45, 0.45), rng.uniform(-0.42, 0.42), *(2 * [rng.uniform(0.07, 0.12)]), "spot",
                  clip=("shell",))


def _guitar_style(rng):
    pal = _pick(rng, [
        dict(wood=(215, 160, 95), edge=(120, 70, 30), neck=(90, 55, 30), hole=(20, 15, 10), metal=(220, 220, 215)),
        dict(wood=(235, 150, 50), edge=(50, 25, 15), neck=(60, 35, 20), hole=(15, 10, 10), metal=(220, 220, 215)),
        dict(wood=(30, 30, 32), edge=(200, 200, 195), neck=(50, 40, 35), hole=(10, 10, 10), metal=(220, 220, 215)),
        dict(wood=(170, 35, 35), edge=(240, 235, 225), neck=(70, 45, 30), hole=(15, 10, 10), metal=(220, 220, 215)),
    ])
    return _Style(pal, fur=0.04, fur_cell=0.04, grain=0.12, shade=0.25)


def _draw_guitar(c: _Canvas, rng):
    c.rect(0.25, -0.06, 1.05, 0.06, "neck")
    c.poly([(1.03, -0.1), (1.28, -0.12), (1.28, 0.12), (1.03, 0.1)], "neck")
    lb, ub = rng.uniform(0.38, 0.45), rng.uniform(0.28, 0.34)
    c.ellipse(-0.48, 0, lb + 0.03, lb + 0.03, "edge")
    c.ellipse(0.02, 0, ub + 0.03, ub + 0.03, "edge")
    c.ellipse(-0.48, 0, lb, lb, "wood")
    c.ellipse(0.02, 0, ub, ub, "wood")
    c.rect(-0.48, -ub, 0.02, ub, "wood", clip=("edge",))
    c.ellipse(0.0, 0, 0.11, 0.11, "hole")
    c.rect(-0.66, -0.15, -0.6, 0.15, "neck")
    for y in (-0.04, -0.015, 0.015, 0.04):
        c.line([(-0.63, y), (1.05, y)], 0.008, "metal")


def _ape_style(rng):
    pal = _pick(rng, [
        dict(fur=(185, 85, 35), face=(120, 90, 70), dark=(30, 25, 20)),  # orangutan
        dict(fur=(40, 35, 32), face=(170, 140, 120), dark=(15, 12, 10)),  # chimp
        dict(fur=(95, 75, 60), face=(200, 170, 150), dark=(30, 25, 20)),
    ])
    return _Style(pal, fur=0.25, fur_cell=0.035, shade=0.2)


def _draw_ape(c: _Canvas, rng):
    arm_l, arm_r = rng.uniform(-0.6, 0.9), rng.uniform(-0.6, 0.9)  # raised .. hanging
    for sgn, lift in ((-1, arm_l), (1, arm_r)):
        elbow = (sgn * 0.6, 0.05 - 0.3 * lift + 0.25)
        hand = (sgn * rng.uniform(0.65, 0.85), -0.75 * lift + 0.75)
        c.line([(sgn * 0.28, -0.25), elbow, hand], 0.16, "fur")
        c.ellipse(hand[0], hand[1], 0.07, 0.07, "face")
    for sgn in (-1, 1):
        c.line([(sgn * 0.18, 0.45), (sgn * 0.35, 0.75), (sgn * 0.28, 0.95)], 0.16, "fur")
    c.ellipse(0, 0.12, 0.38, 0.5, "fur")
    c.ellipse(0, -0.58, 0.25, 0.24, "fur")
    c.ellipse(0, -0.52, 0.16, 0.15, "face")
    for ex in (-0.07, 0.07):
        c.ellipse(ex, -0.58, 0.03, 0.03, "dark")
    c.ellipse(0, -0.44, 0.06, 0.025, "dark")


def _fish_style(rng):
    pal = _pick(rng, [
        dict(body=(245, 115, 20), band=(250, 250, 250), fin=(230, 90, 15), eye=(15, 15, 15)),  # clownfish
        dict(body=(240, 170, 40), band=(240, 170, 40), fin=(230, 130, 30), eye=(15, 15, 15)),  # goldfish
        dict(body=(150, 170, 190), band=(90, 110, 140), fin=(120, 140, 165), eye=(15, 15, 15)),  # silver
        dict(body=(250, 220, 40), band=(30, 30, 35), fin=(40, 90, 190), eye=(15, 15, 15)),  # tropical
    ])
    return _Style(pal, fur=0.06, fur_cell=0.03, shade=0.35)


def _draw_fish(c: _Canvas, rng):
    tail = rng.uniform(0.25, 0.45)
    c.poly([(-0.45, 0.0), (-0.95, -tail), (-0.85, 0.0), (-0.95, tail)], "fin")
    c.poly([(-0.25, -0.25), (0.05, -0.5), (0.3, -0.25)], "fin")
    c.poly([(-0.1, 0.25), (0.05, 0.45), (0.2, 0.25)], "fin")
    c.ellipse(0, 0, 0.62, rng.uniform(0.26, 0.34), "body")
    for x in (0.3, -0.05, -0.35)[: int(rng.integers(0, 4))]:
        c.ellipse(x, 0, 0.06, 0.5, "band", clip=("body",))
    c.ellipse(0.42, -0.06, 0.06, 0.06, "band")
    c.ellipse(0.43, -0.06, 0.035, 0.035, "eye")


_OBJECTS: dict[str, tuple[Callable, Callable]] = {
    "dog": (_dog_style, _draw_dog),
    "bird": (_bird_style, _draw_bird),
    "car": (_car_style, _draw_car),
    "lizard": (_lizard_style, _draw_lizard),
    "fox": (_fox_style, _draw_fox),
    "ladybug": (_ladybug_style, _draw_ladybug),
    "guitar": (_guitar_style, _draw_guitar),
    "ape": (_ape_style, _draw_ape),
    "fish": (_fish_style, _draw_fish),
}

# how each kind is posed: (max |rotation| in radians, mirror allowed, aspect jitter)
_POSE: dict[str, tuple[float, bool, float]] = {
    "dog": (0.2, True, 0.15),
    "bird": (0.35, True, 0.15),
    "car": (0.12, True, 0.2),
    "lizard": (np.pi, True, 0.15),
    "fox": (0.2, True, 0.15),
    "ladybug": (np.pi, True, 0.1),
    "guitar": (np.pi, True, 0.1),
    "ape": (0.3, True, 0.15),
    "fish": (0.4, True, 0.2),
}


@dataclasses.dataclass
class ObjectLayer:
    """One rendered object: its colours where it is drawn, and its mask (before occlusion by later objects).

    Attributes:
        rgb: ``float32 [H, W, 3]`` colours (meaningful only where ``mask`` is 1).
        mask: ``uint8 [H, W]`` 0/1.
        kind: the object kind.
    """

    rgb: np.ndarray
    mask: np.ndarray
    kind: str


def render_object(kind: str, rng: np.random.Generator, height: int, width: int, center: tuple[float, float],
                  size: float) -> ObjectLayer:
    """Render one object of a kind into a full-size layer.

    Args:
        kind: one of :data:`OBJECT_KINDS`.
        rng: the random generator (consumed: palette, pose, in-class shape variation, texture).
        height, width: size of the image the object is drawn into.
        center: ``(x, y)`` pixel position of the object's canonical origin.
        size: pixels per canonical unit (the object spans about ``2 * size`` pixels).

    Returns:
        An :class:`ObjectLayer`.
    """
    if kind not in _OBJECTS:
        raise KeyError(f"unknown object kind {kind!r}; expected one of {OBJECT_KINDS}")
    style_fn, draw_fn = _OBJECTS[kind]
    style = style_fn(rng)
    max_rot, mirror, aspect_j = _POSE[kind]
    rot = rng.uniform(-max_rot, max_rot)
    sx = size * (1.0 + rng.uniform(-aspect_j, aspect_j))
    sy = size * (1.0 + rng.uniform(-aspect_j, aspect_j))
    if mirror and rng.random() < 0.5:
        sx = -sx
    ca, sa = math.cos(rot), math.sin(rot)
    A = np.array([[ca, -sa], [sa, ca]]) @ np.diag([sx, sy])
    M = np.concatenate([A, np.asarray(center, np.float64)[:, None]], 1)
    roles = list(style.palette)
    canvas = _Canvas(height, width, M, size, roles)
    draw_fn(canvas, rng)
    labels = canvas.labels
    mask = (labels > 0).astype(np.uint8)

    colours = np.zeros((len(roles) + 1, 3), np.float32)
    for i, r in enumerate(roles):
        colours[i + 1] = _col(style.palette[r], rng, 0.08)
    rgb = np.zeros((height, width, 3), np.float32)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:
        return ObjectLayer(rgb, mask, kind)
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    roi = labels[y0:y1, x0:x1]
    col = colours[roi]
    h, w = roi.shape
    # canonical coordinates of the ROI pixels, for shading and grain that follow the object's pose
    Ainv = np.linalg.inv(A)
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = gx - center[0], gy - center[1]
    u = Ainv[0, 0] * dx + Ainv[0, 1] * dy
    v = Ainv[1, 0] * dx + Ainv[1, 1] * dy
    mod = 1.0 - style.shade * np.clip(v, -1, 1) * 0.5
    cell = max(1.0, style.fur_cell * size)
    mod = mod + style.fur * (_fractal(rng, h, w, cell, octaves=2) - 0.5) * 2.0
    if style.grain > 0:
        mod = mod + style.grain * np.sin(v * rng.uniform(40, 70) + 3.0 * _noise(rng, h, w, cell * 4))
    rgb[y0:y1, x0:x1] = col * mod[..., None].astype(np.float32)
    return ObjectLayer(rgb, mask, kind)
