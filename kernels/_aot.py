"""Ahead-of-time compilation of the Triton kernels for a CUDA target, without a GPU (a build check).

Triton compiles to PTX and, with its bundled ``ptxas``, to a cubin on any machine; this lets the tests check on a
CPU-only machine that the kernels compile for real hardware, not only under the interpreter. Must run in a
process where ``TRITON_INTERPRET`` is unset (the kernels are then ``JITFunction`` s, not interpreted).
"""

from __future__ import annotations

import inspect

__all__ = ["compile_for_cuda"]


def compile_for_cuda(arch: int = 90, warp_size: int = 32) -> list[str]:
    """Compile both kernels for ``sm_<arch>`` in their main configurations; returns one line per compilation.

    Raises whatever Triton raises when a kernel does not compile; a ``RuntimeError`` when the kernels were
    decorated under the interpreter.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._triton_composite import composite_kernel
    from ._triton_tile import tile_fill_kernel

    if not hasattr(tile_fill_kernel, "fn") or type(tile_fill_kernel).__name__ != "JITFunction":
        raise RuntimeError("compile_for_cuda: the kernels were built by the interpreter (unset TRITON_INTERPRET)")
    target = GPUTarget("cuda", arch, warp_size)
    lines = []
    for mode, out_ty in ((0, "*u8"), (2, "*bf16")):
        names = list(inspect.signature(tile_fill_kernel.fn).parameters)
        types = ["*u8", "*i32", "*i32", "*fp32", "*fp32", out_ty] + ["i32"] * 11 + ["constexpr"] * 2
        src = ASTSource(fn=tile_fill_kernel, signature=dict(zip(names, types)), constexprs={"MODE": mode, "BLOCK": 1024})
        k = triton.compile(src, target=target)
        lines.append(f"tile_fill_kernel MODE={mode} out={out_ty}: {len(k.asm['cubin'])} bytes of cubin")
        names = list(inspect.signature(composite_kernel.fn).parameters)
        types = ["*u8", "*u8", "*u8", "*i64", "*i32", "*fp32", "*fp32", out_ty] + ["i32"] * 19 + ["constexpr"] * 6
        flags = dict(HAS_KEEP=True, INVERT=mode == 2, HAS_BOX=True, HAS_BG=True, MODE=mode, BLOCK=1024)
        src = ASTSource(fn=composite_kernel, signature=dict(zip(names, types)), constexprs=flags)
        k = triton.compile(src, target=target)
        lines.append(f"composite_kernel MODE={mode} out={out_ty}: {len(k.asm['cubin'])} bytes of cubin")
    return lines
