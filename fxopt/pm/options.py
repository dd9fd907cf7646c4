"""Options declared once, as typed dataclass fields, and checked once, at construction.

A pass's options are its dataclass fields, and so are a backend's (a frozen dataclass
subclass of `Options`). Each field's annotation says what it takes: `float`, `int`, `bool`,
`str`, a `Literal[...]` of choices, `tuple[str, ...]` (a single string becomes a 1-tuple, a
list a tuple), `X | None`, and for numbers a range: `Annotated[float, Range(0, 1,
high_open=True)]`. Its doc is the `field_name: text` paragraph of the class docstring, so
`fxopt passes` and `fxopt backends` show what the author wrote once.

`Options` classes are built through `CheckedOnConstruction`: after the dataclass's own
`__init__`, list fields are normalised, every field is checked against its annotation, and
then `validate()` runs the class's own rules that relate two options. So `PruneChannels(
ratio=2)` fails like `prune-channels{ratio=2}` does, and an instance that exists can always be
printed back to text that parses. Floats must be finite unless their Range says `finite=False`.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass
from typing import ClassVar

from ..errors import FxoptError, PassOptionError

__all__ = ["Options", "OptionSpec", "Range", "check_options", "range_of", "type_name", "unwrap"]


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True

    def contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return not self.finite and not math.isnan(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True)
class OptionSpec:
    """One option: dataclass field name, its key in pipeline text, type, default, range, doc."""

    field: str
    key: str
    type: object
    default: object
    range: Range | None = None
    doc: str = ""

    @property
    def type_name(self) -> str:
        return type_name(self.type) + (f" in {self.range}" if self.range is not None else "")


class CheckedOnConstruction(type):
    """Metaclass: an instance is normalised, checked and validated right after it is built."""

    def __call__(cls, *args, **kwargs):
        instance = super().__call__(*args, **kwargs)
        if dataclasses.is_dataclass(instance):
            hints = typing.get_type_hints(cls, include_extras=True)   # read once for both steps
            _normalise_lists(instance, hints)
            check_options(instance, hints)
            instance.validate()
        return instance


class Options(metaclass=CheckedOnConstruction):
    """Base of a set of options (a backend's; Pass builds on it). Subclasses are frozen dataclasses.

    `owner_name` names the owner in errors (`backend 'xla'`); `error_class` is the FxoptError
    raised. (So no option may be called either; register_pass refuses such a field.)
    """

    owner_name: ClassVar[str] = ""
    error_class: ClassVar[type[FxoptError]] = PassOptionError

    def validate(self) -> None:
        """Rules that relate two options (each option alone is checked from its annotation)."""

    @classmethod
    def owner(cls) -> str:
        return cls.owner_name or cls.__name__

    @classmethod
    def key_of(cls, field: str) -> str:
        """How users spell the option: a Python keyword (pipeline text overrides: kebab-case)."""
        return field

    @classmethod
    def options(cls) -> list[OptionSpec]:
        """The options: one per dataclass field, in declaration order, with their docs."""
        if not dataclasses.is_dataclass(cls):
            return []
        hints, annotated = typing.get_type_hints(cls), typing.get_type_hints(cls, include_extras=True)
        docs, specs = option_docs(cls), []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            specs.append(OptionSpec(f.name, cls.key_of(f.name), hints[f.name], default,
                                    range_of(annotated[f.name]), docs.get(f.name, "")))
        return specs

    @classmethod
    def from_kwargs(cls, kwargs: dict):
        """An instance from keyword options, kebab-case keys accepted; unknown keys refused by name."""
        values = {k.replace("-", "_"): v for k, v in kwargs.items()}
        fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        unknown = sorted(set(values) - set(fields))
        if unknown and not fields:
            raise cls.error_class(f"{cls.owner()} takes no options, got {', '.join(map(repr, unknown))}",
                                  hint="drop them")
        if unknown:
            raise cls.error_class(f"{cls.owner()} has no option {', '.join(map(repr, unknown))}",
                                  hint=f"its options: {', '.join(fields)}")
        return cls(**values)


def option_docs(cls) -> dict[str, str]:
    """{field: doc} from the class docstring's `field_name: text` paragraphs (indented lines continue)."""
    docs: dict[str, str] = {}
    current = None
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = re.match(r"(\w+): (.*)", line)
        if match and match.group(1) in fields:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith((" ", "\t")) and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def unwrap(tp):
    """The type inside `Annotated[...]` (other types as they are)."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def range_of(tp) -> Range | None:
    """The Range an annotation carries, looking inside `X | None`."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Range)), None)
    if _is_union(tp):
        return next((r for r in map(range_of, typing.get_args(tp)) if r is not None), None)
    return None


def type_name(tp) -> str:
    """A short readable spelling of an option type, e.g. `int`, `l1|l2`, `list[str]`."""
    tp = unwrap(tp)
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "none"
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if _is_union(tp):
        return "|".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def check_options(instance: Options, hints: dict | None = None) -> None:
    """Raise the class's error at the first field of `instance` its annotation refuses
    (`hints`: the class's type hints with extras, when the caller has them already)."""
    cls = type(instance)
    hints = hints or typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        problem = _problem(hints[f.name], getattr(instance, f.name))
        if problem:
            raise cls.error_class(f"{cls.owner()}: option '{cls.key_of(f.name)}' {problem}",
                                  hint="`fxopt passes` and `fxopt backends` list every option with what it takes")


def _normalise_lists(instance, hints: dict) -> None:
    """A list option given one string holds that string; any other iterable (a list, a set, a
    generator) becomes a tuple, so the option is hashable and prints back to text."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not _is_list_type(hints[f.name]) or isinstance(value, tuple):
            continue
        if isinstance(value, str):
            object.__setattr__(instance, f.name, (value,))
        elif hasattr(value, "__iter__") and not isinstance(value, (bytes, dict)):
            object.__setattr__(instance, f.name, tuple(value))


def _is_list_type(tp) -> bool:
    tp = unwrap(tp)
    if _is_union(tp):
        return any(_is_list_type(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (tuple, list)


def _problem(tp, value) -> str | None:
    """Why `value` does not fit annotation `tp` (None when it does)."""
    bounds = range_of(tp) if typing.get_origin(tp) is typing.Annotated else None
    tp = unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        problems = [_problem(a, value) for a in args]
        return None if any(p is None for p in problems) else next(p for p in problems if p)
    if tp is type(None):
        return None if value is None else f"takes none, got {value!r}"
    if origin is typing.Literal:
        return None if value in args else f"takes one of {', '.join(map(str, args))}, got {value!r}"
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"takes a list, got {value!r}"
        return next((p for p in (_problem(args[0], v) for v in value) if p), None)
    if tp is bool:
        return None if isinstance(value, bool) else f"takes true or false, got {value!r}"
    if tp in (int, float):
        kinds = (int,) if tp is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"takes {'an integer' if tp is int else 'a number'}, got {value!r}"
        bounds = bounds or Range()
        if not bounds.contains(value):
            kind = "an integer" if tp is int else f"a {'finite ' if bounds.finite else ''}number"
            return f"takes {kind} in {bounds}, got {value!r}"
        return None
    if tp is str:
        return None if isinstance(value, str) else f"takes a string, got {value!r}"
    if isinstance(tp, type):   # a class the text syntax does not spell (os.PathLike, a sub-pipeline's tuple)
        return None if isinstance(value, tp) else f"takes a {tp.__name__}, got {value!r}"
    return None   # an annotation this check cannot read: validate() checks it


def _is_union(tp) -> bool:
    return typing.get_origin(tp) is typing.Union or str(typing.get_origin(tp)) == "<class 'types.UnionType'>"
