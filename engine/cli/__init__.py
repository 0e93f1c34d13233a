"""``bgsynth <command>``: a thin layer over the public Python API.

Each command is a module of this package with ``register(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

# module names under bgsynth.cli, in the order `bgsynth --help` lists them
COMMANDS = (
    "demo",
    "make_dataset",
    "ingest",
    "prepare",
    "show",
    "export",
    "train",
    "compose",
    "eval",
    "challenge",
    "report",
    "bench",
)


def _modules():
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f"bgsynth.cli.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"bgsynth.cli.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="bgsynth",
        description="Batched foreground/background variant synthesis, evaluation and the Backgrounds Challenge.",
    )
    parser.add_argument("--version", action="version", version=f"bgsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _modules():
        p = mod.register(sub)
        p.set_defaults(_run=mod.run)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings of a command as one line each: ``bgsynth: warning: <message>`` (no source line, no path)."""
    return f"bgsynth: warning: {message}\n"


def _is_kernel_error(e: BaseException) -> bool:
    """Whether ``e`` is a :class:`bgsynth.kernels.errors.KernelError` (imported only now: the kernels load torch,
    which a command that failed before touching them need not pay for)."""
    if "bgsynth.kernels.errors" not in sys.modules:
        return False  # no kernel ran, so none raised
    return isinstance(e, sys.modules["bgsynth.kernels.errors"].KernelError)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from ..errors import BgsynthError

    args = build_parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return int(args._run(args) or 0)
    except Exception as e:  # noqa: BLE001 - only bgsynth's own errors are reported here; the rest propagates
        if not isinstance(e, BgsynthError) and not _is_kernel_error(e):
            raise
        print(f"bgsynth {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bgsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning  # main() may run in-process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
