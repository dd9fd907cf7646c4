"""fxopt.save / fxopt.load: any compiled model as a folder, loaded with no pickle and no user class.

    fxopt.save(cm, "model.fxopt")          # graph.json + weights.safetensors + manifest.json
    cm = fxopt.load("model.fxopt")         # a CompiledModel, lowered again with its backend

The folder is one unit: written complete under a temporary name with a manifest of
its files (sizes, sha256), then switched in by one rename; `load` checks the manifest
before it reads anything else. The graph is data (see graph_format), the weights are
safetensors, so loading runs no code from the folder. The model runs at any size
along the dynamic dims it was traced with, like the model that was saved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from .api import CompiledModel, graph_module_of, traced_inputs
from .backends import get_backend
from .errors import FxoptError, UnsupportedError
from .files import folder_atomically
from .graph_format import graph_from_json, graph_to_json
from .ir.meta import INPUT_SHAPES, TENSOR
from .ir.shape_prop import propagate_shapes
from .pm.report import PassRecord, Report

__all__ = ["load", "save"]

FORMAT = "fxopt.saved/1"
MANIFEST, GRAPH, WEIGHTS = "manifest.json", "graph.json", "weights.safetensors"


def save(compiled, path) -> str:
    """Write `compiled` (a CompiledModel, or a GraphModule fxopt made) to the folder `path`.

    `path` must be new, empty, or an earlier fxopt.save folder (which is replaced whole).
    Backends other than eager and int8 are lowered again from the saved graph on load;
    their options must be plain values (numbers, strings, lists)."""
    gm = graph_module_of(compiled, "fxopt.save")
    backend = getattr(compiled, "backend", "eager")
    options = dict(getattr(compiled, "backend_options", {}))
    check_destination(path)
    document, tensors = graph_to_json(gm)
    document["backend"] = {"name": backend, "options": _plain_options(options, backend)}
    report = getattr(compiled, "report", None)
    document["report"] = report.to_dict() if isinstance(report, Report) else None
    with folder_atomically(path) as tmp:
        _write_json(os.path.join(tmp, GRAPH), document)
        _save_tensors(tensors, os.path.join(tmp, WEIGHTS))
        _write_json(os.path.join(tmp, MANIFEST), {"format": FORMAT, "files": {
            name: _describe_file(os.path.join(tmp, name)) for name in (GRAPH, WEIGHTS)}})
    return os.fspath(path)


def load(path) -> CompiledModel:
    """The CompiledModel saved at `path`; its manifest is checked before anything is read."""
    files = check_manifest(path, FORMAT)
    from safetensors.torch import load_file

    with open(files[GRAPH], encoding="utf-8") as fh:
        document = json.load(fh)
    gm = graph_from_json(document, load_file(files[WEIGHTS]))
    for node, info in zip(gm.graph.find_nodes(op="placeholder"), gm.meta.get(INPUT_SHAPES, ())):
        node.meta[TENSOR] = info
        if info is None:
            node.meta["val"] = None
    propagate_shapes(gm)
    backend = document.get("backend") or {"name": "eager", "options": {}}
    lowered = get_backend(backend["name"]).lower(gm, traced_inputs(gm), **backend["options"])
    report = _report(document.get("report"), lowered)
    return CompiledModel(gm, lowered, report, (backend["name"], backend["options"]))


def check_manifest(path, kind: str) -> dict[str, str]:
    """{file name: path} of a folder whose manifest is of format `kind` and whose files all
    match it (names inside the folder, sizes and sha256); else a clear FxoptError."""
    folder = os.fspath(path)
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FxoptError(f"{folder!r} holds no {MANIFEST}: it is not a folder fxopt wrote, or it is incomplete",
                         hint="give the folder that fxopt.save wrote")
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise FxoptError(f"{manifest_path!r} cannot be read: {exc}", hint="save the model again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        raise FxoptError(f"{folder!r} is not a {kind} folder (its manifest says "
                         f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r})",
                         hint="load it with the function that matches how it was written")
    listed = dict(manifest.get("files", {}))
    for name in listed:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise FxoptError(f"{manifest_path!r} names a file outside its folder: {name!r}",
                             hint="the folder was tampered with; save the model again")
    files = {}
    for name, expected in listed.items():
        full = os.path.join(folder, name)
        if not os.path.isfile(full) or _describe_file(full) != expected:
            raise FxoptError(f"{full!r} does not match the manifest (missing, truncated or changed)",
                             hint="the folder is damaged or was edited; save the model again")
        files[name] = full
    return files


def check_destination(path) -> None:
    """Before any work: `path` is new, empty, or an earlier save (never another folder's files)."""
    folder = os.fspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FxoptError(f"cannot save to {folder!r}: it is a file", hint="give a folder path")
    if os.path.isdir(folder) and os.listdir(folder):
        try:
            check_manifest(folder, FORMAT)
        except FxoptError:
            raise FxoptError(f"cannot save to {folder!r}: it holds files that fxopt.save did not write",
                             hint="give a new or empty folder (nothing there is deleted)") from None
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise FxoptError(f"cannot save to {folder!r}: {parent!r} is not writable",
                         hint="give a folder in a writable place")


def _plain_options(options: dict, backend: str) -> dict:
    try:
        json.dumps(options)
    except TypeError as exc:
        raise UnsupportedError(f"cannot save the options of backend '{backend}': {exc}",
                               hint="save a model lowered with plain options, or lower it after loading") from exc
    return options


def _save_tensors(tensors: dict, path: str) -> None:
    """safetensors, each storage written once per name (tied weights become copies)."""
    from safetensors.torch import save_file

    seen, plain = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        plain[name] = t.clone() if key in seen or t.untyped_storage().nbytes() != t.nbytes else t
        seen.add(key)
    save_file(plain, path)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _describe_file(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _report(data, lowered) -> Report:
    """The saved report: its pass records, and its sections as plain data."""
    if not data:
        return Report()
    fields = {f.name for f in dataclasses.fields(PassRecord)} - {"preserves"}
    records = [PassRecord(**{k: (tuple(v) if k == "notes" else v) for k, v in r.items() if k in fields})
               for r in data.get("passes", [])]
    sections = dict(data.get("sections", {}))
    sections.update(getattr(lowered, "report_sections", None) or {})
    return Report(pipeline=data.get("pipeline", ""), records=records, sections=sections)
