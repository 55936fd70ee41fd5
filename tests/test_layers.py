"""The package's import graph runs one way: data → models → optim → train → results →
(experiments | analysis) → cli.

Every import statement of every module is read with `ast` (those inside functions too), so a lazy
import cannot hide an arrow running back up; nothing below `flatmin.cli` imports it (nor argparse),
no module imports a command module but the dispatcher, and there is no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flatmin
from flatmin.cli import COMMANDS

ROOT = Path(flatmin.__file__).parent
# layer -> the layers it may import from (itself included)
BELOW = {
    "base": {"base"},
    "data": {"base", "data"},
    "models": {"base", "data", "models"},
    "optim": {"base", "data", "models", "optim"},
    "train": {"base", "data", "models", "optim", "train"},
    "integrations": {"base", "data", "models", "optim", "train", "integrations"},
    "results": {"base", "data", "models", "optim", "train", "results"},
    "experiments": {"base", "data", "models", "optim", "train", "results", "experiments"},
    "analysis": {"base", "data", "models", "optim", "train", "results", "analysis"},
    "api": {"base", "optim", "api"},
}
BELOW["cli"] = set(BELOW) | {"cli"}
# The dispatcher, the one importer of command modules (lazily, by name, from COMMANDS).
DISPATCHER = {"flatmin.cli", "flatmin.__main__"}
COMMAND_MODULES = {mod for mod, _ in COMMANDS.values()}
# Optional dependencies that must stay lazy (imported inside the function that needs them).
LAZY_OK = {"matplotlib", "lightning", "ray", "transformers", "tensorboard", "yaml", "tomllib", "tomli",
           "mnist1d", "sklearn", "scipy", "PIL"}
# Parts of torch that cost seconds to import or need an extra: loaded only on the paths that use them
# (TensorBoard; FSDP and DTensor, whose import would slow every `flatmin` start by ~2 s).
HEAVY_TORCH = ("torch.utils.tensorboard", "torch.distributed.tensor", "torch.distributed.fsdp",
               "torch.distributed.device_mesh")
# (module, import) lazy on purpose: the Ray backend module imports Ray itself at its top.
LAZY_PENDING = {("flatmin.experiments.backends", "flatmin.experiments.backends.ray")}


def module_name(path: Path) -> str:
    """flatmin/train/loop.py -> flatmin.train.loop; a package's __init__ is the package."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> str:
    """Which layer a module belongs to."""
    parts = mod.split(".")
    if mod in DISPATCHER:
        return "cli"
    if mod == "flatmin":
        return "api"
    if len(parts) > 2 or (parts[1] in BELOW and (ROOT / parts[1]).is_dir()):
        return parts[1]
    return "base"  # errors, checks, _version


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at top level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try)
                                        for c in n.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` is an arrow to the submodule
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                out.append((target, node.lineno, id(node) in top))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Arrows between flatmin modules, and the lazy imports that break the top-of-file rule."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy = []
    for f in files:
        me = module_name(f)
        for target, line, at_top in imports(f, modules):
            if target.split(".")[0] == "flatmin":
                edges[me].add(target if target in modules else target.rpartition(".")[0])
            root = target.split(".")[0]
            optional = root in LAZY_OK or target.startswith(HEAVY_TORCH)
            if not at_top and not optional and (me, target) not in LAZY_PENDING:
                lazy.append(f"{me}:{line} imports {target} inside a function")
    return edges, lazy


def back_arrows(edges: dict[str, set[str]]) -> list[str]:
    """Arrows from a layer to one it may not import, and arrows into a command module."""
    bad = [f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, bs in edges.items() for b in bs
           if layer(b) not in BELOW[layer(a)]]
    bad += [f"{a} -> {b}: only the dispatcher imports a command module" for a, bs in edges.items()
            for b in bs if b in COMMAND_MODULES and a not in DISPATCHER]
    return sorted(bad)


def imported_roots() -> dict[str, set[str]]:
    """Every module's imported top-level packages (flatmin's and others')."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): {t.split(".")[0] for t, _, _ in imports(f, modules)} for f in files}


def argparse_users(roots: dict[str, set[str]]) -> list[str]:
    """Modules outside `flatmin.cli` that import argparse (`flatmin.checks` lends its rules to it)."""
    return sorted(m for m, r in roots.items()
                  if "argparse" in r and layer(m) != "cli" and m != "flatmin.checks")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a self-arrow)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layers_run_one_way():
    edges, _ = graph()
    assert back_arrows(edges) == []


def test_no_import_circle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_imports_sit_at_the_top_of_files():
    _, lazy = graph()
    assert lazy == []


def test_every_command_module_is_a_cli_leaf():
    """The dispatcher's commands exist, one module each in `flatmin.cli`, and nothing imports them."""
    edges, _ = graph()
    assert COMMAND_MODULES <= set(edges) and all(layer(m) == "cli" for m in COMMAND_MODULES)
    assert len(COMMAND_MODULES) == len(COMMANDS)
    assert not [a for a, bs in edges.items() for b in bs if b in COMMAND_MODULES]


def test_the_libraries_take_plain_arguments():
    """argparse lives in `flatmin.cli` alone: library functions take values, not a Namespace."""
    assert argparse_users(imported_roots()) == []


@pytest.mark.parametrize("extra, expect", [
    ({"flatmin.optim.rules.amp": {"flatmin.train.loop"}},
     "optim.rules.amp (optim) -> flatmin.train.loop (train)"),
    ({"flatmin.analysis.radius": {"flatmin.experiments.tables"}}, "(analysis) -> flatmin.experiments.tables"),
    ({"flatmin.results.store": {"flatmin.experiments.runner"}}, "(results) -> flatmin.experiments.runner"),
    ({"flatmin.train.loop": {"flatmin.results.store"}}, "(train) -> flatmin.results.store (results)"),
    ({"flatmin.experiments.grid": {"flatmin.cli.options"}}, "(experiments) -> flatmin.cli.options (cli)"),
    ({"flatmin.cli.compare": {"flatmin.cli.train"}}, "only the dispatcher imports a command module"),
])
def test_checker_sees_a_back_arrow(extra, expect):
    """The checks can fail: an arrow added against the rules is reported."""
    edges, _ = graph()
    for a, bs in extra.items():
        edges[a] = edges[a] | bs
    assert any(expect in line for line in back_arrows(edges))


def test_checker_sees_a_circle():
    edges, _ = graph()
    edges["flatmin.train.config"] = edges["flatmin.train.config"] | {"flatmin.train.loop"}
    assert any("flatmin.train.loop" in c and "flatmin.train.config" in c for c in cycles(edges))


def test_checker_sees_argparse_in_a_library():
    """The argparse check can fail: a library module that imports it is named."""
    roots = imported_roots()
    roots["flatmin.analysis.radius"].add("argparse")
    assert argparse_users(roots) == ["flatmin.analysis.radius"]
