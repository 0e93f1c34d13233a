"""The floors of bgsynth and the rules of what may import what, checked by walking the package's source.

Used by ``tests/test_architecture.py`` (in the manner of import-linter) and runnable as a script for a report::

    python tests/architecture.py            # violations, cycles, the largest functions

A module belongs to the floor of the longest prefix that names it in :data:`FLOORS`. The rules:

1. a module imports only modules of its own floor or of floors below it (kernels import nothing of bgsynth);
2. the imports between modules of bgsynth form no cycle;
3. bgsynth modules are imported at module level, so the dependency graph can be read from the top of each file;
   the only exceptions are the CLI's commands, which import the API inside ``run()`` so that ``bgsynth --help``
   and argument errors answer without importing torch (see :data:`LAZY_ALLOWED`);
4. every module is placed on a floor.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
#: where the import names come from (setup.py's package_dir)
PACKAGE_DIR = {"bgsynth": REPO / "engine", "bgsynth.kernels": REPO / "kernels"}

#: bottom to top; a floor may import its own and every lower floor
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("bgsynth.kernels",)),
    ("ground", ("bgsynth", "bgsynth.errors", "bgsynth.fileio", "bgsynth.classes", "bgsynth.geometry",
                "bgsynth.types", "bgsynth.rng", "bgsynth.config", "bgsynth.index", "bgsynth.probe", "bgsynth.data",
                "bgsynth.runs")),
    ("functional", ("bgsynth.variants", "bgsynth.augment", "bgsynth.masks", "bgsynth.results", "bgsynth.compose")),
    ("stateful", ("bgsynth.pipeline", "bgsynth.pool", "bgsynth.models", "bgsynth.distributed",
                  "bgsynth.trainloader", "bgsynth.compose_loader")),
    ("consumers", ("bgsynth.evaluate", "bgsynth.challenge", "bgsynth.challenge_search", "bgsynth.challenge_result",
                   "bgsynth.export", "bgsynth.prepare", "bgsynth.train",
                   "bgsynth.show", "bgsynth.report", "bgsynth.sources", "bgsynth.demo", "bgsynth.bench",
                   "bgsynth.compose_jobs")),
    ("cli", ("bgsynth.cli",)),
]
FLOOR_RANK = {name: k for k, (name, _) in enumerate(FLOORS)}
#: modules whose functions may import bgsynth modules lazily, and why
LAZY_ALLOWED = {
    "bgsynth.cli": "commands import the API inside run(): `bgsynth --help` must not import torch",
    "bgsynth.kernels._aot": "the Triton kernel modules import triton; they are loaded only to compile them",
}


def discover() -> dict[str, pathlib.Path]:
    """``{module name: file}`` of every module of the package (folders mapped as setup.py maps them)."""
    mods = {}
    for name, folder in PACKAGE_DIR.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([name, *parts])] = path
    return mods


def floor_of(module: str) -> str | None:
    """The floor of a module (longest matching prefix), or ``None`` when it is on no floor."""
    best, best_len = None, -1
    for floor, prefixes in FLOORS:
        for p in prefixes:
            exact_only = p == "bgsynth"  # the package itself (its __init__), not everything below it
            if (module == p or (not exact_only and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = floor, len(p)
    return best


@dataclasses.dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, mods: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
    out = []
    for n in names:
        while n and n not in mods:  # an attribute of a module -> the module
            n = n.rpartition(".")[0]
        if n:
            out.append(n)
    return out


def imports(mods: dict[str, pathlib.Path]) -> list[Import]:
    """Every import of a bgsynth module by a bgsynth module, with whether it sits inside a function."""
    found: list[Import] = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _resolve(module, is_package, child, mods):
                        if target != module:
                            found.append(Import(module, target, child.lineno, in_function))
                visit(child, inside)

        visit(tree, False)
    return found


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self-loop) of the module-level import graph."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def violations(mods: dict | None = None) -> dict[str, list[str]]:
    """Every broken rule, as readable lines, per rule."""
    mods = discover() if mods is None else mods
    edges = imports(mods)
    out: dict[str, list[str]] = {"unplaced": [], "upward": [], "cycles": [], "lazy": []}
    for m in sorted(mods):
        if floor_of(m) is None:
            out["unplaced"].append(f"{m} is on no floor")
    for e in edges:
        fs, ft = floor_of(e.source), floor_of(e.target)
        if fs and ft and FLOOR_RANK[ft] > FLOOR_RANK[fs]:
            out["upward"].append(f"{e.source}:{e.line} ({fs}) imports {e.target} ({ft})")
        if e.in_function and not any(e.source == p or e.source.startswith(p + ".") for p in LAZY_ALLOWED):
            out["lazy"].append(f"{e.source}:{e.line} imports {e.target} inside a function")
    out["cycles"] = [" -> ".join(c) for c in cycles([e for e in edges if not e.in_function])]
    return out


def functions(mods: dict | None = None) -> list[tuple[int, int, str, str]]:
    """``(lines, parameters, qualified name, reason)`` of every function; ``reason`` is the text of a
    ``# size: ...`` comment on the line above the ``def`` (why a function is long or takes many parameters)."""
    mods = discover() if mods is None else mods
    out = []
    for module, path in mods.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if a.args and a.args[0].arg in ("self", "cls"):
                    n -= 1
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                above = lines[first - 2].strip() if first >= 2 else ""
                reason = above[len("# size:"):].strip() if above.startswith("# size:") else ""
                out.append((node.end_lineno - node.lineno + 1, n, f"{module}.{node.name}", reason))
    return sorted(out, reverse=True)


def main() -> int:
    v = violations()
    for rule, lines in v.items():
        print(f"{rule}: {len(lines)}")
        for line in lines:
            print(f"  {line}")
    fs = functions()
    print("largest functions (lines, parameters):")
    for n_lines, n_params, name, reason in fs[:12]:
        print(f"  {n_lines:4d} {n_params:3d}  {name}{'  # ' + reason if reason else ''}")
    print("most parameters:")
    for n_lines, n_params, name, reason in sorted(fs, key=lambda f: -f[1])[:8]:
        print(f"  {n_params:3d} {n_lines:4d}  {name}{'  # ' + reason if reason else ''}")
    big = [f for f in fs if (f[0] > 80 or f[1] > 8) and not f[3]]
    print(f"over 80 lines or 8 parameters without a reason: {len(big)}")
    for n_lines, n_params, name, _ in big:
        print(f"  {n_lines:4d} {n_params:3d}  {name}")
    return 0 if not any(v.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
