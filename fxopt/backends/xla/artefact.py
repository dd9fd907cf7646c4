"""The xla artefact: a folder that runs without torch or fxopt.

    model.stablehlo.mlir   the program, `main(*weights, *inputs) -> outputs`
    weights.safetensors    the weight arguments, by attribute path
    signature.json         argument order (weights, then inputs) with shapes and
                           dtypes, the outputs, the pytree specs, the x64 flag
    run_stablehlo.py       loads the three, compiles with jax, runs on .npy inputs

    manifest.json          every file's size and sha256 (fxopt.util.artefacts), which the
                           script checks before it reads anything

The folder is one unit (fxopt.util.artefacts): staged beside the target and switched in by
one rename, so a failure never leaves half an artefact. An existing folder is replaced
only when it is empty or an earlier artefact: anything else is the user's.
"""
from __future__ import annotations

import json
import os

from torch.utils._pytree import treespec_dumps

from ...errors import UnsupportedError
from ...util.artefacts import check_destination, writing
from .script import script_text
from .stablehlo import FUNCTION, Program, dtype_name

FORMAT = "fxopt.stablehlo.v1"
FILES = ("model.stablehlo.mlir", "weights.safetensors", "signature.json", "run_stablehlo.py")


def check_export_dir(export_dir) -> str:
    """`export_dir` as a str path, if it can hold an artefact (new, empty, or an earlier
    artefact, in a writable place); else a clear error, before any work."""
    if not isinstance(export_dir, (str, os.PathLike)):
        raise UnsupportedError(f"backend 'xla': export_dir must be a path, got {type(export_dir).__name__}",
                               hint="e.g. export_dir='artefacts/resnet18'")
    return check_destination(export_dir, FORMAT)


def write_artefact(program: Program, export_dir) -> str:
    """Write the four files into `export_dir` as one artefact with a manifest; returns the path."""
    from safetensors.torch import save_file

    path = check_export_dir(export_dir)
    with writing(path, FORMAT) as tmp:
        _write_text(tmp, "model.stablehlo.mlir", program.text)
        # clones: safetensors refuses shared or non-contiguous storage (tied weights)
        save_file({name: w.detach().cpu().contiguous().clone()
                   for name, w in zip(program.weight_names, program.weights)},
                  os.path.join(tmp, "weights.safetensors"), metadata={"format": FORMAT})
        _write_text(tmp, "signature.json", json.dumps(signature(program), indent=1) + "\n")
        _write_text(tmp, "run_stablehlo.py", script_text(FORMAT))
    return path


def _write_text(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
        fh.write(text)


def signature(program: Program) -> dict:
    """What signature.json holds: the function's contract, JSON-ready."""
    def entry(name, shape, dtype):
        return {"name": name, "shape": list(shape), "dtype": dtype_name(dtype)}

    weights = [entry(n, w.shape, w.dtype) for n, w in zip(program.weight_names, program.weights)]
    inputs = [{**entry(n, s, d), "dynamic_dims": dims} for n, (s, d), dims in
              zip(program.input_names, program.inputs, program.dynamic_dims or [[]] * len(program.inputs))]
    outputs = [entry(f"output{i}", s, d) for i, (s, d) in enumerate(program.outputs)]
    return {
        "format": FORMAT,
        "function": FUNCTION,
        "x64": program.x64,
        "arguments": [w["name"] for w in weights] + [i["name"] for i in inputs],
        "weights": weights,
        "inputs": inputs,
        "shapes": "the program is compiled for the input shapes above; fxopt runs other sizes "
                  "of each input's dynamic_dims by exporting once per shape",
        "outputs": outputs,
        "in_spec": _spec_json(program.in_structure.spec),
        "in_nones": list(program.in_structure.nones),
        "out_spec": _spec_json(program.out_structure.spec),
        "out_nones": list(program.out_structure.nones),
        "out_structure": str(program.out_structure.spec),
    }


def _spec_json(spec) -> str | None:
    """torch's serialized TreeSpec (None for types torch cannot serialize, e.g. a
    Hugging Face ModelOutput: `out_structure` still describes it)."""
    try:
        return treespec_dumps(spec)
    except Exception:  # noqa: BLE001 - an unregistered node type; the text form stays
        return None
