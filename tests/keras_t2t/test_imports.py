"""The modules of keras_t2t (and of training/ and savedmodels/) import each other without a
circle.

Every import counts, at module level or inside a function: a function-local import only
hides a circle until the function runs. `from keras_t2t import x` is an edge to the submodule
`keras_t2t.x` when there is one, and to the package's `__init__` (`keras_t2t`) when `x` is a
name defined there; importing a submodule does not count as an import of its parent packages
(their `__init__` imports their submodules, which would make every package a circle).
"""

import ast
import pathlib

import pytest

PACKAGE = "keras_t2t"
ROOT = pathlib.Path(__file__).resolve().parents[2] / PACKAGE


def module_files(root=ROOT, package=PACKAGE):
    """{module name: path} of every module under `root`, subpackages included."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _is_package(name, modules):
    return modules.get(name, pathlib.Path()).name == "__init__.py"


def _target(name, modules):
    """The module that importing `name` (a dotted module path) depends on, or None if it is
    not one of ours."""
    while name and name not in modules:  # `keras_t2t.x.Class`: the module `keras_t2t.x`
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module, path, modules, package=PACKAGE):
    """The keras_t2t modules that `module` (its source at `path`) imports, at any level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own_package = module if _is_package(module, modules) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    found.add(_target(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y, from .. import z
                base = own_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == package or source.startswith(package + ".")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # A submodule imported from its package, or a name defined in `source`.
                found.add(submodule if submodule in modules else _target(source, modules))
    found.discard(None)
    found.discard(module)
    return found


def import_graph(root=ROOT, package=PACKAGE):
    modules = module_files(root, package)
    return {
        name: sorted(imports_of(name, path, modules, package)) for name, path in modules.items()
    }


def find_cycle(graph):
    """A list of modules `[a, b, ..., a]` forming a circle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def find_cycles(graph, limit=10):
    """Circles of `graph`, one found at a time and broken at its last edge to find the next."""
    graph = {node: list(edges) for node, edges in graph.items()}
    cycles = []
    while len(cycles) < limit and (cycle := find_cycle(graph)):
        cycles.append(cycle)
        graph[cycle[-2]].remove(cycle[-1])
    return cycles


@pytest.mark.parametrize("package", ["keras_t2t", "training", "savedmodels"])
def test_the_package_has_no_import_cycle(package):
    graph = import_graph(ROOT.parent / package, package)
    assert package in graph and len(graph) > 3
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The parser on a made-up package: function-local, relative and `from package import`
    imports are edges, and a name from the package's __init__ is an edge to it."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import a\nVALUE = 1\n",
        "a.py": "def f():\n    from pkg.b import thing\n",
        "b.py": "from . import c\nimport pkg.sub.d\n",
        "c.py": "from .sub import d\nfrom pkg import VALUE\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import a\nimport os\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(package, "pkg")
    assert graph == {
        "pkg": ["pkg.a"],
        "pkg.a": ["pkg.b"],
        "pkg.b": ["pkg.c", "pkg.sub.d"],
        "pkg.c": ["pkg", "pkg.sub.d"],
        "pkg.sub": [],
        "pkg.sub.d": ["pkg.a"],
    }
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg"]
    assert find_cycle({"x": ["y"], "y": []}) is None
    assert find_cycles({"x": ["y"], "y": ["x", "z"], "z": ["y"]}) == [
        ["x", "y", "x"],
        ["y", "z", "y"],
    ]
