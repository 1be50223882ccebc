"""Import structure of src/slimtune, read from the source with ast (nothing is imported).

    * no module imports a private name (`_x`) of another module;
    * no import cycle between modules;
    * no cycle between the top-level parts of slimtune (its subpackages and top-level modules) beyond
      PACKAGE_CYCLES; an import of the root package `slimtune` (its re-exports) counts for none;
    * the leaves import only what LEAVES allows.
Every import counts: top-level, inside a function (lazy) or under TYPE_CHECKING. Importing a submodule
is not counted as importing its parent package's __init__ (that would make every re-export a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "slimtune"

PACKAGE_CYCLES: list[set[str]] = []
"""Cycles between top-level parts that exist on purpose; each entry names one cycle's parts.

Empty: kernels and quant in particular must never import each other (both build on quant_format).
"""

LEAVES: dict[str, set[str]] = {
    "dtypes": set(),
    "quant_format": {"dtypes"},
}
"""Top-level parts -> the only other parts they may import."""


@dataclass(frozen=True)
class Import:
    importer: str
    """The importing module, e.g. "slimtune.kernels.lora_mlp"."""
    target: str
    """The slimtune module imported (or imported from)."""
    name: str | None
    """The name taken from `target` (`from target import name`); None when a module is imported."""
    line: int


def modules(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/slimtune (a package is named by its __init__)."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _known(name: str, mods: dict[str, Path]) -> str:
    """The longest prefix of `name` that is a module (the module an import of `name` runs)."""
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(src: Path) -> list[Import]:
    """Every import of a slimtune module by a slimtune module."""
    mods = modules(src)
    out = []
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(module, _known(a.name, mods), None, node.lineno)
                        for a in node.names if a.name.split(".")[0] == ROOT]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base.split(".")[0] != ROOT:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods:
                        out.append(Import(module, sub, None, node.lineno))
                    else:
                        out.append(Import(module, _known(base, mods), a.name, node.lineno))
    return out


def private_imports(imps: Iterable[Import]) -> list[str]:
    """`from A import _x` in a module other than A (dunder names such as __version__ are public)."""
    return [f"{i.importer}:{i.line} imports {i.target}.{i.name}" for i in imps
            if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.target != i.importer]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def module_graph(imps: Iterable[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in imps:
        if i.target != i.importer:
            edges.setdefault(i.importer, set()).add(i.target)
    return edges


def part(module: str) -> str | None:
    """The top-level part of slimtune that `module` belongs to ("quant" for slimtune.quant.nf4); None for the root."""
    names = module.split(".")
    return names[1] if len(names) > 1 else None


def package_graph(imps: Iterable[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for i in imps:
        a, b = part(i.importer), part(i.target)
        if a and b and a != b:
            edges.setdefault(a, set()).add(b)
    return edges


@pytest.fixture(scope="module")
def src_imports() -> list[Import]:
    return imports(SRC)


def test_no_private_imports_across_modules(src_imports: list[Import]) -> None:
    assert private_imports(src_imports) == []


def test_no_module_import_cycles(src_imports: list[Import]) -> None:
    assert cycles(module_graph(src_imports)) == []


def test_package_cycles_are_the_listed_ones(src_imports: list[Import]) -> None:
    assert cycles(package_graph(src_imports)) == sorted(sorted(c) for c in PACKAGE_CYCLES)


def test_leaves_import_only_what_they_may(src_imports: list[Import]) -> None:
    graph = package_graph(src_imports)
    for leaf, allowed in LEAVES.items():
        assert graph.get(leaf, set()) <= allowed, f"{leaf} imports {sorted(graph[leaf] - allowed)}"
    assert "quant" not in graph.get("kernels", set())


def _write(src: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_see_what_they_should(tmp_path: Path) -> None:
    """Private, relative, lazy and TYPE_CHECKING imports are all read, and cycles at both levels found."""
    _write(tmp_path, {
        "slimtune/__init__.py": "from slimtune.a import f\n",
        "slimtune/a/__init__.py": "from slimtune.a.x import f\n",
        "slimtune/a/x.py": "from .y import _g\n\ndef f():\n    from slimtune.b import h\n",
        "slimtune/a/y.py": "def _g(): ...\n",
        "slimtune/b/__init__.py": "from slimtune.b.z import h\n",
        "slimtune/b/z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import slimtune.a.y\ndef h(): ...\n",
        "slimtune/c.py": "from slimtune.a import x\nfrom slimtune import __version__\nimport slimtune.c\n",
    })  # fmt: skip
    imps = imports(tmp_path)
    assert private_imports(imps) == ["slimtune.a.x:1 imports slimtune.a.y._g"]
    assert cycles(module_graph(imps)) == []  # a.x -> b -> b.z -> a.y, no way back
    assert cycles(package_graph(imps)) == [["a", "b"]]
    assert Import("slimtune.c", "slimtune.a.x", None, 1) in imps
    assert package_graph(imps)["c"] == {"a"}  # the root's re-exports belong to no part
    _write(tmp_path, {"slimtune/a/y.py": "import slimtune.a.x\n"})  # closes a.x -> y -> a.x and a.x -> b -> b.z -> y
    assert cycles(module_graph(imports(tmp_path))) == [["slimtune.a.x", "slimtune.a.y", "slimtune.b", "slimtune.b.z"]]
