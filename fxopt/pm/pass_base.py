"""Pass, PassResult and the registry that maps pipeline names to pass classes.

A pass is a frozen dataclass: its fields are its options (typed, defaulted),
so two passes with the same options compare equal and a pipeline can be
printed back to text. `register_pass("name")` gives it its pipeline name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch.fx as fx

from ..errors import FxoptError
from .options import Options

_REGISTRY: dict[str, type["Pass"]] = {}


class Pass(Options):
    """Base of every pass. Subclasses are `@dataclass(frozen=True)`; their fields are the
    options (pm/options.py: typed, ranged, documented once, checked at construction);
    `validate()` holds the rules that relate two options.

    `tolerance` is how far (absolute, relative to the output scale) outputs may
    move under this pass; None means the pass changes what the model computes
    (pruning, quantization) and the Verify instrument skips its output check.
    `sees_into_leaves` is False for a pass that rewrites the ops of layers: it cannot
    see inside a leaf module (the user's class kept whole by `leaf_modules`), and the
    pass manager's report line for it names the leaves it left alone.
    `reads_weights` is False for a pass that needs only the graph and its shapes: it
    also runs on a model whose weights are on the meta device (no values).
    """

    name: ClassVar[str] = ""
    tolerance: ClassVar[float | None] = 1e-4
    sees_into_leaves: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = True   # False: needs only the graph and shapes (meta weights do)

    def run(self, gm: fx.GraphModule, am) -> "PassResult":
        raise NotImplementedError(f"{type(self).__name__}.run")

    @classmethod
    def owner(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def key_of(cls, field: str) -> str:
        return field.replace("_", "-")


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether it changed the graph, what it preserved, notes for the report.

    `sections` are named report sections (e.g. {"quant": QuantReport}) merged into
    `Report.sections`, so users read them as `report.quant`.
    """

    is_changed: bool
    preserves: tuple = ()
    notes: tuple[str, ...] = field(default=())
    preserves_all: bool = False
    sections: dict = field(default_factory=dict, compare=False)

    @classmethod
    def changed(cls, preserves=(), notes=(), sections=None) -> "PassResult":
        """The graph changed; analyses not in `preserves` are invalidated."""
        return cls(True, tuple(preserves), tuple(notes), sections=dict(sections or {}))

    @classmethod
    def unchanged(cls, notes=(), sections=None) -> "PassResult":
        """Nothing changed: every analysis stays valid."""
        return cls(False, (), tuple(notes), preserves_all=True, sections=dict(sections or {}))


def register_pass(name: str):
    """Class decorator: register a Pass subclass under its pipeline name."""

    def register(cls):
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"register_pass('{name}') decorates a Pass subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise FxoptError(f"a pass named '{name}' is already registered ({_REGISTRY[name].__qualname__})",
                             hint="choose another name")
        if dataclasses.is_dataclass(cls) and any(f.name == "name" for f in dataclasses.fields(cls)):
            raise FxoptError(f"pass '{name}' ({cls.__qualname__}) has an option field called 'name', "
                             "which would hide the pass's pipeline name",
                             hint="rename the option (e.g. 'module_name')")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def list_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by pipeline name (`import fxopt` registers the built-ins)."""
    return dict(sorted(_REGISTRY.items()))
