"""Two ways to write a rewrite.

1. `replace_pattern(gm, pattern, replacement, match_filters)`: a pair of plain
   functions; torch.fx's subgraph rewriter matches the pattern's graph and
   splices in the replacement's. Patterns are traced to ATen ops the same way
   models are, so they match traced graphs.
2. `RuleTable`: rewrites as data — rows of (matcher, function), kept in module-level
   tables that combine with `+` (`SPELLINGS + MODULES`). `apply` walks the graph in
   topological order, calling for each node the first row whose matcher accepts it
   (the function edits the graph and returns True if it changed it), and walks
   again until a walk changes nothing: a rewrite's result may match another row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.fx import subgraph_rewriter

from ..errors import FxoptError
from .shape_prop import TRACE_LOCK


def pattern_graph(fn: Callable, example_args: tuple) -> fx.GraphModule:
    """Trace a pattern/replacement function to ATen ops with torch.export."""

    class Wrapper(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    with TRACE_LOCK:
        gm = torch.export.export(Wrapper(), example_args, strict=False).module()
    _drop_guards(gm)
    return gm


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def replace_pattern(gm: fx.GraphModule, pattern: fx.GraphModule, replacement: fx.GraphModule,
                    match_filters=None) -> int:
    """Replace every non-overlapping match; returns how many were replaced."""
    matches = subgraph_rewriter.replace_pattern_with_filters(  # recompiles gm itself
        gm, pattern, replacement, match_filters=match_filters, ignore_literals=False)
    return len(matches)


Matcher = Callable[[fx.Node], bool]
Rewrite = Callable[[fx.GraphModule, fx.Node], bool]
Rule = tuple[Matcher, Rewrite]


@dataclass(frozen=True)
class RuleTable:
    """An ordered, immutable list of (matcher, rewrite) rows; `a + b` is a's rows, then b's."""

    rows: tuple[Rule, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))  # a list given is frozen too

    def __add__(self, other: RuleTable) -> RuleTable:
        if not isinstance(other, RuleTable):
            return NotImplemented
        return RuleTable(self.rows + other.rows)

    def apply(self, gm: fx.GraphModule, max_rounds: int = 8) -> int:
        """Walk until a walk changes nothing; returns the number of nodes rewritten in all.
        Raises FxoptError naming the rows still firing after `max_rounds` walks (rows that
        undo each other, or one that says it changed a node it left as it was). The graph is
        linted, not recompiled: the PassManager regenerates the code once after a changed pass."""
        total = 0
        for _ in range(max_rounds):
            changed, fired = self._walk(gm)
            total += changed
            if not changed:
                if total:
                    gm.graph.lint()
                return total
        raise FxoptError(
            f"rewrite rules did not reach a fixed point in {max_rounds} walks; still firing: "
            + ", ".join(sorted(fired)),
            hint="a rule must return True only when it changed the graph, and no two rules may "
                 "undo each other")

    def _walk(self, gm: fx.GraphModule) -> tuple[int, set[str]]:
        """(nodes rewritten, names of the rewrites that changed one) of one walk; nodes a
        rewrite adds are left to the next walk."""
        changed, fired = 0, set()
        for node in list(gm.graph.nodes):
            if node._erased:  # erased by an earlier row
                continue
            for matcher, fn in self.rows:
                if matcher(node):
                    if fn(gm, node):
                        changed += 1
                        fired.add(_rule_name(fn))
                    break
        return changed, fired


def _rule_name(fn: Rewrite) -> str:
    """`module.function` of a rewrite, as a non-converging table's error names it."""
    name = getattr(fn, "__qualname__", None)
    return f"{fn.__module__}.{name}" if name and getattr(fn, "__module__", None) else repr(fn)


def replace_with_call(gm: fx.GraphModule, node: fx.Node, target, args, kwargs=None) -> fx.Node:
    """Put a call_function node `target(*args, **kwargs)` in place of `node`, keeping its meta."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args), kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def bypass(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Remove an identity-like node, handing its first argument to its users."""
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    return True


def is_call(*targets) -> Matcher:
    """Matcher: a call_function node whose target is one of `targets`."""
    wanted = set(targets)
    return lambda node: node.op == "call_function" and node.target in wanted
