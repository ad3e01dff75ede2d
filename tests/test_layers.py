"""The package's architecture, checked: no import loop in lib/, and no module importing a higher layer.

The graph is drawn from every `import` and `from ... import` in the source, inside functions (they run
just the same, later) and under `if TYPE_CHECKING:` alike, relative imports resolved, and
`from colquant import x` counted as an import of the submodule `colquant.x` when there is one. The
layers, lowest first, are declared once, in `colquant/__init__.py`'s docstring; a module belongs to the
layer whose folder holds it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
TOP = "colquant"
LAYERS_HEADING = "Layers, lowest first"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of lib/
    line: int

    def __str__(self) -> str:
        return f"{self.source} imports {self.target} ({module_file(self.source).relative_to(LIB.parent)}:{self.line})"


def module_file(module: str) -> Path:
    path = LIB.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def lib_modules() -> dict[str, bool]:
    """Every module under lib/, by dotted name, and whether it is a package (an `__init__.py`)."""
    modules = {}
    for file in sorted(LIB.rglob("*.py")):
        parts = file.relative_to(LIB).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = is_package
    return modules


def imports_of(module: str, is_package: bool, modules: dict[str, bool]) -> Iterator[Import]:
    """The modules of lib/ that `module` imports, one per import statement and name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(module_file(module).read_text(), str(module_file(module)))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in modules:  # `import a.b.c` of a function or class: its module
                    name = name.rpartition(".")[0]
                if name:
                    yield Import(module, name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    yield Import(module, submodule, node.lineno)
                elif base in modules:
                    yield Import(module, base, node.lineno)


def import_graph() -> dict[str, list[Import]]:
    modules = lib_modules()
    return {module: [edge for edge in imports_of(module, is_package, modules) if edge.target != module]
            for module, is_package in modules.items()}


def strongly_connected(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module: each holds a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for edge in graph[module]:
            if edge.target not in index:
                visit(edge.target)
                low[module] = min(low[module], low[edge.target])
            elif edge.target in stack:
                low[module] = min(low[module], index[edge.target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return components


def a_loop(graph: dict[str, list[Import]], component: list[str]) -> list[Import]:
    """One loop through the component's first module: the shortest way back to it (breadth first)."""
    start, members = component[0], set(component)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for edge in graph[module]:
                if edge.target == start:
                    return paths[module] + [edge]
                if edge.target in members and edge.target not in paths:
                    paths[edge.target] = paths[module] + [edge]
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"{component} is no loop")


def declared_layers() -> list[str]:
    """The layers the package docstring declares, lowest first: the lines `    <package>  <what it holds>`
    after the line starting with LAYERS_HEADING."""
    docstring = ast.get_docstring(ast.parse(module_file(TOP).read_text())) or ""
    lines = docstring.splitlines()
    heading = next((i for i, line in enumerate(lines) if line.startswith(LAYERS_HEADING)), None)
    assert heading is not None, (f"{module_file(TOP)}'s docstring declares no layers: add a paragraph starting "
                                 f"'{LAYERS_HEADING}' with one indented line per layer, '<package>  <what it holds>'")
    layers = []
    for line in lines[heading + 1:]:
        if layers and not line.strip():
            break
        if line.startswith("    ") and line.split():
            layers.append(line.split()[0])
    return layers


def layer_of(module: str, layers: list[str]) -> int | None:
    """The index of the layer whose folder holds `module`: the deepest declared package it sits in. The
    top layer (the package itself) holds only its `__init__` and `__main__`; other loose modules, none."""
    holding = [i for i, layer in enumerate(layers) if module == layer or module.startswith(layer + ".")]
    if not holding:
        return None
    deepest = max(holding, key=lambda i: len(layers[i]))
    if layers[deepest] == TOP and module not in (TOP, f"{TOP}.__main__"):
        return None
    return deepest


def test_no_module_imports_itself_back_even_through_imports_inside_functions():
    graph = import_graph()
    components = strongly_connected(graph)
    report = "\n\n".join(f"{len(component)} modules in a loop ({', '.join(component)}), e.g.:\n  "
                         + "\n  ".join(map(str, a_loop(graph, component))) for component in components)
    assert not components, f"{len(components)} import loops in lib/:\n\n{report}"


def test_the_declared_layers_are_the_package_folders_and_hold_every_module():
    layers = declared_layers()
    assert layers[-1] == TOP, f"the highest layer is the package itself ({TOP}: its public names and command line)"
    assert len(set(layers)) == len(layers), f"a layer is declared twice: {layers}"
    not_packages = [layer for layer in layers if not (LIB.joinpath(*layer.split(".")) / "__init__.py").is_file()]
    assert not not_packages, f"declared layers that are no package folder under lib/: {not_packages}"
    unplaced = sorted(module for module in lib_modules() if layer_of(module, layers) is None)
    assert not unplaced, (f"modules in no layer's folder: {unplaced}; move each into the folder of the layer it "
                          f"belongs to (declared in {module_file(TOP).relative_to(LIB.parent)}), or declare a new layer")


def test_no_module_imports_a_higher_layer():
    layers = declared_layers()
    placed = {module: layer_of(module, layers) for module in lib_modules()}
    upward = [edge for edges in import_graph().values() for edge in edges
              if None not in (placed[edge.source], placed[edge.target]) and placed[edge.target] > placed[edge.source]]
    report = "\n".join(f"  {edge}: {layers[placed[edge.source]]} is below {layers[placed[edge.target]]}" for edge in upward)
    assert not upward, f"{len(upward)} imports reach up a layer (layers, lowest first: {', '.join(layers)}):\n{report}"


def test_the_graph_counts_imports_inside_functions_relative_ones_and_submodules_named_from_their_package(tmp_path,
                                                                                                        monkeypatch):
    """The graph sees what runs: a function's import, `from . import x`, and `from pkg import module`."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg import a  # the module, not the package\n")
    (package / "a.py").write_text("def late():\n    from .sub import b\n    return b\n")
    (package / "sub" / "b.py").write_text("if False:\n    from ..a import late\nfrom . import c\n")
    (package / "sub" / "c.py").write_text("import pkg.a\n")
    monkeypatch.setitem(globals(), "LIB", tmp_path)
    graph = {module: sorted({edge.target for edge in edges}) for module, edges in import_graph().items()}
    assert graph == {"pkg": [], "pkg.a": ["pkg.sub.b"], "pkg.sub": ["pkg.a"], "pkg.sub.b": ["pkg.a", "pkg.sub.c"],
                     "pkg.sub.c": ["pkg.a"]}
    assert strongly_connected(import_graph()) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
