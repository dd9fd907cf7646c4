"""auto: each candidate op's own error in 16 bits, measured on the calibration batches.

The graph runs in fp32 once per batch. At every candidate node the op runs a second
time on the same inputs cast to the 16-bit dtype (its constants too, an explicit
`dtype=float32` argument turned into the 16-bit one), and the result is compared with
the fp32 one: error = sqrt(sum ||y16 - y||^2 / sum ||y||^2) over all batches and all
floating-point outputs of the op. So the number is the op's *own* contribution (its
inputs are exact), not the drift accumulated from the ops before it. An op that cannot
run in the 16-bit dtype here, or whose result overflows to inf / nan, gets error inf.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from .rules import FLOAT32, with_low_dtype


class _Probe(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes, low: torch.dtype):
        super().__init__(gm)
        self.low = low
        self.sums = {n: [0.0, 0.0] for n in nodes}
        self.failed: dict[fx.Node, str] = {}

    def run_node(self, n: fx.Node):
        if n not in self.sums:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        if n in self.failed:
            return result
        low_args, low_kwargs = tree_map(self._lower, with_low_dtype(n, args, kwargs, self.low))
        try:
            approx = n.target(*low_args, **low_kwargs)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            self.failed[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return result
        self._accumulate(n, result, approx)
        return result

    def _lower(self, value):
        if isinstance(value, torch.Tensor) and value.dtype == FLOAT32:
            return value.to(self.low)
        return value

    def _accumulate(self, n: fx.Node, exact, approx) -> None:
        pairs = [(e, a) for e, a in zip(tree_leaves(exact), tree_leaves(approx))
                 if isinstance(e, torch.Tensor) and e.is_floating_point() and isinstance(a, torch.Tensor)]
        sums = self.sums[n]
        for e, a in pairs:
            e, a = e.double(), a.double()
            sums[0] += float((a - e).pow(2).sum())
            sums[1] += float(e.pow(2).sum())


def measure_errors(gm: fx.GraphModule, nodes, low: torch.dtype, batches):
    """({node: relative output error run in `low`}, {node: why it could not run in `low`})
    for each node in `nodes`, on `batches`."""
    probe = _Probe(gm, list(nodes), low)
    with torch.no_grad():
        for batch in batches:
            probe.run(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    errors = {}
    for node, (diff, ref) in probe.sums.items():
        if node in probe.failed or not math.isfinite(diff):
            errors[node] = math.inf
        elif ref > 0:
            errors[node] = math.sqrt(diff / ref)
        else:
            errors[node] = 0.0 if diff == 0 else math.inf
    return errors, probe.failed
