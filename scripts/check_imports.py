"""The import rules of src/artifex, checked from the source (no imports run):

1. nothing outside ``artifex.cli`` imports ``artifex.cli`` (the CLI is a door; libraries never depend on it; the
   package's ``python -m artifex`` entry, ``artifex/__main__.py``, is that door's);
2. the graph of ``artifex``'s top-level units (``artifex.engine``, ``artifex.serve``, ``artifex.config``, ...)
   has no cycle, counting every import, deferred ones inside functions included.

    python scripts/check_imports.py [SRC]     # exit 1 and the offending imports when a rule is broken
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[tuple[str, int]]:
    """Every ``artifex`` module ``path`` imports (relative imports resolved), with the line."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add((base, node.lineno))
            found |= {(f"{base}.{a.name}", node.lineno) for a in node.names}
    return sorted((m, line) for m, line in found if m == "artifex" or m.startswith("artifex."))


def unit(module: str) -> str:
    """The top-level unit of a module: ``artifex.engine.pipeline`` -> ``artifex.engine``."""
    return ".".join(module.split(".")[:2])


def check(src: Path) -> list[str]:
    root = src
    modules = {module_name(root, p): p for p in sorted((root / "artifex").rglob("*.py"))}
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    problems = []
    for name, path in modules.items():
        for target, line in imports_of(path, name):
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]  # ``from artifex.x import name``: the module is artifex.x
            if target not in modules:
                continue
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if unit(target) == "artifex.cli" and unit(name) != "artifex.cli" and name != "artifex.__main__":
                problems.append(f"outside the CLI: {where}")
            a, b = unit(name), unit(target)
            if a != b and b != "artifex":
                edges[a][b].append(where)
    problems += [f"import cycle {' -> '.join(c)}: " + "; ".join(edges[x][y][0] for x, y in zip(c, c[1:]))
                 for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one unit (Tarjan), as a closed path."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
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
                comps.append(set(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a shortest closed path through the component's first unit
        start = min(comp)
        paths = {start: [start]}
        frontier = [start]
        while frontier:
            nxt = []
            for v in frontier:
                for w in edges.get(v, {}):
                    if w == start:
                        out.append(paths[v] + [start])
                        nxt = []
                        frontier = []
                        break
                    if w in comp and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                else:
                    continue
                break
            frontier = nxt
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src"
    problems = check(src)
    for p in problems:
        print(p)
    if not problems:
        print("imports: no CLI import outside artifex.cli, no cycle between artifex's units")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
