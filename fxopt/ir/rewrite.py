"""Two ways to write a rewrite.

1. `replace_pattern(gm, pattern, replacement, match_filters)`: a pair of plain
   functions; torch.fx's subgraph rewriter matches the pattern's graph and
   splices in the replacement's. Patterns are traced to ATen ops the same way
   models are, so they match traced graphs.
2. `RuleTable`: rewrites as data — rows of (matcher, function). `apply` walks the
   graph once in topological order and calls the first row whose matcher accepts
   a node; the function edits the graph and returns True if it changed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch.fx import subgraph_rewriter

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


@dataclass
class RuleTable:
    """An ordered list of (matcher, rewrite) rows applied in one walk."""

    rows: list[tuple[Matcher, Rewrite]] = field(default_factory=list)

    def rule(self, matcher: Matcher):
        """Decorator form: `@table.rule(matcher)` over a rewrite function."""
        def add(fn: Rewrite) -> Rewrite:
            self.rows.append((matcher, fn))
            return fn
        return add

    def apply(self, gm: fx.GraphModule) -> int:
        """Walk the graph once; returns the number of nodes rewritten. The graph is linted,
        not recompiled: the PassManager regenerates the code once after a changed pass."""
        changed = 0
        for node in list(gm.graph.nodes):
            if node._erased:  # erased by an earlier row
                continue
            for matcher, fn in self.rows:
                if matcher(node):
                    if fn(gm, node):
                        changed += 1
                    break
        if changed:
            gm.graph.lint()
        return changed


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
