"""The package's shape, checked mechanically (docs/design.md §6.1): no import circle, counting
imports inside functions; no import up the layers; no module over 450 lines; no function over
80 lines."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pymaml")


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))
                name = rel[:-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = \
                    os.path.join(root, f)
    return found


def _imports(name, path, modules):
    """The package's modules that `name` imports, anywhere in its code."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # `from . import x` names a module, or a name of one
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    out.discard(name)
    return {m for m in out if m in modules}


def _cycle(graph):
    """One import circle of `graph`, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_circle():
    modules = _modules()
    # A package's __init__ imports its modules to re-export them; only the modules' own
    # imports can make a circle that matters.
    graph = {m: {d for d in _imports(m, p, modules) if d != "pymaml" and
                 not (modules[d].endswith("__init__.py") and m.startswith(d + "."))}
             for m, p in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# The layers of docs/design.md §6.1, top (1) to floor (5); a module not named here is refused
# until it is placed.
LAYERS = {
    1: ["pymaml", "pymaml.__main__", "pymaml.cli", "pymaml._entry"],
    2: ["pymaml.trainer", "pymaml.checkpoint", "pymaml.config"],
    3: ["pymaml.algorithms*", "pymaml.tasks*", "pymaml.meta_step", "pymaml.fast_path",
        "pymaml.outer_optim", "pymaml.model", "pymaml.daml_model", "pymaml.evaluate",
        "pymaml.plots", "pymaml.progress", "pymaml.distributed",
        "pymaml.nn", "pymaml.testing", "pymaml.func_oracles"],
    4: ["pymaml.functional", "pymaml.daml", "pymaml._route", "pymaml.reference", "pymaml._ops"],
    5: ["pymaml._checks", "pymaml._rates", "pymaml._layout", "pymaml._io", "pymaml._paths",
        "pymaml._flags", "pymaml._version"],
}


def _layer(module):
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or (name.endswith("*") and (module == name[:-1]
                                                           or module.startswith(name[:-1] + "."))):
                return layer
    raise AssertionError(f"{module} is in no layer of docs/design.md §6.1 (tests/test_structure.py)")


def test_no_import_runs_up_the_layers():
    modules = _modules()
    for m, path in modules.items():
        for d in _imports(m, path, modules):
            if d == "pymaml" and m != "pymaml":  # `from . import _C`: the compiled core
                continue
            assert _layer(d) >= _layer(m), f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_and_functions_are_short(name):
    path = _modules()[name]
    source = open(path).read()
    assert source.count("\n") <= 450, f"{path} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path}: {node.name} is {length} lines"
