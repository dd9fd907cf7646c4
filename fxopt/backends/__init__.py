"""Backends: how a rewritten GraphModule becomes something that runs.

A backend is any object with `lower(gm, example_inputs, **options) -> callable`,
`available() -> str | None` (None when usable, else what to install) and `Options`,
a frozen dataclass of its options (`fxopt.pm.Options`: typed, documented, checked at
construction; `Options.from_kwargs(options)` is the first line of `lower`).
`register_backend` adds one under a name; `fxopt backends` lists them. Backends are
imported on first use: the built-ins from `BUILTIN`, a user's package from the
entry-point group `fxopt.backends` (`name = "package.module"`, registering when imported).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Protocol

import torch.fx as fx

from ..errors import BackendOptionError, UnsupportedError
from ..pm.options import Options
from ..quant import quantizers_in
from ..util.plugins import entry_point_modules, import_provider

_BACKENDS: dict[str, "Backend"] = {}
BUILTIN = {
    "eager": "fxopt.backends.eager",
    "fpga-int8": "fxopt.backends.fpga_int8",
    "inductor": "fxopt.backends.inductor",
    "int8": "fxopt.backends.int8",
    "xla": "fxopt.backends.xla",
}
ENTRY_POINTS = "fxopt.backends"


class BackendOptions(Options):
    """Base of a backend's options (a frozen dataclass): refused values raise BackendOptionError."""

    error_class = BackendOptionError


class Backend(Protocol):
    name: str
    Options: type

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options): ...

    def available(self) -> str | None: ...


def register_backend(backend: "Backend") -> "Backend":
    """Add `backend` under `backend.name`; a built-in's name is refused to any other module."""
    module = type(backend).__module__
    if backend.name in BUILTIN and module != BUILTIN[backend.name]:
        raise UnsupportedError(f"backend '{backend.name}' is a built-in backend's name ({BUILTIN[backend.name]})",
                               hint="register yours under another name")
    _BACKENDS[backend.name] = backend
    return backend


def _declared() -> dict[str, str]:
    return {**entry_point_modules(ENTRY_POINTS), **BUILTIN}


def _find(name: str) -> "Backend | None":
    """The backend registered as `name`, its module imported first if it is not yet (the
    installed packages' entry points are read only then: not on every compile)."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    module = _declared().get(name)
    if module is not None:
        import_provider(f"backend '{name}'", module, UnsupportedError)
        if name not in _BACKENDS:
            raise UnsupportedError(f"backend '{name}': importing {module!r} registered no backend of that name",
                                   hint=f"call fxopt.register_backend(...) with name = {name!r} in that module")
    return _BACKENDS.get(name)


def get_backend(name: str) -> "Backend":
    backend = _find(name)
    if backend is None:
        known = sorted(set(_BACKENDS) | set(_declared()))
        near = difflib.get_close_matches(name, known, n=2)
        raise UnsupportedError(f"unknown backend '{name}'",
                               hint=(f"did you mean {' or '.join(map(repr, near))}? " if near else "")
                               + f"known backends: {', '.join(known)}")
    missing = backend.available()
    if missing:
        raise UnsupportedError(f"backend '{name}' is not available here: {missing}")
    return backend


def require_frozen_quantizers(gm: fx.GraphModule, backend: str) -> None:
    """For a backend that lowers fake-quant to integers: the graph must hold fake quantizers,
    every activation one calibrated and frozen (else its scale is not final)."""
    quantizers = quantizers_in(gm)
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
    """Every backend, by name (the built-in and plugin modules imported)."""
    for name in _declared():
        _find(name)
    return dict(sorted(_BACKENDS.items()))


_PACKAGES = {module.rpartition(".")[2] for module in BUILTIN.values()} | {"compiled", "onnx"}


def __getattr__(name: str):
    """`fxopt.backends.int8` and the other backends' modules, imported when first named."""
    if name in _PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
