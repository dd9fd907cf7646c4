"""Backends: how a rewritten GraphModule becomes something that runs.

A backend is any object with `lower(gm, example_inputs, **options) -> callable`
and `available() -> str | None` (None when usable, else what to install).
`register_backend` adds one under a name; `fxopt backends` lists them.
"""
from __future__ import annotations

from typing import Protocol

import torch.fx as fx

from ..errors import UnsupportedError

_BACKENDS: dict[str, "Backend"] = {}


class Backend(Protocol):
    name: str

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options): ...

    def available(self) -> str | None: ...


def register_backend(backend: "Backend") -> "Backend":
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> "Backend":
    if name not in _BACKENDS:
        import difflib

        near = difflib.get_close_matches(name, list(_BACKENDS), n=2)
        raise UnsupportedError(f"unknown backend '{name}'",
                               hint=(f"did you mean {' or '.join(map(repr, near))}? " if near else "")
                               + f"known backends: {', '.join(sorted(_BACKENDS))}")
    backend = _BACKENDS[name]
    missing = backend.available()
    if missing:
        raise UnsupportedError(f"backend '{name}' is not available here: {missing}")
    return backend


def require_frozen_quantizers(gm: fx.GraphModule, backend: str) -> None:
    """For a backend that lowers fake-quant to integers: the graph must hold fake quantizers,
    every activation one calibrated and frozen (else its scale is not final)."""
    from ..quant import FakeQuantize

    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    if not quantizers:
        raise UnsupportedError(
            f"backend '{backend}' found no fake quantizers in the graph: there is nothing to lower to integers",
            hint="add fake-quant to the pipeline and calibrate, e.g. fxopt.compile(model, x, "
                 f"pipeline='fold-bn,fake-quant', backend='{backend}', calibration=batches)")
    observing = [m.label or "(unnamed)" for m in quantizers if m.role == "activation" and m.observing]
    if observing:
        raise UnsupportedError(
            f"backend '{backend}': {len(observing)} activation quantizers are not frozen "
            f"(e.g. {', '.join(observing[:3])}), so their scales are not final",
            hint="run fxopt.calibrate(compiled, batches) then fxopt.freeze(compiled) before "
                 f"fxopt.lower(compiled, backend='{backend}'), or compile with calibration=batches")


def list_backends() -> dict[str, "Backend"]:
    return dict(sorted(_BACKENDS.items()))


from . import eager  # noqa: E402,F401  (registers the built-in backends)
from . import int8  # noqa: E402,F401
from . import inductor  # noqa: E402,F401
from . import xla  # noqa: E402,F401
from . import fpga_int8  # noqa: E402,F401
