"""The import graph of fxopt: no cycle between modules, and every import goes down the layers.

Layers, bottom to top (DESIGN.md, "Imports flow one way"): errors; util; ir; quant; pm;
analyses; train (the training loop, which a pass that trains uses, e.g. distill); passes and
backends (side by side: a backend never imports a pass, nor a pass a backend); runtime; api;
the root package that re-exports the public API. Every `import` statement counts, also one
inside a function (a deferred import is still a dependency); only `if TYPE_CHECKING:` blocks
are skipped. The one sanctioned upward import: the command line (api.cli, api.cli_pipeline) is a client of the
public API, so it may import the root package, as benchmarks/ do.
"""
from __future__ import annotations

import ast
import os

import networkx as nx

import fxopt

ROOT = os.path.dirname(fxopt.__file__)
RANKS = {"errors": 0, "util": 1, "ir": 2, "quant": 3, "pm": 4, "analyses": 5, "train": 6, "passes": 7,
         "backends": 7, "runtime": 8, "api": 9, "": 10}
CLIENTS_OF_THE_PUBLIC_API = {"fxopt.api.cli", "fxopt.api.cli_compress", "fxopt.api.cli_pipeline"}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules: dict) -> set[str]:
    """The fxopt modules `module` imports (a `from pkg import sub` names the submodule)."""
    tree = ast.parse(open(path).read())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= subs
            if len(subs) < len(node.names) and target in modules:
                found.add(target)
    return found - {module}


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        graph.add_edges_from((module, target) for target in _imports(module, path, modules))
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    assert sorted({_layer(m) for m in _graph()} - set(RANKS)) == []


def test_no_import_cycle_between_modules():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert cycles == []


def test_imports_go_down_the_layers():
    upward = []
    for module, target in _graph().edges:
        low, high = _layer(target), _layer(module)
        if low == high or (module in CLIENTS_OF_THE_PUBLIC_API and target == "fxopt"):
            continue
        if RANKS[low] >= RANKS[high]:
            upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_scan_sees_every_kind_of_import():
    """The check is not vacuous: top-level, `from pkg import submodule` and deferred imports
    (the CLI imports its pipeline command inside a function) are all edges."""
    graph = _graph()
    assert graph.has_edge("fxopt.api.compiler", "fxopt.ir.trace")
    assert graph.has_edge("fxopt.api.saving", "fxopt.util.artefacts")        # from ..util import artefacts
    assert graph.has_edge("fxopt.api.cli", "fxopt.api.cli_pipeline")         # inside cmd_pipeline_run
    assert "    from .cli_pipeline import" in open(_modules()["fxopt.api.cli"]).read()


def test_import_fxopt_imports_no_pass_backend_or_optional_dependency():
    """Passes and backends are imported on first use, by name."""
    import subprocess
    import sys

    code = ("import sys, fxopt; mods = sys.modules; "
            "print(sorted(m for m in mods if m.startswith(('fxopt.backends.', 'fxopt.passes.', 'jax', "
            "'torch_mlir', 'onnx')) and m not in ('fxopt.backends.compiled', 'onnxscript')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    names = subprocess.run([sys.executable, "-c", "import fxopt; print(fxopt.save_pruned.__module__, "
                            "fxopt.backends.int8.__name__)"], capture_output=True, text=True, check=True).stdout
    assert names.split() == ["fxopt.passes.prune_channels.persist", "fxopt.backends.int8"]
