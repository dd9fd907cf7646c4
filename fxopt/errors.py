"""The errors fxopt raises.

Every error says three things: what was wrong, where (a node and the user's
source line, or a column of the pipeline text) and what to do about it.
Callers catch `FxoptError` to catch them all.
"""
from __future__ import annotations


class FxoptError(Exception):
    """Base of every fxopt error: a message, optionally where and a hint."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint
        self.context: list[str] = []

    def add_context(self, line: str) -> None:
        """Append a line (e.g. which passes already ran) shown with the error."""
        self.context.append(line)

    def __str__(self) -> str:
        lines = [self.message]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.hint:
            lines.append(f"  what to do: {self.hint}")
        lines.extend(f"  {line}" for line in self.context)
        return "\n".join(lines)


class TraceError(FxoptError):
    """The model could not be captured as a graph."""


class InputShapeError(FxoptError, ValueError):
    """A compiled model was called with inputs unlike the ones it was traced with."""


class PipelineSyntaxError(FxoptError):
    """The pipeline text does not parse; `column` is 1-based."""

    def __init__(self, message: str, text: str, column: int, hint: str | None = None):
        caret = " " * (column - 1) + "^"
        super().__init__(f"{message} at column {column}", where=f"\n    {text}\n    {caret}", hint=hint)
        self.column = column
        self.text = text


class UnknownPassError(FxoptError, KeyError):
    """A pipeline names a pass that is not registered."""

    __str__ = FxoptError.__str__


class PassOptionError(FxoptError, ValueError):
    """A pass was given an unknown option or a value of the wrong type."""


class VerificationError(FxoptError):
    """A graph failed verification after a pass (lint, metadata or outputs)."""


class UnsupportedError(FxoptError):
    """The input is valid but uses something fxopt does not handle (yet)."""


class BackendOptionError(UnsupportedError, ValueError):
    """A backend was given an unknown option or a value its declaration refuses."""


class TrainingError(FxoptError, ValueError):
    """fxopt.finetune cannot train with what it was given: its settings, data, checkpoint or
    process group."""


class PassFailedError(FxoptError):
    """A pass raised something that is not an FxoptError; the cause is chained."""
