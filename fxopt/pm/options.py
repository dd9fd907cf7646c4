"""Pass options checked from their declarations, the same way from Python and from text.

A pass's options are its dataclass fields; each field's annotation says what it takes:
`float`, `int`, `bool`, `str`, a `Literal[...]` of choices, `tuple[str, ...]`, `X | None`,
and, for numbers, a range: `Annotated[float, Range(0, 1, high_open=True)]`. A registered
pass is checked against its annotations right after it is built (`register_pass` adds the
check), so `PruneChannels(ratio=2)` fails like `prune-channels{ratio=2}` does, and a pass
that was built can always be printed back to text that parses. Floats must be finite
unless their Range says `finite=False`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from ..errors import PassOptionError

__all__ = ["Range", "check_options", "range_of", "unwrap"]


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


def check_options(instance) -> None:
    """Raise PassOptionError at the first field of the pass `instance` its annotation refuses."""
    cls = type(instance)
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        problem = _problem(hints[f.name], value)
        if problem:
            raise PassOptionError(f"{cls.name or cls.__name__}: option '{f.name.replace('_', '-')}' {problem}",
                                  hint="`fxopt passes` lists the options of every pass with what they take")


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
            return f"takes a {'finite ' if bounds.finite else ''}number in {bounds}, got {value!r}"
        return None
    if tp is str:
        return None if isinstance(value, str) else f"takes a string, got {value!r}"
    return None   # a type the text syntax does not spell (e.g. a sub-pipeline): the pass checks it


def _is_union(tp) -> bool:
    return typing.get_origin(tp) is typing.Union or str(typing.get_origin(tp)) == "<class 'types.UnionType'>"
