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
import json
import os

from ..util import artefacts
from ..util.artefacts import writing
from ..backends import get_backend
from ..backends.compiled import CompiledModel
from ..errors import UnsupportedError
from ..ir.cow import cow_tensor, storage_key
from ..ir.graph import graph_module_of
from ..ir.inputs import traced_inputs
from ..ir.meta import INPUT_SHAPES, TENSOR
from ..ir.shape_prop import propagate_shapes
from ..pm.report import PassRecord, Report
from .graph_format import graph_from_json, graph_to_json

__all__ = ["load", "save"]

FORMAT = "fxopt.saved/1"
GRAPH, WEIGHTS = "graph.json", "weights.safetensors"


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
    with writing(path, FORMAT) as tmp:
        _write_json(os.path.join(tmp, GRAPH), document)
        _save_tensors(tensors, os.path.join(tmp, WEIGHTS))
    return os.fspath(path)


def load(path) -> CompiledModel:
    """The CompiledModel saved at `path`; its manifest is checked before anything is read."""
    files = artefacts.check_manifest(path, FORMAT)
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


def check_destination(path) -> str:
    """Before any work: `path` is new, empty, or an earlier save (never another folder's files)."""
    return artefacts.check_destination(path, FORMAT)


def _plain_options(options: dict, backend: str) -> dict:
    try:
        json.dumps(options)
    except TypeError as exc:
        raise UnsupportedError(f"cannot save the options of backend '{backend}': {exc}",
                               hint="save a model lowered with plain options, or lower it after loading") from exc
    return options


def _save_tensors(tensors: dict, path: str) -> None:
    """safetensors, each storage written once per name (tied weights become copies). The
    writer reads tensors through their data pointers, which makes a copy-on-write tensor
    copy itself for good: it is given copy-on-write clones, so the graph's own tensors
    keep sharing memory with the user's model (the clones' copies go with the call)."""
    from safetensors.torch import save_file

    seen, plain = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = storage_key(t)
        plain[name] = t.clone() if key in seen or t.untyped_storage().nbytes() != t.nbytes else cow_tensor(t)
        plain[name] = t if plain[name] is None else plain[name]
        seen.add(key)
    save_file(plain, path)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


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
