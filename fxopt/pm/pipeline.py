"""Pipeline text: `name{key=value key=value},name,stages(p1,p2)`.

MLIR's textual pipeline syntax, kept small. Keys are kebab-case spellings of a
pass's dataclass fields; values are checked against the field types; lists are
`[a,b]`; strings may be quoted ("a b"). `format_pipeline` leaves defaults out,
so `parse_pipeline(format_pipeline(p)) == p`. A bare preset name (`default`)
expands to its text.
"""
from __future__ import annotations

import difflib
import typing

from ..errors import PassOptionError, PipelineSyntaxError, UnknownPassError
from .options import OptionSpec, type_name
from .pass_base import Pass, get_pass, pass_names

PRESETS: dict[str, str] = {
    "default": "canonicalize,fold-bn,dce",
    "cleanup": "canonicalize,dce",
    # compression presets (the benchmark harness runs them; a fake-quant one wants backend="int8")
    "prune50": "canonicalize,fold-bn,dce,prune-channels{ratio=0.5}",
    "int8": "canonicalize,fold-bn,dce,fake-quant",
    "lowrank30": "canonicalize,fold-bn,dce,low-rank{rank-policy=budget budget=0.7}",
    "prune50+int8": "canonicalize,fold-bn,dce,prune-channels{ratio=0.5},fake-quant",
    "prune25+int8": "canonicalize,fold-bn,dce,prune-channels{ratio=0.25},fake-quant",
    "prune30+lowrank+int8": "canonicalize,fold-bn,dce,prune-channels{ratio=0.3},"
                            "low-rank{rank-policy=budget budget=0.7},fake-quant",
}

_SPECIAL = set(",{}[]()= \t\"'")


_SYNTAX_HINT = ("write passes as name{key=value key=value},name,...; lists as [a,b]; "
                "quote strings holding spaces or punctuation")


class _Quoted(str):
    """A value written in quotes: always a string (never `none`, a number or a bool)."""


class _Cursor:
    """A position in the pipeline text, with error reporting by column."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n":
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of text"
            self.fail(f"expected '{char}', found {found}")
        self.pos += 1

    def word(self, what: str) -> tuple[str, int]:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _SPECIAL:
            self.pos += 1
        if start == self.pos:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            self.fail(f"expected {what}, found {found}")
        return self.text[start:self.pos], start + 1

    def fail(self, message: str, column: int | None = None, hint: str | None = None):
        raise PipelineSyntaxError(message, self.text, column or self.pos + 1, hint or _SYNTAX_HINT)


def parse_pipeline(text) -> list[Pass]:
    """Parse pipeline text (or pass through a list of Pass) into Pass instances."""
    if not isinstance(text, str):
        passes = list(text)
        bad = [p for p in passes if not isinstance(p, Pass)]
        if bad:
            raise PassOptionError(f"a pipeline list holds Pass instances, got {type(bad[0]).__name__}",
                                  hint="use fxopt.parse_pipeline('name{key=value}') or PassClass(...)")
        return passes
    cur = _Cursor(text)
    if not text.strip():
        return []
    passes = _parse_list(cur, closing="")
    if cur.peek():
        cur.fail(f"unexpected {cur.peek()!r}", hint="separate passes with ','")
    return passes


def _parse_list(cur: _Cursor, closing: str) -> list[Pass]:
    passes = _parse_item(cur)
    while cur.peek() == ",":
        cur.pos += 1
        passes += _parse_item(cur)
    if closing:
        cur.expect(closing)
    return passes


def _parse_item(cur: _Cursor) -> list[Pass]:
    name, column = cur.word("a pass name")
    if name == "stages" and cur.peek() == "(":
        cur.pos += 1
        if cur.peek() == ")":  # stages(): an empty sub-pipeline, as format_pipeline writes it
            cur.pos += 1
            return [get_pass("stages")(())]
        return [get_pass("stages")(tuple(_parse_list(cur, closing=")")))]
    if name in PRESETS and cur.peek() != "{":
        return parse_pipeline(PRESETS[name])
    cls = get_pass(name)
    if cls is None:
        near = difflib.get_close_matches(name, pass_names() + list(PRESETS), n=3, cutoff=0.5)
        raise UnknownPassError(
            f"unknown pass '{name}' at column {column}",
            where=f"\n    {cur.text}\n    {' ' * (column - 1)}^",
            hint=(f"did you mean {' or '.join(repr(n) for n in near)}? " if near else "")
            + "`fxopt passes` lists every pass",
        )
    values = {}
    if cur.peek() == "{":
        cur.pos += 1
        values = _parse_options(cur, cls)
    try:
        return [cls(**values)]
    except PassOptionError as exc:
        exc.where = exc.where or f"column {column} of: {cur.text}"
        raise
    except (TypeError, ValueError) as exc:
        raise PassOptionError(f"invalid options for '{name}': {exc}", where=f"column {column}") from exc


def _parse_options(cur: _Cursor, cls: type[Pass]) -> dict:
    specs = {s.key: s for s in cls.options()}
    values = {}
    while cur.peek() != "}":
        if not cur.peek():
            cur.fail("unclosed '{'", hint="close the options with '}'")
        key, column = cur.word("an option name")
        if key not in specs:
            near = difflib.get_close_matches(key, list(specs), n=3, cutoff=0.5)
            known = ", ".join(f"{k}: {s.type_name}" for k, s in specs.items()) or "none"
            raise PassOptionError(
                f"pass '{cls.name}' has no option '{key}'",
                where=f"column {column} of: {cur.text}",
                hint=(f"did you mean {' or '.join(map(repr, near))}? " if near else "")
                + f"its options are: {known}",
            )
        if specs[key].field in values:
            raise PassOptionError(f"pass '{cls.name}' is given option '{key}' twice",
                                  where=f"column {column} of: {cur.text}", hint="give each option once")
        cur.expect("=")
        raw, value_column = _parse_value(cur)
        values[specs[key].field] = convert_option(specs[key], raw, cls.name, f"column {value_column} of: {cur.text}")
    cur.pos += 1
    return values


def _parse_value(cur: _Cursor):
    """A raw value: a string, or a list of raw values; with its column."""
    char = cur.peek()
    column = cur.pos + 1
    if char == "[":
        cur.pos += 1
        items = []
        while cur.peek() != "]":
            items.append(_parse_value(cur)[0])
            if cur.peek() == ",":
                cur.pos += 1
            elif cur.peek() != "]":
                cur.fail("expected ',' or ']' in a list")
        cur.pos += 1
        return items, column
    if char in ("'", '"'):
        end = cur.text.find(char, cur.pos + 1)
        if end < 0:
            cur.fail("unterminated string", hint=f"close it with {char}")
        value = _Quoted(cur.text[cur.pos + 1:end])
        cur.pos = end + 1
        return value, column
    return cur.word("a value")[0], column


def convert_option(spec: OptionSpec, raw, pass_name: str, where: str):
    """Convert a raw value (str or list) to the option's declared type."""
    try:
        return _convert(spec.type, raw)
    except (ValueError, TypeError):
        raise PassOptionError(
            f"option '{spec.key}' of pass '{pass_name}' takes {type_name(spec.type)}, got {raw!r}",
            where=where, hint=f"write e.g. {spec.key}={format_value(spec.default)}" if spec.default is not None
            else None) from None


def _convert(tp, raw):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union,) or str(origin) == "<class 'types.UnionType'>":
        if isinstance(raw, _Quoted) and str in args:
            return str(raw)
        if isinstance(raw, str) and not isinstance(raw, _Quoted) and raw == "none" and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, raw)
            except (ValueError, TypeError):
                continue
        raise ValueError(raw)
    if origin in (tuple, list):
        items = raw if isinstance(raw, list) else [raw]
        return tuple(_convert(args[0], item) for item in items)
    if isinstance(raw, list):
        raise TypeError("a list is not allowed here")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(raw)
    if tp is bool:
        if raw in ("true", "false"):
            return raw == "true"
        raise ValueError(raw)
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if tp is str:
        return str(raw)
    raise TypeError(f"unsupported option type {tp}")


def format_value(value) -> str:
    """The pipeline-text spelling of an option value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    text = str(value) if not isinstance(value, float) else repr(value)
    if isinstance(value, str) and (not text or any(c in _SPECIAL or c.isspace() for c in text)
                                   or _reads_as_other_type(text)):
        quote = "'" if '"' in text else '"'
        if quote in text:
            raise PassOptionError(f"the string {text!r} holds both kinds of quote and cannot be "
                                  "written in pipeline text",
                                  hint="drop one kind of quote from the value")
        return quote + text + quote
    return text


def _reads_as_other_type(text: str) -> bool:
    """True if a bare word would not read back as this string (`none`, `true`, numbers)."""
    if text in ("none", "true", "false"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_pipeline(passes) -> str:
    """Pipeline text for a list of passes, options at their defaults left out."""
    return ",".join(_format_one(p) for p in parse_pipeline(passes))


def _format_one(p: Pass) -> str:
    if p.name == "stages":
        return f"stages({format_pipeline(p.pipeline)})"
    opts = [f"{s.key}={format_value(getattr(p, s.field))}" for s in p.options()
            if getattr(p, s.field) != s.default]
    return p.name + ("{" + " ".join(opts) + "}" if opts else "")
