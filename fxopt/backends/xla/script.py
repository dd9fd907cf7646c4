"""The text of `run_stablehlo.py`, the script an xla artefact carries.

It must run where neither torch nor fxopt is installed, so it uses only jax,
numpy and safetensors, and takes everything it needs from the artefact's files.
`$FORMAT` is replaced by the artefact format it reads.
"""
from __future__ import annotations

from string import Template

SCRIPT = Template('''\
#!/usr/bin/env python3
"""Run an fxopt StableHLO artefact with XLA: needs only jax, numpy and safetensors.

    python run_stablehlo.py INPUT.npy [INPUT.npy ...] [-o OUTDIR] [--platform cpu|tpu]

Reads model.stablehlo.mlir, weights.safetensors and signature.json from the folder
of this script (or --artefact DIR), compiles the program with jax's PJRT client,
runs it on the inputs (one .npy per input, in the order of signature.json's
"inputs") and writes output0.npy, output1.npy, ... to OUTDIR (default: the current
folder). From Python: `outputs = run(folder, [array, ...])`.
"""
import argparse
import json
import os
import sys

import numpy as np

FORMAT = "$FORMAT"


FILES = ("model.stablehlo.mlir", "weights.safetensors", "signature.json")


def check_files(folder):
    """Every file the script reads is whole and unchanged: as manifest.json lists it."""
    import hashlib

    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{folder}: no readable manifest.json ({exc}): not a complete artefact")
    listed = manifest.get("files", {}) if manifest.get("format") == FORMAT else {}
    for name in FILES:
        if name not in listed:
            raise SystemExit(f"{folder}: manifest.json does not list {name} as a {FORMAT} file")
        digest = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if {"size": os.path.getsize(os.path.join(folder, name)), "sha256": digest.hexdigest()} != listed[name]:
            raise SystemExit(f"{folder}: {name} does not match manifest.json (damaged or edited)")


def load(folder):
    """(StableHLO text, signature dict, weight arrays in argument order), after checking the
    files against the manifest and every weight's name, dtype and shape against the signature."""
    from safetensors.numpy import load_file

    check_files(folder)
    with open(os.path.join(folder, "signature.json"), encoding="utf-8") as fh:
        signature = json.load(fh)
    if signature.get("format") != FORMAT:
        raise SystemExit(f"{folder}: signature.json is format {signature.get('format')!r}, "
                         f"this script reads {FORMAT!r}")
    with open(os.path.join(folder, "model.stablehlo.mlir"), encoding="utf-8") as fh:
        text = fh.read()
    tensors = load_file(os.path.join(folder, "weights.safetensors"))
    names = [w["name"] for w in signature["weights"]]
    if sorted(tensors) != sorted(names):
        raise SystemExit(f"{folder}: weights.safetensors holds {sorted(tensors)}, signature.json "
                         f"names {sorted(names)}")
    for spec in signature["weights"]:
        array = tensors[spec["name"]]
        if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
            raise SystemExit(f"{folder}: weight {spec['name']} is {array.dtype.name}{list(array.shape)}, "
                             f"signature.json says {spec['dtype']}{spec['shape']}")
    return text, signature, [tensors[name] for name in names]


def check_inputs(signature, inputs):
    expected = signature["inputs"]
    if len(inputs) != len(expected):
        raise SystemExit(f"{len(inputs)} inputs given, the program takes {len(expected)}: "
                         + ", ".join(i["name"] for i in expected))
    for array, spec in zip(inputs, expected):
        if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
            raise SystemExit(f"input {spec['name']}: got {array.dtype.name}{list(array.shape)}, "
                             f"the program takes {spec['dtype']}{spec['shape']}")


def run(folder, inputs, platform="cpu"):
    """The outputs (numpy arrays) of the artefact in `folder` on `inputs`."""
    import jax
    from jax.extend.backend import get_backend, get_compile_options

    text, signature, weights = load(folder)
    inputs = [np.asarray(a) for a in inputs]
    check_inputs(signature, inputs)
    if signature["x64"]:
        jax.config.update("jax_enable_x64", True)  # int64 / float64 arguments or outputs
    client = get_backend(platform)
    device = client.local_devices()[0]
    options = get_compile_options(num_replicas=1, num_partitions=1)
    executable = client.compile_and_load(text, [device], options)
    arguments = [jax.device_put(a, device) for a in weights + inputs]
    results = executable.execute_sharded(arguments)
    return [np.asarray(per_device[0]) for per_device in results.disassemble_into_single_device_arrays()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="one .npy file per input, in signature order")
    parser.add_argument("-o", "--outputs", default=".", help="folder for output0.npy, ...")
    parser.add_argument("--artefact", default=os.path.dirname(os.path.abspath(__file__)),
                        help="the artefact folder (default: this script's)")
    parser.add_argument("--platform", default="cpu", help="jax platform: cpu or tpu")
    args = parser.parse_args(argv)
    outputs = run(args.artefact, [np.load(path, allow_pickle=False) for path in args.inputs], args.platform)
    os.makedirs(args.outputs, exist_ok=True)
    for i, array in enumerate(outputs):
        np.save(os.path.join(args.outputs, f"output{i}.npy"), array)
    print(f"wrote {len(outputs)} outputs to {args.outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
''')


def script_text(format_name: str) -> str:
    return SCRIPT.substitute(FORMAT=format_name)
