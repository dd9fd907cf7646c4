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


def list_backends() -> dict[str, "Backend"]:
    return dict(sorted(_BACKENDS.items()))


from . import eager  # noqa: E402,F401  (registers the built-in backends)
from . import int8  # noqa: E402,F401
from . import inductor  # noqa: E402,F401
from . import xla  # noqa: E402,F401
from . import fpga_int8  # noqa: E402,F401
