"""Compile StableHLO text with XLA and run it: jax's PJRT client, no jax.jit.

The client comes from `jax.extend.backend.get_backend(platform)` and compiles with
`client.compile_and_load(text, devices, jax.extend.backend.get_compile_options(...))`:
`jax.extend` is jax's API for libraries built on its runtime, and this is the path
jax itself takes after lowering a jitted function, minus the lowering. (jax.jit
cannot take foreign StableHLO; `jax.export` wants its own serialized format.)

64-bit types: torch uses int64 for token ids and `num_batches_tracked`, and the
program keeps the exact types torch-mlir gave it. jax's x64 mode is what lets
int64 / float64 buffers be created and read back; it is switched on with the
scoped `jax.enable_x64(True)` around uploads and calls of such programs only, so
a user's own jax code in the same process keeps its setting. (Casting to 32 bits
instead would change the function's signature and wrap ids above 2**31.)
"""
from __future__ import annotations

import contextlib
import typing
from typing import Literal

import torch

from ...errors import InputShapeError, UnsupportedError
from .stablehlo import Program, Structure, dtype_name, to_numpy, to_torch

Device = Literal["cpu", "tpu"]
DEVICES = typing.get_args(Device)


def xla_client(device: str | None):
    """The PJRT client for `device` (None: cpu) and the device programs run on."""
    from jax.extend.backend import get_backend

    platform = "cpu" if device is None else device
    if platform not in DEVICES:
        raise UnsupportedError(f"backend 'xla': unknown device {device!r}",
                               hint=f"pass device= one of {', '.join(DEVICES)} (or leave it out: cpu)")
    try:
        client = get_backend(platform)
    except RuntimeError as exc:
        raise UnsupportedError(f"backend 'xla': jax has no {platform} client here ({exc})",
                               hint="on a TPU host install jax[tpu]; elsewhere use device='cpu'") from None
    return client, client.local_devices()[0]


def compile_text(client, device, text: str):
    """An executable of the StableHLO `text` for one device."""
    from jax.extend.backend import get_compile_options

    options = get_compile_options(num_replicas=1, num_partitions=1)
    try:
        return client.compile_and_load(text, [device], options)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"backend 'xla': XLA did not compile the StableHLO program: {first}",
                               hint="export it with export_dir=... and inspect model.stablehlo.mlir; "
                                    "run the graph with backend='eager' meanwhile") from exc


def x64_scope(enabled: bool):
    """jax's x64 mode for the duration (scoped: the global setting is left alone)."""
    if not enabled:
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


class XlaModule(torch.nn.Module):
    """The compiled program as an nn.Module: torch tensors in, torch tensors out, in
    the model's output structure. The weights are uploaded to the device once, when
    the module is built (later changes to the graph's weights are not seen); each
    call uploads the inputs and copies the outputs back to CPU torch tensors.
    Inference only: no autograd through the program."""

    def __init__(self, program: Program, device: str | None = None):
        super().__init__()
        self.program = program
        self.device_name = "cpu" if device is None else device
        self._client, self._device = xla_client(device)
        self._executable = compile_text(self._client, self._device, program.text)
        self._weights = self._upload_weights(program.weights)

    def _upload_weights(self, weights: list[torch.Tensor]) -> list:
        """Device arrays of the weights; a tensor several names share is uploaded once."""
        import jax

        uploaded: dict[int, object] = {}
        with x64_scope(self.program.x64):
            for w in weights:
                if id(w) not in uploaded:
                    uploaded[id(w)] = jax.device_put(to_numpy(w), self._device)
        return [uploaded[id(w)] for w in weights]

    def forward(self, *args):
        import jax

        flat, structure = Structure.of(tuple(args))
        self._check(flat, structure)
        with x64_scope(self.program.x64):
            inputs = [jax.device_put(to_numpy(t), self._device) for t in flat]
            results = self._executable.execute_sharded(self._weights + inputs)
            arrays = [per_device[0] for per_device in results.disassemble_into_single_device_arrays()]
            outputs = [to_torch(a) for a in arrays]
        return self.program.out_structure.rebuild(outputs)

    def _check(self, flat: list, structure: Structure) -> None:
        expected, compiled = self.program.inputs, self.program.in_structure
        if structure != compiled or len(flat) != len(expected):
            raise InputShapeError(f"backend 'xla': called with inputs structured as {structure.spec} "
                                  f"(None at {list(structure.nones)}), compiled for {compiled.spec} "
                                  f"(None at {list(compiled.nones)})",
                                  hint="call with inputs like the example inputs (same nesting, None where None was)")
        for i, (t, (shape, dtype)) in enumerate(zip(flat, expected)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{dtype_name(t.dtype)}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputShapeError(
                    f"backend 'xla': input {i} ({self.program.input_names[i]}) is {got}, "
                    f"compiled for {dtype_name(dtype)}{list(shape)}",
                    hint="XLA programs have static shapes: this one was built for the shape above")
