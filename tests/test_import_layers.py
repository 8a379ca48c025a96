"""The package's import graph runs one way: from the kernels up to the command line.

Every ``import`` in every module of ``minunet`` is read with :mod:`ast` (imports inside
functions included: a lazy import is still a dependency). A module may import modules of its
own layer or of lower layers, never of a higher one, and the graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minunet"

# Lowest first. A module belongs to the layer of the longest prefix that names it; modules
# named nowhere (new application code) belong to the top layer.
LAYERS = [
    {"minunet.backend", "minunet.shapes", "minunet.checks", "minunet.files"},
    {"minunet.cuda"},  # the CUDA sources, their compilation and launch (host) code
    {"minunet.functional"},  # the kernels: NumPy, and CuPy arrays sent to minunet.cuda.ops
    {"minunet.nn"},
    {"minunet.unet"},
    {"minunet.losses", "minunet.optim", "minunet.serialization", "minunet.metrics",
     "minunet.postprocess", "minunet.data", "minunet.torch_reference"},
    {"minunet.inference", "minunet.train", "minunet.cli", "minunet.__main__", "minunet"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_length = len(LAYERS) - 1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_length:
                best, best_length = index, len(name)
    return best


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, name: str) -> set[str]:
    """The minunet modules that the module ``name`` at ``path`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # "from minunet import nn" imports minunet.nn
                submodule = f"{base}.{alias.name}"
                found.add(submodule if is_module(submodule) else base)
    return {module for module in found if module == "minunet" or module.startswith("minunet.")}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imports_of(path, name) - {name}
    return graph


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} "
              f"(layer {layer_of(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # a package imports its own submodules (its __init__ re-exports them): not a cycle
    edges = {module: {t for t in targets if not t.startswith(module + ".")}
             for module, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_kernels_know_nothing_above_them():
    """The acceptance criterion in one line: kernels and their checks import no layer above
    the kernels (no nn, no losses, no unet, ...)."""
    kernels = layer_of("minunet.functional")
    for module, targets in import_graph().items():
        if layer_of(module) <= kernels:
            assert all(layer_of(t) <= kernels for t in targets), (module, targets)
