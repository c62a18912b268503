"""The package's layer order, held: README "Architecture" states it once (the block after
`<!-- layers -->`), and this test reads it from there.

Every import of a launcher module, at the top of a file, inside a function or behind
TYPE_CHECKING, must
- run to the importer's own layer or one below it (never up),
- close no cycle (between modules, or between the packages of a layer),
- stand at the top of its file, unless it is heavy and says so: `# heavy: torch` on the import's
  first line names a library that the imported module loads (through its own top-level imports)
  and the importing module does not. Only that keeps `import launcher` and `--help` light.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "launcher"
HEAVY = re.compile(r"#\s*heavy:\s*([\w., ]+)")


def declared_layers(readme: str) -> list[list[str]]:
    """README's layer block, bottom layer first: each layer a list of module names or prefixes."""
    text = readme.split("<!-- layers -->", 1)
    assert len(text) == 2, "README.md has no `<!-- layers -->` block"
    block = text[1].split("```", 2)[1]
    layers: dict[int, list[str]] = {}
    for line in block.splitlines():
        match = re.match(r"\s*(\d+)\s+(.*)$", line)
        if match:
            names = match.group(2).split("  ")[0].replace(",", " ").split()
            layers[int(match.group(1))] = names
    assert layers and sorted(layers) == list(range(1, len(layers) + 1)), block
    return [layers[n] for n in sorted(layers)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    where: str  # "top", "function" or "typing"
    heavy: tuple[str, ...]  # the libraries its `# heavy:` comment names

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} -> {self.target} ({self.where})"


def _resolve(base: str, name: str, known: dict[str, Path]) -> str:
    return f"{base}.{name}" if f"{base}.{name}" in known else base


def _imports_of(mod: str, path: Path, known: dict[str, Path]) -> tuple[list[Import], set[str]]:
    """One module's launcher imports, and the third-party roots it imports at its top level."""
    lines = path.read_text().splitlines()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: list[Import] = []
    libraries: set[str] = set()

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = "function"
            elif (
                isinstance(child, ast.If)
                and "TYPE_CHECKING" in ast.unparse(child.test)
                and where == "top"
            ):
                inner = "typing"
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [_resolve(base, a.name, known) for a in child.names]
            for target in targets:
                if target.split(".")[0] != "launcher":
                    if where == "top":
                        libraries.add(target.split(".")[0])
                    continue
                comment = HEAVY.search(lines[child.lineno - 1])
                heavy = tuple(comment.group(1).replace(",", " ").split()) if comment else ()
                found.append(Import(mod, target, child.lineno, where, heavy))
            visit(child, inner)

    visit(ast.parse("\n".join(lines)), "top")
    return found, libraries


@cache
def imports() -> tuple[list[Import], dict[str, set[str]]]:
    """Every launcher import of every module, and each module's top-level third-party roots."""
    known = modules()
    found: list[Import] = []
    libraries: dict[str, set[str]] = {}
    for mod, path in known.items():
        own, libraries[mod] = _imports_of(mod, path, known)
        found += own
    return found, libraries


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of the longest declared name that is `module` or a package above it."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(layers):
        for name in names:
            within = module == name or (module.startswith(name + ".") and name != "launcher")
            if within and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def loaded_libraries(module: str) -> set[str]:
    """The third-party libraries importing `module` loads: its own top-level imports and those
    of every launcher module it imports at the top (and their packages' __init__)."""
    found, libraries = imports()
    top: dict[str, set[str]] = {}
    for imp in found:
        if imp.where == "top":
            top.setdefault(imp.importer, set()).add(imp.target)
    seen: set[str] = set()
    stack = [module]
    while stack:
        mod = stack.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run first
        stack += sorted(top.get(mod, ()))
    return set().union(*(libraries.get(m, set()) for m in seen))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


@pytest.fixture(scope="module")
def layers() -> list[list[str]]:
    return declared_layers((ROOT / "README.md").read_text())


def test_every_module_has_a_layer(layers: list[list[str]]) -> None:
    missing = [m for m in modules() if layer_of(m, layers) is None]
    assert not missing, f"modules in no README layer: {missing}"


def test_no_import_runs_up(layers: list[list[str]]) -> None:
    found, _ = imports()
    up = [
        f"{imp}: layer {layer_of(imp.importer, layers)} imports {layer_of(imp.target, layers)}"
        for imp in found
        if (layer_of(imp.target, layers) or 0) > (layer_of(imp.importer, layers) or 0)
    ]
    assert not up, "imports that run up a layer:\n" + "\n".join(up)


def test_no_import_closes_a_cycle() -> None:
    found, _ = imports()
    edges: dict[str, set[str]] = {}
    for imp in found:
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, set()).add(imp.target)
    assert not cycles(edges), f"module cycles: {cycles(edges)}"


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else "launcher"


def test_no_two_packages_import_each_other() -> None:
    found, _ = imports()
    edges: dict[str, set[str]] = {}
    for imp in found:
        a, b = _package(imp.importer), _package(imp.target)
        if a != b and "launcher" not in (a, b):
            edges.setdefault(a, set()).add(b)
    assert not cycles(edges), f"package cycles: {cycles(edges)}"


def test_imports_inside_functions_are_heavy_and_say_so() -> None:
    found, _ = imports()
    wrong = []
    for imp in found:
        if imp.where == "top":
            continue
        if not imp.heavy:
            wrong.append(f"{imp}: move it to the top, or say `# heavy: LIB` if it is")
            continue
        target, importer = loaded_libraries(imp.target), loaded_libraries(imp.importer)
        for lib in imp.heavy:
            if lib not in target or lib in importer:
                wrong.append(
                    f"{imp}: `# heavy: {lib}` does not hold (the import loads {lib}: "
                    f"{lib in target}; {imp.importer} loads it anyway: {lib in importer})"
                )
    assert not wrong, "\n".join(wrong)


def test_the_reader_finds_what_it_should() -> None:
    """The checks above are only as good as this reader: it sees a relative import, one inside
    a function and one behind TYPE_CHECKING, and the cycle finder finds a loop of three."""
    found, _ = imports()
    assert any(i.where == "top" and i.target == "launcher.errors" for i in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    layers = declared_layers("<!-- layers -->\n```\n2  b.x b.y\n1  a  the bottom\n```\n")
    assert layers == [["a"], ["b.x", "b.y"]]
    assert layer_of("b.x.z", layers) == 1 and layer_of("b.w", layers) is None
    tree = ast.parse("def f():\n    from launcher import errors  # heavy: torch\n")
    assert isinstance(tree.body[0], ast.FunctionDef)
    assert HEAVY.search("    from x import y  # heavy: torch, deepspeed").group(1).split(",")[1]
