"""The import rules of docs/ARCHITECTURE.md, read from the source (an AST walk; nothing is imported).

- no module imports another module's private (``_name``) name, nor reads ``module._name`` of another vpeft module;
- layering: methods never import train / bench / cli / run / search; layers never import methods; arch never imports
  methods; the core (api, state, config, registry, errors) never imports cli, bench, run, train or search;
- no import cycles, counting every import (module-level, inside functions and under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vpeft"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, tree: ast.Module):
    """``(imported module, imported names, line)`` of every vpeft import in ``tree``."""
    is_pkg = MODULES[name][0].name == "__init__.py"
    nodes = list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_pkg, node)
            if target == "vpeft" or target.startswith("vpeft."):
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vpeft"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            target = _constant_prefix(node.args[0])  # importlib.import_module("vpeft.train") counts as an import
            if target.startswith("vpeft.") or target == "vpeft":
                yield target.rstrip("."), [], node.lineno


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )


def _constant_prefix(arg: ast.expr) -> str:
    """The literal part of a module name: "vpeft.train" or f"vpeft.{x}" -> "vpeft." (a package's own lazy
    imports, ``f"{__name__}.{name}"``, have no literal vpeft prefix and are not counted)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return ""


def _module_aliases(name: str, tree: ast.Module) -> dict[str, str]:
    """Local names bound to vpeft modules: ``from .. import state as st`` -> {"st": "vpeft.state"},
    ``import vpeft.train as t`` -> {"t": "vpeft.train"}, ``import vpeft.x`` -> {"vpeft": "vpeft"}."""
    is_pkg = MODULES[name][0].name == "__init__.py"
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_pkg, node)
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:
                    out[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vpeft"):
                    out[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "vpeft"
    return out


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_module(name: str) -> bool:
    return name in MODULES


def private_names_across_modules(modules) -> list[str]:
    bad = []
    for name, (path, tree) in modules.items():
        where = path.relative_to(SRC.parent)
        for target, names, line in _imports(name, tree):
            for imported in names:
                if _is_module(f"{target}.{imported}"):
                    continue
                if imported.startswith("_") and not imported.startswith("__") and target != name:
                    bad.append(f"{where}:{line}: from {target} import {imported}")
        aliases = _module_aliases(name, tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            owner = _dotted(node.value)  # st._x (st an alias of vpeft.state), vpeft.state._x, vpeft.x.y._z
            if owner is None:
                continue
            head, _, rest = owner.partition(".")
            module = aliases.get(head)
            if module is not None:
                full = f"{module}.{rest}" if rest else module
                if full in MODULES and full != name:
                    bad.append(f"{where}:{node.lineno}: {owner}.{node.attr}")
        for node in ast.walk(tree):  # the state attribute is read through vpeft.state only
            if name == "vpeft.state":
                break
            if isinstance(node, ast.Constant) and node.value == "_vpeft_state":
                bad.append(f"{where}:{node.lineno}: the string '_vpeft_state'")
            if isinstance(node, ast.Attribute) and node.attr == "_vpeft_state":
                bad.append(f"{where}:{node.lineno}: the attribute ._vpeft_state")
    return bad


def test_no_private_names_across_modules():
    bad = private_names_across_modules(MODULES)
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


PLANTED_PRIVATE = {
    "alias": ("from . import state as st\nx = st._helper", "st._helper"),
    "dotted": ("import vpeft.state\nx = vpeft.state._helper", "vpeft.state._helper"),
    "state attribute": ("def f(model):\n    return model._vpeft_state", "._vpeft_state"),
    "state string": ("def f(model):\n    return getattr(model, '_vpeft_state')", "'_vpeft_state'"),
    "from-import": ("from .state import _helper", "import _helper"),
}


@pytest.mark.parametrize("case", PLANTED_PRIVATE, ids=list(PLANTED_PRIVATE))
def test_the_private_name_rule_catches_a_planted_violation(case, monkeypatch):
    source, expected = PLANTED_PRIVATE[case]
    monkeypatch.setitem(MODULES, "vpeft.planted", (SRC / "planted.py", ast.parse(source)))
    bad = private_names_across_modules(MODULES)
    assert any(expected in line and "planted.py" in line for line in bad), bad


# (importing package prefix, forbidden imported prefixes)
RULES = [
    ("vpeft.methods", ("vpeft.train", "vpeft.bench", "vpeft.cli", "vpeft.run", "vpeft.search", "vpeft.api")),
    ("vpeft.layers", ("vpeft.methods", "vpeft.api", "vpeft.train", "vpeft.bench", "vpeft.cli", "vpeft.run")),
    ("vpeft.arch", ("vpeft.methods", "vpeft.api", "vpeft.train", "vpeft.bench", "vpeft.cli", "vpeft.run")),
    ("vpeft.tasks", ("vpeft.api", "vpeft.train", "vpeft.bench", "vpeft.cli", "vpeft.run", "vpeft.search")),
    ("vpeft.train", ("vpeft.bench", "vpeft.cli", "vpeft.run", "vpeft.search")),
    ("vpeft.data", ("vpeft.api", "vpeft.methods", "vpeft.train", "vpeft.bench", "vpeft.cli", "vpeft.run")),
    ("vpeft.api", ("vpeft.cli", "vpeft.bench", "vpeft.run", "vpeft.train", "vpeft.search")),
    # the delta file format: config, errors and version only (api, multitask, run and the server read it)
    (
        "vpeft.delta",
        (
            "vpeft.api",
            "vpeft.methods",
            "vpeft.state",
            "vpeft.tasks",
            "vpeft.train",
            "vpeft.run",
            "vpeft.cli",
            "vpeft.bench",
            "vpeft.search",
            "vpeft.tune",
            "vpeft.arch",
            "vpeft.layers",
        ),
    ),
    ("vpeft.state", ("vpeft.cli", "vpeft.bench", "vpeft.run", "vpeft.train", "vpeft.search", "vpeft.api")),
    ("vpeft.config", ("vpeft.cli", "vpeft.bench", "vpeft.run", "vpeft.train", "vpeft.api", "vpeft.methods")),
    ("vpeft.registry", ("vpeft.cli", "vpeft.bench", "vpeft.run", "vpeft.train", "vpeft.api")),
    ("vpeft.run", ("vpeft.cli", "vpeft.bench", "vpeft.search", "vpeft.tune")),
    # the leaves everything may import import nothing of vpeft above them
    ("vpeft.errors", ("vpeft",)),
    ("vpeft.version", ("vpeft",)),
    ("vpeft.config", ("vpeft.registry",)),  # configs register through their class, never the registry
    ("vpeft.state", ("vpeft.methods",)),
    (
        "vpeft.backbones",
        (
            "vpeft.api",
            "vpeft.methods",
            "vpeft.train",
            "vpeft.tasks",
            "vpeft.run",
            "vpeft.cli",
            "vpeft.bench",
            "vpeft.search",
            "vpeft.tune",
        ),
    ),
    ("vpeft.bench", ("vpeft.cli",)),
    ("vpeft.search", ("vpeft.cli",)),
    ("vpeft.tune", ("vpeft.cli", "vpeft.bench", "vpeft.search")),
    ("vpeft.files", ("vpeft.cli", "vpeft.bench", "vpeft.run", "vpeft.train", "vpeft.api", "vpeft.data", "vpeft.state")),
    # the server: run and below (its CLI module registers with vpeft.cli, which imports it, not the reverse)
    ("vpeft.serve", ("vpeft.cli", "vpeft.bench", "vpeft.search", "vpeft.tune")),
]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_violations(modules, importer: str, forbidden) -> list[str]:
    return [
        f"{modules[name][0].relative_to(SRC.parent)}:{line}: imports {target}"
        for name, (_, tree) in modules.items()
        if _under(name, importer)
        for target, _, line in _imports(name, tree)
        if any(_under(target, f) for f in forbidden)
    ]


@pytest.mark.parametrize("importer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_layering(importer, forbidden):
    bad = layering_violations(MODULES, importer, forbidden)
    assert not bad, f"{importer} must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import importlib\ntrain = importlib.import_module('vpeft.train')",
        "from importlib import import_module\nrun = import_module(f'vpeft.run')",
        "def f():\n    from vpeft.bench import runner",
        "import vpeft.cli as c",
    ],
)
def test_the_layering_rule_catches_a_planted_import(source, monkeypatch):
    monkeypatch.setitem(MODULES, "vpeft.methods.planted", (SRC / "methods" / "planted.py", ast.parse(source)))
    forbidden = dict(RULES)["vpeft.methods"]
    assert layering_violations(MODULES, "vpeft.methods", forbidden), source


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (_, tree) in MODULES.items():  # every import counts: module-level, in functions, under TYPE_CHECKING
        deps = set()
        for target, names, _ in _imports(name, tree):
            for imported in names or [""]:
                full = f"{target}.{imported}" if imported else target
                deps.add(full if _is_module(full) else target)
        graph[name] = {d for d in deps if _is_module(d) and d != name}
    return graph


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the design: drop edges into a package's
    # own children, and edges from a child to its parent package's __init__ are what we check
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:20])


# ---- no private attribute of torch / timm / open_clip / transformers -------------------------------------------
# What vpeft reads of a library goes through its public API. A ``._name`` attribute (or ``getattr(x, "_name")``) in
# src/ must name something vpeft itself defines; the one deliberate exception has its reason beside it.
LIBRARY_PRIVATE_ALLOWED = {
    ("vpeft._modules", "_version"),  # torch's in-place version counter: no public API (see tensor_versions)
}


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _defined_names(modules) -> set[str]:
    """Every name vpeft defines: functions, classes, arguments, assigned names and attributes, import aliases."""
    names: set[str] = set()
    for _, (_, tree) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif (  # self.__dict__["_cache"] = ..., setattr(self, "_x", ...)
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                names.add(node.slice.value)
    return names


def library_private_uses(modules) -> list[str]:
    defined = _defined_names(modules)
    bad = []
    for name, (path, tree) in modules.items():
        for node in ast.walk(tree):
            attr = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                attr = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                attr = node.args[1].value
            if attr and attr not in defined and (name, attr) not in LIBRARY_PRIVATE_ALLOWED:
                bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {attr}")
    return bad


def test_no_library_private_attributes():
    bad = library_private_uses(MODULES)
    assert not bad, "private attributes of other libraries read in src/ (use their public API):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "planted",
    [
        "x = model._pos_embed(tokens)",
        "n = sampler._num_samples",
        "same = mha._qkv_same_embed_dim",
        "hooks = getattr(module, '_forward_hooks')",
        "import torch as t\nv = t.nn.modules.batchnorm._BatchNorm",
    ],
)
def test_the_library_private_rule_catches_a_planted_use(planted, monkeypatch):
    monkeypatch.setitem(MODULES, "vpeft.planted", (SRC / "planted.py", ast.parse(planted)))
    assert library_private_uses(MODULES), planted


MAX_BODY_LINES = 60
"""The longest function body (signature and docstring excluded) allowed in src/: longer ones are split into
pieces with names of their own."""


def long_functions(modules, limit: int = MAX_BODY_LINES) -> list[str]:
    """``path:line: name (N lines)`` of every function whose body, docstring excluded, spans over ``limit`` lines."""
    bad = []
    for path, tree in modules.values():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            if body and (n := body[-1].end_lineno - body[0].lineno + 1) > limit:
                bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.name} ({n} lines)")
    return bad


def test_no_function_body_over_the_limit():
    bad = long_functions(MODULES)
    assert not bad, f"functions over {MAX_BODY_LINES} lines (split them into named pieces):\n" + "\n".join(bad)


def test_the_long_function_rule_catches_a_planted_one(monkeypatch):
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES + 1))
    planted = f'def planted():\n    """Doc."""\n{long_body}\n'
    monkeypatch.setitem(MODULES, "vpeft.planted", (SRC / "planted.py", ast.parse(planted)))
    assert long_functions(MODULES) == ["vpeft/planted.py:1: planted (61 lines)"]
    exactly = 'def planted():\n    """Doc."""\n' + "\n".join(f"    x{i} = {i}" for i in range(MAX_BODY_LINES)) + "\n"
    monkeypatch.setitem(MODULES, "vpeft.planted", (SRC / "planted.py", ast.parse(exactly)))
    assert long_functions(MODULES) == []
