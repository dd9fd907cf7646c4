"""OpRegistry: one handler per op, looked up by a node's target.

Analyses, rewrites and lowerings that do one small thing per op kind (the channel
ties of a conv, the cost of a matmul, the int8 kernel of an add) keep their
handlers in an OpRegistry instead of each writing its own dict and lookup:

    COST = OpRegistry("cost")

    @COST.register(aten.mm, aten.bmm)
    def _matmul(...): ...

    handler = COST.lookup(node.target)   # None: no handler for this op

A key is anything hashable a node's target can be: an ATen overload
(`aten.add.Tensor`), an overload packet (`aten.add`, standing for all its
overloads), a Python function (`operator.add`) or a name. A later registration of a
key replaces the earlier one, so a user can override a built-in handler.
"""
from __future__ import annotations

from typing import Callable, Hashable


class OpRegistry:
    """Handlers keyed by op; `lookup` tries the exact target, then its overload packet."""

    def __init__(self, name: str):
        self.name = name   # what the handlers do, for messages ("channel groups", "cost")
        self._handlers: dict[Hashable, Callable] = {}

    def register(self, *ops: Hashable) -> Callable[[Callable], Callable]:
        """Decorator: `fn` handles each of `ops`. Also usable as `registry.register(*ops)(fn)`."""
        def add(fn: Callable) -> Callable:
            for op in ops:
                self._handlers[op] = fn
            return fn
        return add

    @classmethod
    def from_table(cls, name: str, table: dict) -> "OpRegistry":
        """A registry holding `table`'s {op: handler} rows (a table written as one literal)."""
        registry = cls(name)
        registry._handlers.update(table)
        return registry

    def lookup(self, op) -> Callable | None:
        """The handler of `op` (a node's target), or None when neither it nor its overload
        packet is registered."""
        handler = self._handlers.get(op)
        if handler is not None:
            return handler
        packet = getattr(op, "overloadpacket", None)
        return self._handlers.get(packet) if packet is not None else None

    def __contains__(self, op) -> bool:
        return self.lookup(op) is not None

    def ops(self) -> list:
        """The registered keys, in registration order."""
        return list(self._handlers)

    def __repr__(self) -> str:
        return f"OpRegistry({self.name!r}, {len(self._handlers)} ops)"
