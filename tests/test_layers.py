"""The import structure of ``mmpipe``: layers that read top-down, no import circle.

The layer order is written once, as the drawing in docs/architecture.md (between the ``layers``
markers); this test reads it. Every import counts, the ones inside functions too: a lazy import runs
as surely as a top-level one, it only runs later.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mmpipe"
DRAWING = re.compile(r"<!-- layers:begin -->\s*```text\n(.*?)```\s*<!-- layers:end -->", re.S)


def module_files() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``mmpipe`` modules ``name`` imports (``from package import submodule`` counts as the
    submodule, ``from package import name`` as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known:
                    found.add(base)
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def layers() -> list[tuple[str, list[str]]]:
    """(layer, module prefixes), lowest first, from the drawing (drawn highest first)."""
    drawing = DRAWING.search((ROOT / "docs/architecture.md").read_text())
    assert drawing, "docs/architecture.md lost its layer drawing (<!-- layers:begin --> ... <!-- layers:end -->)"
    rows = []
    for line in drawing.group(1).splitlines():
        if "│" not in line:
            continue
        label, modules = (part.strip() for part in line.split("│", 1))
        rows.append((label, [f"mmpipe.{m}" if m != "mmpipe" else m for m in modules.split()]))
    return rows[::-1]


def layer_of(module: str, order: list[tuple[str, list[str]]]) -> int:
    matches = [(len(prefix), level) for level, (_, prefixes) in enumerate(order) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of docs/architecture.md's drawing"
    return max(matches)[1]


def test_every_import_goes_down_or_across():
    order = layers()
    assert len(order) >= 8
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target, order) > layer_of(module, order):
                upward.append(f"{module} ({order[layer_of(module, order)][0]}) imports {target} "
                              f"({order[layer_of(target, order)][0]})")
    assert not upward, "imports from a lower layer up:\n" + "\n".join(sorted(upward))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert not cycles(graph()), "import circles: " + "; ".join(" <-> ".join(c) for c in cycles(graph()))


def test_the_checks_see_circles_and_upward_imports():
    # the detector itself, on a drawn graph: a circle of three and a clean chain
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []
    # and on this package: the registry imports the image module, which is in a lower-or-equal layer
    edges = graph()
    assert "mmpipe.modalities.image" in edges["mmpipe.modalities"]
    assert "mmpipe.names" in edges["mmpipe.features.loader"]
    order = layers()
    assert layer_of("mmpipe.names", order) < layer_of("mmpipe.modalities.image", order) \
        < layer_of("mmpipe.features.loader", order) < layer_of("mmpipe.deploy.export", order)
