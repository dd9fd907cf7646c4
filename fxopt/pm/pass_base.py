"""Pass, PassResult and the registry that maps pipeline names to pass classes.

A pass is a frozen dataclass: its fields are its options (typed, defaulted),
so two passes with the same options compare equal and a pipeline can be
printed back to text. `register_pass("name")` gives it its pipeline name.

Passes are found by name and imported on first use: the built-ins from the table
`fxopt.passes` declares (`declare_passes`), a user's package from the entry-point group
`fxopt.passes` (`name = "package.module"`, the module registering the pass when imported),
so `import fxopt` imports no pass and a plugin needs no import by its user.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch.fx as fx

from ..errors import FxoptError
from ..util.plugins import entry_point_modules, import_provider
from .options import Options
from .analysis import AnalysisManager

_REGISTRY: dict[str, type["Pass"]] = {}
_DECLARED: dict[str, str] = {}        # pass name -> the module that registers it
ENTRY_POINTS = "fxopt.passes"        # the group a plugin package lists its passes in


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
    `needs_original` is True for a pass that compares the graph with what it computed
    before the pipeline's first lossy pass (a distillation teacher): the pass manager
    then keeps a copy of the graph then, as `am.run.original`.
    """

    name: ClassVar[str] = ""
    tolerance: ClassVar[float | None] = 1e-4
    sees_into_leaves: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = True   # False: needs only the graph and shapes (meta weights do)
    needs_original: ClassVar[bool] = False  # True: am.run.original holds the graph before the first lossy pass

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> "PassResult":
        raise NotImplementedError(f"{type(self).__name__}.run")

    @classmethod
    def owner(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def key_of(cls, field: str) -> str:
        return field.replace("_", "-")


_RESERVED = {attr for attr in dir(Pass) if not attr.startswith("_")}   # an option field would hide these


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
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__ or \
                name in _DECLARED and cls.__module__ != _DECLARED[name]:
            taken = _REGISTRY[name].__qualname__ if name in _REGISTRY else _DECLARED[name]
            raise FxoptError(f"a pass named '{name}' is already registered ({taken})",
                             hint="choose another name")
        hidden = [f.name for f in dataclasses.fields(cls) if f.name in _RESERVED] if dataclasses.is_dataclass(cls) else []
        if hidden:
            raise FxoptError(f"pass '{name}' ({cls.__qualname__}) has an option field called '{hidden[0]}', "
                             "which would hide the Pass attribute of that name",
                             hint=f"rename the option (e.g. '{hidden[0]}_value'); reserved: {', '.join(sorted(_RESERVED))}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def declare_passes(table: dict[str, str]) -> None:
    """Declare pass names and the modules that register them, imported when a name is used."""
    _DECLARED.update(table)


def get_pass(name: str) -> type[Pass] | None:
    """The pass class registered under `name` (its module imported if need be), or None."""
    if name not in _REGISTRY:
        module = _DECLARED.get(name) or entry_point_modules(ENTRY_POINTS).get(name)
        if module is not None:
            _import(name, module)
    return _REGISTRY.get(name)


def pass_names() -> list[str]:
    """Every pass name known, without importing any pass."""
    return sorted(set(_REGISTRY) | set(_DECLARED) | set(entry_point_modules(ENTRY_POINTS)))


def list_passes() -> dict[str, type[Pass]]:
    """Every pass, by pipeline name (the declared and plugin modules imported)."""
    for name in pass_names():
        get_pass(name)
    return dict(sorted(_REGISTRY.items()))


def _import(name: str, module: str) -> None:
    import_provider(f"pass '{name}'", module, FxoptError)
    if name not in _REGISTRY:
        raise FxoptError(f"pass '{name}': importing {module!r} registered no pass of that name",
                         hint=f"decorate the pass class with @fxopt.register_pass({name!r})")
