"""An AOTInductor package of the lowered graph: the PyTorch way to ship a compiled model.

    cm = fxopt.compile(model, x, pipeline="prune50", backend="inductor", package_path="model.pt2")
    runner = torch._inductor.aoti_load_package("model.pt2")   # no fxopt needed
    y = runner(x)                                              # any batch along the dynamic dims

The graph (after the backend's own rewrites) is exported with torch.export, its dynamic
dims as traced, and compiled ahead of time by `torch._inductor.aoti_compile_and_package`.
The package is written under a temporary name and renamed into place; an existing file
is replaced only when it is itself an AOTInductor package.
"""
from __future__ import annotations

import os
import tempfile
import zipfile

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.inputs import resized_inputs
from ...ir.meta import INPUT_SHAPES, TensorInfo


def check_package_path(path) -> str:
    """Before any work: a `.pt2` path that is new or an earlier AOTInductor package."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise UnsupportedError(f"backend 'inductor': package_path must end in .pt2, got {path!r}",
                               hint="e.g. package_path='model.pt2'")
    if os.path.exists(path) and not is_package(path):
        raise UnsupportedError(f"backend 'inductor': {path!r} exists and is not an AOTInductor package",
                               hint="give a new path; fxopt never overwrites a file it did not write")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        raise UnsupportedError(f"backend 'inductor': cannot write {path!r} (folder not writable)",
                               hint="give a path in a writable folder")
    return path


def is_package(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/data/aotinductor/" in name for name in archive.namelist())


def write_package(graph: fx.GraphModule, example_inputs: tuple, path: str) -> str:
    """Export `graph` with its dynamic dims and write the AOTInductor package to `path`."""
    spec = _dynamic_spec(graph, example_inputs)
    # one row more along the dynamic dims: export would fix a dim of size 1 to 1
    inputs = (resized_inputs(graph, tuple(example_inputs), {}) if spec else None) or tuple(example_inputs)
    try:
        program = torch.export.export(graph, inputs, dynamic_shapes=spec, strict=False)
    except Exception as exc:  # noqa: BLE001 - export's message is long; say what failed
        raise UnsupportedError(f"backend 'inductor': the graph could not be exported for packaging: "
                               f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
                               hint="compile without package_path, or with backend='eager' to check "
                                    "the graph") from exc
    _check_dynamic_kept(program, spec)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".pt2", dir=folder)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_dynamic_kept(program, spec) -> None:
    """The package must vary where the graph does: AOTInductor's runner does not check the
    sizes it is given, so a dim export fixed would be silently wrong at other sizes."""
    if not spec:
        return
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"][-len(spec):]
    for node, dims in zip(placeholders, spec):
        shape = getattr(node.meta.get("val"), "shape", ())
        fixed = [d for d in (dims or {}) if d < len(shape) and not isinstance(shape[d], torch.SymInt)]
        if fixed:
            raise UnsupportedError(
                f"backend 'inductor': exporting the package fixed dim(s) {fixed} of input '{node.name}', "
                "which the compiled graph lets vary; the package would be wrong at other sizes",
                hint="compile with dynamic_shapes='static' to package one fixed shape")


def _dynamic_spec(graph: fx.GraphModule, example_inputs: tuple):
    infos = graph.meta.get(INPUT_SHAPES) or ()
    if len(infos) != len(example_inputs):
        return None
    spec = tuple({d: torch.export.Dim.AUTO for d in info.dynamic} or None
                 if isinstance(info, TensorInfo) else None for info in infos)
    return spec if any(spec) else None
