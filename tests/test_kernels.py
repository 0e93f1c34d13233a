"""Tests of kernels/: every Triton kernel against its torch reference, plus brute-force fixtures for the tiling.

On a machine without CUDA the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by
``tests/conftest.py`` before ``kernels`` is imported); with CUDA the same checks also run on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bgsynth import kernels
from bgsynth.geometry import tile_strips
from bgsynth.kernels import KernelArgumentError, KernelBackendError
from bgsynth.kernels import _cpu
from bgsynth.kernels._common import resolve_output


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# (rtol, atol) of the Triton output against the torch reference per output dtype (uint8 must be exact)
TOL = {
    torch.uint8: (0.0, 0.0),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# odd shapes: a single pixel, smaller than a block, and more than one 1024-pixel block with a ragged tail
SHAPES = [(1, 1), (7, 5), (33, 47)]


def _triton_ready(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- random inputs
def random_boxes(g: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """Random inclusive boxes, including empty ones, full-image ones and boxes touching the edges."""
    x0 = torch.randint(0, w, (b,), generator=g)
    y0 = torch.randint(0, h, (b,), generator=g)
    x1 = torch.minimum(x0 + torch.randint(0, w, (b,), generator=g), torch.tensor(w - 1))
    y1 = torch.minimum(y0 + torch.randint(0, h, (b,), generator=g), torch.tensor(h - 1))
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    kind = torch.randint(0, 5, (b,), generator=g)
    boxes[kind == 0] = torch.tensor([0, 0, -1, -1])  # empty (box outside the crop)
    boxes[kind == 1] = torch.tensor([0, 0, w - 1, h - 1])  # no margin at all
    return boxes.to(torch.int32)


def random_images(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def tile_inputs(seed: int, b: int, h: int, w: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = random_images(g, b, h, w)
    boxes = random_boxes(g, b, h, w)
    strips = tile_strips(boxes, h, w)
    return {"images": images.to(device), "boxes": boxes.to(device), "strips": strips.to(device)}


def composite_inputs(seed: int, b: int, h: int, w: int, n: int, device: str, what: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    fg = random_images(g, b, h, w)
    keep = torch.rand((b, 1, h, w), generator=g) < 0.5
    if what == "uint8-keep":
        keep = keep.to(torch.uint8)
    args: dict = {"fg": fg.to(device)}
    if what in ("mixed", "uint8-keep", "no_fg", "only_fg", "mixed+box"):
        args["keep"] = keep.to(device)
    if what in ("mixed", "uint8-keep", "mixed+box"):
        args["bg"] = random_images(g, n, h, w).to(device)
        args["bg_index"] = torch.randint(-1, n, (b,), generator=g).to(device)
    if what == "no_fg":
        args["invert"] = True
    if what in ("only_bg_b", "mixed+box"):
        args["boxes"] = random_boxes(g, b, h, w).to(device)
    return args


# ----------------------------------------------------------------------------------------------- shared checker
def _out_kwargs(dtype, normalise: bool, channels_last: bool) -> dict:
    kw = {"dtype": dtype, "channels_last": channels_last}
    if normalise:
        kw.update(mean=MEAN, std=STD)
    return kw


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    if actual.device.type == "cpu" and dtype == torch.float32:
        rtol = atol = 0.0  # the interpreter's float32 arithmetic is IEEE, like torch's on the CPU
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def plain_reference(op, args: dict, out_kw: dict) -> torch.Tensor:
    """The op's plain torch reference (``composite_torch`` / ``tile_fill_torch``), called directly: the readable
    definition that the fast CPU path (``backend='torch'`` on CPU tensors) must reproduce bit for bit."""
    lead = next(iter(args.values()))
    spec = resolve_output(out_kw["dtype"], out_kw.get("mean"), out_kw.get("std"), out_kw["channels_last"],
                          lead.device, "test")
    if op is kernels.tile_fill:
        return kernels.tile_fill_torch(args["images"], args["boxes"], args["strips"], spec)
    return kernels.composite_torch(args["fg"], args.get("keep"), args.get("bg"), args.get("bg_index"), spec,
                                   invert=args.get("invert", False), boxes=args.get("boxes"))


def check_kernel(op, args: dict, *, dtype=torch.uint8, normalise=False, channels_last=False, batched=True):
    """One checker for every kernel (after torchvision's ``check_kernel``).

    Asserts: the torch backend (the fast CPU path on CPU tensors) == the plain torch reference, exactly; Triton
    output == the reference (exactly for uint8, per-dtype tolerance otherwise); no in-place change of any input;
    dtype, shape, device and memory format as requested; batched == per-sample; works for an empty batch.
    """
    out_kw = _out_kwargs(dtype, normalise, channels_last)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    ref = op(**args, **out_kw, backend="torch")
    plain = plain_reference(op, args, out_kw)
    assert torch.equal(ref, plain), f"{op.__name__}: the torch backend differs from the plain reference"
    tri = op(**args, **out_kw, backend="triton")
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{op.__name__} modified its input {k!r} in place"
    lead = next(iter(args.values()))
    for name, out in (("torch", ref), ("triton", tri)):
        assert out.dtype == dtype, f"{name}: expected dtype {dtype}, got {out.dtype}"
        assert out.device == lead.device, f"{name}: expected device {lead.device}, got {out.device}"
        assert tuple(out.shape) == tuple(lead.shape), f"{name}: expected shape {tuple(lead.shape)}, got {out.shape}"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt), f"{name}: expected memory format {fmt}"
    _assert_close(tri, ref, dtype, f"{op.__name__} triton vs torch")
    if batched and lead.shape[0] > 1:
        rows = []
        for i in range(lead.shape[0]):
            one = {k: (v if k == "bg" or not isinstance(v, torch.Tensor) else v[i : i + 1]) for k, v in args.items()}
            rows.append(op(**one, **out_kw, backend="triton"))
        assert torch.equal(torch.cat(rows), tri), f"{op.__name__}: batched output differs from per-sample output"
    return ref, tri


# ----------------------------------------------------------------------------------------------- tile_fill
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [0, 1, 4])
def test_tile_fill_matches_reference_uint8(device, shape, b):
    args = tile_inputs(seed=b * 100 + shape[0], b=b, h=shape[0], w=shape[1], device=device)
    check_kernel(kernels.tile_fill, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,normalise,channels_last",
    [
        (torch.float32, True, False),
        (torch.float32, False, True),
        (torch.float16, True, True),
        (torch.bfloat16, True, True),
        (torch.uint8, False, True),
    ],
)
def test_tile_fill_fused_epilogue(device, dtype, normalise, channels_last):
    args = tile_inputs(seed=7, b=3, h=33, w=47, device=device)
    check_kernel(kernels.tile_fill, args, dtype=dtype, normalise=normalise, channels_last=channels_last)


def _brute_tile(img: np.ndarray, box, strip) -> np.ndarray:
    """Per-pixel loop over PAPER.md's rule: inside the inclusive box take the strip pixel (y % th, x % tw)."""
    out = img.copy()
    x0, y0, x1, y1 = box
    sx0, sy0, tw, th = strip
    if tw == 0 or th == 0:
        return out
    for y in range(img.shape[1]):
        for x in range(img.shape[2]):
            if x0 <= x <= x1 and y0 <= y <= y1:
                out[:, y, x] = img[:, sy0 + y % th, sx0 + x % tw]
    return out


# hand-made fixtures in a 12 (H) x 16 (W) image: box, expected strip (sx0, sy0, tw, th)
TILE_FIXTURES = {
    # left margin 9 > right 16-12=4; 9*12=108 > max(top 2, bottom 12-9=3)*16=48 -> left strip
    "left": ((9, 2, 12, 9), (0, 0, 9, 12)),
    # right margin 16-3=13 > left 2; 13*12=156 > max(1, 12-10=2)*16=32 -> right strip starting at x1
    "right": ((2, 1, 3, 10), (3, 0, 13, 12)),
    # top margin 8 > bottom 12-10=2; 8*16=128 > max(1, 16-14=2)*12=24 -> top strip
    "top": ((1, 8, 14, 10), (0, 0, 16, 8)),
    # bottom margin 12-2=10 > top 1; 10*16=160 > max(2, 16-13=3)*12=36 -> bottom strip starting at y1
    "bottom": ((2, 1, 13, 2), (0, 2, 16, 10)),
    # tie between the pairs: max(4, 16-12)*12 = 48 == max(3, 12-9)*16 = 48 -> not strictly larger: top/bottom;
    # tie inside the pair (top 3 == bottom 3) -> bottom
    "tie": ((4, 3, 12, 9), (0, 9, 16, 3)),
    # tie inside the left/right pair: left 5 == right 16-11=5, 5*12=60 > max(1, 12-11=1)*16 -> right
    "tie_lr": ((5, 1, 11, 11), (11, 0, 5, 12)),
    # the box covers the whole image: no margin, no Only-BG-T
    "no_margin": ((0, 0, 15, 11), (0, 0, 0, 0)),
    # a box on the last column still leaves the 1-wide right strip x >= x1 (the inclusive edge) ...
    "edge_column": ((0, 0, 15, 10), (0, 10, 16, 2)),
}


@pytest.mark.parametrize("name", sorted(TILE_FIXTURES))
@pytest.mark.parametrize("device", DEVICES)
def test_tile_fill_fixtures(name, device):
    box, strip = TILE_FIXTURES[name]
    got_strip = tile_strips(torch.tensor([box]), 12, 16)[0].tolist()
    assert got_strip == list(strip), f"{name}: strip {got_strip}, expected {list(strip)}"
    g = torch.Generator().manual_seed(3)
    img = random_images(g, 1, 12, 16)
    want = _brute_tile(img[0].numpy(), box, strip)
    for backend in ("torch", "triton"):
        out = kernels.tile_fill(
            img.to(device), torch.tensor([box], dtype=torch.int32, device=device),
            torch.tensor([strip], dtype=torch.int32, device=device), backend=backend,
        )
        np.testing.assert_array_equal(out[0].cpu().numpy(), want, err_msg=f"{name} ({backend})")
    if strip[2] == 0:
        assert torch.equal(out.cpu(), img), "a row without Only-BG-T must come back unchanged"


def test_tile_fill_brute_force_random():
    args = tile_inputs(seed=11, b=6, h=9, w=13, device="cpu")
    for backend in ("torch", "triton"):
        out = kernels.tile_fill(**args, backend=backend)
        for i in range(6):
            want = _brute_tile(args["images"][i].numpy(), args["boxes"][i].tolist(), args["strips"][i].tolist())
            np.testing.assert_array_equal(out[i].numpy(), want, err_msg=f"row {i} ({backend})")


def test_tile_fill_invalid_strip_is_unchanged():
    """A tile reaching outside the image is treated as no tile (memory-safe) by both implementations."""
    img = random_images(torch.Generator().manual_seed(0), 2, 5, 6)
    boxes = torch.tensor([[1, 1, 3, 3], [1, 1, 3, 3]], dtype=torch.int32)
    strips = torch.tensor([[4, 0, 5, 5], [0, -1, 1, 5]], dtype=torch.int32)
    for backend in ("torch", "triton"):
        assert torch.equal(kernels.tile_fill(img, boxes, strips, backend=backend), img)


# ----------------------------------------------------------------------------------------------- composite
COMPOSITES = ["original", "only_bg_b", "no_fg", "only_fg", "mixed", "uint8-keep", "mixed+box"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("what", COMPOSITES)
@pytest.mark.parametrize("shape", SHAPES)
def test_composite_matches_reference_uint8(device, what, shape):
    args = composite_inputs(seed=len(what) + shape[1], b=3, h=shape[0], w=shape[1], n=2, device=device, what=what)
    check_kernel(kernels.composite, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,n", [(0, 1), (1, 1), (5, 1), (5, 3)])
def test_composite_batch_and_pool_sizes(device, b, n):
    args = composite_inputs(seed=b + 10 * n, b=b, h=7, w=5, n=n, device=device, what="mixed")
    check_kernel(kernels.composite, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,normalise,channels_last",
    [
        (torch.float32, True, False),
        (torch.float32, True, True),
        (torch.float32, False, False),
        (torch.float16, True, True),
        (torch.bfloat16, True, True),
        (torch.bfloat16, False, False),
        (torch.uint8, False, True),
    ],
)
def test_composite_fused_epilogue(device, dtype, normalise, channels_last):
    args = composite_inputs(seed=5, b=3, h=33, w=47, n=2, device=device, what="mixed+box")
    ref, _ = check_kernel(kernels.composite, args, dtype=dtype, normalise=normalise, channels_last=channels_last)
    # the reference epilogue itself against a hand computation on the uint8 composite
    u8 = kernels.composite(**args, backend="torch")
    x = u8 if dtype == torch.uint8 else u8.to(torch.float32) / 255.0
    if normalise:
        x = (x - torch.tensor(MEAN, device=device)[:, None, None]) / torch.tensor(STD, device=device)[:, None, None]
    _assert_close(ref, x.to(dtype), dtype, "reference epilogue")


def test_composite_semantics_by_hand():
    """Each pixel rule of the composite on a tiny hand-checked example."""
    fg = torch.full((2, 3, 2, 3), 200, dtype=torch.uint8)
    keep = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool).expand(2, 1, 2, 3)
    bg = torch.stack([torch.full((3, 2, 3), 7, dtype=torch.uint8), torch.full((3, 2, 3), 9, dtype=torch.uint8)])
    idx = torch.tensor([1, -1])
    boxes = torch.tensor([[2, 0, 2, 0], [0, 0, -1, -1]], dtype=torch.int32)
    for backend in ("torch", "triton"):
        out = kernels.composite(fg, keep, bg, idx, boxes=boxes, backend=backend)[:, 0].tolist()
        assert out == [[[200, 9, 9], [9, 9, 200]], [[200, 0, 200], [0, 0, 200]]], backend
        inv = kernels.composite(fg, keep, invert=True, backend=backend)[:, 0].tolist()
        assert inv == [[[0, 200, 0], [200, 200, 0]]] * 2, backend
        box_only = kernels.composite(fg, boxes=torch.tensor([[0, 0, 1, 0]] * 2, dtype=torch.int32), backend=backend)
        assert box_only[:, 0].tolist() == [[[0, 0, 200], [200, 200, 200]]] * 2, backend
        f = kernels.composite(fg[:1], dtype=torch.float32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), backend=backend)
        assert torch.allclose(f, torch.full_like(f, (200 / 255 - 0.5) / 0.25))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(0, 3),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    n=st.integers(1, 3),
    what=st.sampled_from(COMPOSITES),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.bfloat16]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_composite_property(b, h, w, n, what, dtype, channels_last, seed):
    args = composite_inputs(seed, b, h, w, n, "cpu", what)
    check_kernel(kernels.composite, args, dtype=dtype, normalise=dtype != torch.uint8, channels_last=channels_last)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(0, 3), h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_tile_fill_property(b, h, w, seed):
    check_kernel(kernels.tile_fill, tile_inputs(seed, b, h, w, "cpu"))


def test_non_contiguous_inputs():
    """Strided inputs (channels_last, sliced views) give the same result as contiguous ones."""
    args = composite_inputs(seed=1, b=4, h=9, w=11, n=2, device="cpu", what="mixed+box")
    cl = dict(args, fg=args["fg"].contiguous(memory_format=torch.channels_last), keep=args["keep"][:, :, :, :])
    wide = torch.zeros((4, 3, 9, 20), dtype=torch.uint8)
    wide[..., 3:14] = args["fg"]
    view = dict(args, fg=wide[..., 3:14])
    want = kernels.composite(**args, backend="torch")
    for variant in (cl, view):
        for backend in ("torch", "triton"):
            assert torch.equal(kernels.composite(**variant, backend=backend), want)
    t = tile_inputs(seed=2, b=2, h=9, w=11, device="cpu")
    want = kernels.tile_fill(**t, backend="torch")
    t_cl = dict(t, images=t["images"].contiguous(memory_format=torch.channels_last))
    assert torch.equal(kernels.tile_fill(**t_cl, backend="triton"), want)


# ----------------------------------------------------------------------------------------------- CUDA == CPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_reference():
    args = composite_inputs(seed=3, b=5, h=33, w=47, n=3, device="cpu", what="mixed+box")
    want = kernels.composite(**args, backend="torch", mean=MEAN, std=STD)
    got = kernels.composite(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                            mean=MEAN, std=STD)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    t = tile_inputs(seed=4, b=5, h=33, w=47, device="cpu")
    assert torch.equal(kernels.tile_fill(**{k: v.cuda() for k, v in t.items()}).cpu(), kernels.tile_fill(**t))


# ----------------------------------------------------------------------------------------------- dispatch/errors
def test_auto_backend_on_cpu_is_torch():
    t = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    assert kernels.resolve_backend("auto", (t,), "op") == "torch"
    assert kernels.resolve_backend("torch", (t,), "op") == "torch"


def test_env_override_of_auto(monkeypatch):
    t = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    monkeypatch.setenv("BGSYNTH_KERNEL_BACKEND", "triton")
    assert kernels.resolve_backend("auto", (t,), "op") == "triton"
    monkeypatch.setenv("BGSYNTH_KERNEL_BACKEND", "bogus")
    with pytest.raises(KernelArgumentError, match="BGSYNTH_KERNEL_BACKEND"):
        kernels.resolve_backend("auto", (t,), "op")


def test_triton_requested_without_interpreter_or_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors with a GPU present: the interpreter check is what this test covers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(KernelBackendError, match="CUDA"):
        kernels.composite(img, backend="triton")


def test_triton_missing(monkeypatch):
    import bgsynth.kernels._dispatch as d

    monkeypatch.setattr(d, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(KernelBackendError, match="cannot be imported"):
        kernels.tile_fill(img, torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32),
                          backend="triton")
    assert kernels.resolve_backend("auto", (img,), "op") == "torch"
    assert not d.triton_available()


def test_triton_modules_load_inside_the_package():
    """The Triton kernel modules load as ``bgsynth.kernels._triton_*`` (an installed bgsynth has no top-level
    ``kernels`` package to import them from)."""
    import sys

    img = torch.full((1, 3, 2, 2), 5, dtype=torch.uint8)
    assert torch.equal(kernels.composite(img, backend="triton"), img)
    assert "bgsynth.kernels._triton_composite" in sys.modules and "kernels._triton_composite" not in sys.modules


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from bgsynth import kernels\n"
        "from bgsynth.kernels import KernelBackendError\n"
        "img = torch.full((1, 3, 2, 2), 5, dtype=torch.uint8)\n"
        "assert torch.equal(kernels.composite(img), img)\n"
        "try:\n"
        "    kernels.composite(img, backend='triton')\n"
        "except KernelBackendError as e:\n"
        "    print('ok', e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok") and "triton" in res.stdout.lower()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fg=torch.zeros(1, 4, 2, 2, dtype=torch.uint8)), "fg uint8"),
        (dict(fg=torch.zeros(1, 3, 2, 2)), "fg uint8"),
        (dict(keep=torch.zeros(1, 1, 3, 2, dtype=torch.bool)), "keep of shape"),
        (dict(keep=torch.zeros(1, 1, 2, 2)), "keep bool or uint8"),
        (dict(bg=torch.zeros(1, 3, 2, 2, dtype=torch.uint8)), "without bg_index"),
        (dict(bg_index=torch.zeros(1, dtype=torch.int64)), "without bg"),
        (dict(bg=torch.zeros(2, 3, 2, 2, dtype=torch.uint8), bg_index=torch.tensor([2])), "bg_index < 2"),
        (dict(bg=torch.zeros(2, 3, 3, 2, dtype=torch.uint8), bg_index=torch.tensor([0])), "size 2x2"),
        (dict(invert=True), "invert"),
        (dict(boxes=torch.zeros(2, 4, dtype=torch.int32)), "boxes integer"),
        (dict(mean=MEAN, std=STD, dtype=torch.uint8), "floating dtype"),
        (dict(mean=MEAN), "both mean and std"),
        (dict(mean=(0.1, 0.2), std=STD), "3 values"),
        (dict(dtype=torch.int32), "expected dtype"),
        (dict(backend="cuda"), "backend in"),
    ],
)
def test_composite_errors(kwargs, match):
    args = dict(fg=torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    args.update(kwargs)
    with pytest.raises(KernelArgumentError, match=match):
        kernels.composite(**args)


def test_tile_fill_errors():
    img = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(KernelArgumentError, match="boxes integer"):
        kernels.tile_fill(img, torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="strips integer"):
        kernels.tile_fill(img, torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="images uint8"):
        kernels.tile_fill(img[:, :2], torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32))


def test_cpu_chunking_equals_whole_batch(monkeypatch):
    """The fast CPU path works in chunks of about CPU_CHUNK_BYTES of pixels, with ragged last chunks and scratch
    buffers reused across chunks; the result is the whole-batch plain reference's."""
    monkeypatch.setattr(_cpu, "CPU_CHUNK_BYTES", 3 * 6 * 7 * 4)  # 4 images per chunk: 19 images = 5 chunks
    b = 19
    args = composite_inputs(seed=21, b=b, h=6, w=7, n=3, device="cpu", what="mixed+box")
    spec = resolve_output(torch.bfloat16, MEAN, STD, True, torch.device("cpu"), "test")
    whole = kernels.composite_torch(args["fg"], args["keep"], args["bg"], args["bg_index"], spec, boxes=args["boxes"])
    got = kernels.composite(**args, mean=MEAN, std=STD, dtype=torch.bfloat16, channels_last=True, backend="torch")
    assert torch.equal(got, whole) and got.is_contiguous(memory_format=torch.channels_last)
    for what in ("mixed", "no_fg", "only_bg_b", "original"):
        a = composite_inputs(seed=23, b=b, h=6, w=7, n=3, device="cpu", what=what)
        a["fg"] = a["fg"].contiguous(memory_format=torch.channels_last)
        want = plain_reference(kernels.composite, a, _out_kwargs(torch.uint8, False, False))
        assert torch.equal(kernels.composite(**a, backend="torch"), want), what
    t = tile_inputs(seed=22, b=b, h=6, w=7, device="cpu")
    assert torch.equal(kernels.tile_fill(**t, backend="torch"), kernels.tile_fill_torch(t["images"], t["boxes"], t["strips"]))
    out_kw = _out_kwargs(torch.float16, True, False)
    assert torch.equal(kernels.tile_fill(**t, **out_kw, backend="torch"), plain_reference(kernels.tile_fill, t, out_kw))


# ----------------------------------------------------------------------------------------------- the fast CPU path
LAYOUTS = ("nchw", "nhwc", "strided")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` ``[B, 3, H, W]`` in another memory layout: contiguous, channels_last, or a strided
    view (every other column of a wider tensor)."""
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(t.shape[:3] + (2 * t.shape[3],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


@pytest.mark.parametrize("fg_layout", LAYOUTS)
@pytest.mark.parametrize("bg_layout", ("nchw", "nhwc"))
@pytest.mark.parametrize("what", COMPOSITES)
def test_fast_cpu_composite_equals_reference_in_every_layout(fg_layout, bg_layout, what):
    """The fast CPU path against the plain reference, for every input layout, both output layouts and each output
    dtype (with and without statistics), on odd sizes spread over several chunks."""
    args = composite_inputs(seed=len(what) * 7 + len(fg_layout), b=5, h=9, w=13, n=3, device="cpu", what=what)
    args["fg"] = _layout(args["fg"], fg_layout)
    if "bg" in args:
        args["bg"] = _layout(args["bg"], bg_layout)
    for dtype, norm in ((torch.uint8, False), (torch.float32, True), (torch.float32, False), (torch.bfloat16, True),
                        (torch.float16, True)):
        for cl in (False, True):
            out_kw = _out_kwargs(dtype, norm, cl)
            got = kernels.composite(**args, **out_kw, backend="torch")
            assert torch.equal(got, plain_reference(kernels.composite, args, out_kw)), (dtype, norm, cl)
            fmt = torch.channels_last if cl else torch.contiguous_format
            assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_cpu_tile_fill_equals_reference(layout):
    """Every kind of tile: the left/right and top/bottom strips of the strip rule, a 1-pixel strip (the most
    doublings), boxes reaching outside the image, empty boxes, invalid tiles and a tile repeating along both
    axes (never made by the strip rule, filled by a 2-D gather)."""
    g = torch.Generator().manual_seed(5)
    h, w = 11, 17
    images = _layout(random_images(g, 7, h, w), layout)
    boxes = torch.tensor([[3, 2, 9, 8], [2, 0, 16, 10], [5, -3, 30, 6], [0, 0, -1, -1], [1, 1, 15, 9],
                          [4, 4, 12, 9], [6, 1, 14, 7]], dtype=torch.int32)
    strips = torch.tensor([[0, 0, 3, 11], [0, 0, 1, 11], [0, 7, 17, 4], [0, 0, 3, 11], [0, 10, 17, 1],
                           [2, 1, 3, 2], [18, 0, 2, 11]], dtype=torch.int32)
    for dtype, norm in ((torch.uint8, False), (torch.float32, True), (torch.bfloat16, False)):
        for cl in (False, True):
            out_kw = _out_kwargs(dtype, norm, cl)
            args = {"images": images, "boxes": boxes, "strips": strips}
            got = kernels.tile_fill(**args, **out_kw, backend="torch")
            assert torch.equal(got, plain_reference(kernels.tile_fill, args, out_kw)), (dtype, norm, cl)
    # and against the brute-force loop of PAPER.md's rule (rows with an invalid tile stay unchanged)
    got = kernels.tile_fill(images, boxes, strips, backend="torch")
    for i in range(7):
        st = strips[i].tolist()
        valid = st[2] > 0 and st[3] > 0 and st[0] + st[2] <= w and st[1] + st[3] <= h
        x0, y0, x1, y1 = boxes[i].tolist()
        b = [max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)]
        want = _brute_tile(images[i].contiguous().numpy(), b, st if valid else (0, 0, 0, 0))
        np.testing.assert_array_equal(got[i].numpy(), want, err_msg=f"row {i}")


def test_fast_cpu_epilogue_every_value_exactly():
    """All 256 uint8 values in each channel through the fused normalise/cast: the fast path's in-place float32
    operations give the plain reference's values exactly, for every output dtype and layout, and those are
    ``(v / 255 - mean[c]) / std[c]`` computed here one value at a time in float32."""
    v = torch.arange(256, dtype=torch.uint8)
    img = torch.stack([v.roll(17 * c) for c in range(3)]).reshape(1, 3, 16, 16).repeat(2, 1, 1, 1)
    for layout in ("nchw", "nhwc"):
        x = _layout(img, layout)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for cl in (False, True):
                got = kernels.composite(x, mean=MEAN, std=STD, dtype=dtype, channels_last=cl, backend="torch")
                plain = plain_reference(kernels.composite, {"fg": x}, _out_kwargs(dtype, True, cl))
                assert torch.equal(got, plain), (layout, dtype, cl)
    got = kernels.composite(img, mean=MEAN, std=STD, backend="torch")
    m, s = torch.tensor(MEAN), torch.tensor(STD)
    for c in range(3):
        for value in (0, 1, 127, 128, 254, 255):
            pos = (img[0, c] == value).nonzero()[0]
            want = (torch.tensor(float(value)) / 255.0 - m[c]) / s[c]
            assert got[0, c, pos[0], pos[1]].item() == want.item(), (c, value)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_expand_mask_nhwc_matches_repeat_interleave(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8)
    bits[:n] = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8)
    want = bits[:n].repeat_interleave(3) * 255
    assert torch.equal(_cpu.expand_mask_nhwc(bits, n), want)


def test_large_cpu_outputs_are_advised_huge_pages():
    """Outputs of at least HUGEPAGE_MIN_BYTES get MADV_HUGEPAGE on Linux with transparent huge pages (fewer first-
    touch page faults); smaller ones and other platforms are left alone; the values are unaffected."""
    import pathlib
    import sys

    from bgsynth.kernels._common import HUGEPAGE_MIN_BYTES, advise_hugepages

    assert advise_hugepages(torch.empty(16, dtype=torch.uint8)) is False
    big = torch.empty(HUGEPAGE_MIN_BYTES + (4 << 20), dtype=torch.uint8)
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    expected = sys.platform.startswith("linux") and thp.is_file()
    assert advise_hugepages(big) is expected
    img = torch.randint(0, 256, (1, 3, 1024, 1024), dtype=torch.uint8)  # a 12 MiB float32 output
    got = kernels.composite(img, mean=MEAN, std=STD, backend="torch")
    assert torch.equal(got, plain_reference(kernels.composite, {"fg": img}, _out_kwargs(torch.float32, True, False)))


def test_mask_reuse_shares_masks_but_sees_changes():
    """Inside ``mask_reuse`` the composites equal those made outside it; a keep tensor changed in place, or
    another tensor, gets its own mask; the inverted mask is not confused with the plain one."""
    args = composite_inputs(seed=4, b=3, h=8, w=8, n=2, device="cpu", what="mixed")
    args["fg"] = args["fg"].contiguous(memory_format=torch.channels_last)
    keep = args["keep"].clone()
    outside = kernels.composite(**args)
    outside_inv = kernels.composite(args["fg"], args["keep"], invert=True)
    with kernels.mask_reuse():
        assert torch.equal(kernels.composite(**args), outside)
        assert torch.equal(kernels.composite(args["fg"], args["keep"], invert=True), outside_inv)
        assert torch.equal(kernels.composite(**args), outside)
        args["keep"][:, :, :4] = ~args["keep"][:, :, :4]  # in place: a new version
        changed = kernels.composite(**args)
        other = kernels.composite(**dict(args, keep=keep))
    assert torch.equal(changed, plain_reference(kernels.composite, args, _out_kwargs(torch.uint8, False, False)))
    assert torch.equal(other, outside)


def test_triton_kernels_compile_for_cuda():
    """Beyond the interpreter: both kernels compile to sm_90 cubins (H100/H200) with Triton's own toolchain, which
    needs no GPU. Runs in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from bgsynth.kernels._aot import compile_for_cuda\nprint('\\n'.join(compile_for_cuda(90)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all("bytes of cubin" in line for line in lines), res.stdout
