"""What compress measures of a model: latency against the fp32 model, weight bytes, and the score.

Latency is measured where the model will run, on the chosen backend, interleaved with the
fp32 model in the same process (the two alternate, so a busy machine slows both alike) and
compared as a ratio of medians. Weight bytes count a weight read through a weight quantizer
at its bits (plus its fp32 scales), everything else at its dtype's size. The default score,
when the user gives no metric, is measured on held-out batches:

- accuracy (top-1 against the batches' labels) for a classifier given labels;
- top-1 agreement with the fp32 model for a classifier without labels;
- mean cosine similarity to the fp32 model's outputs otherwise (embeddings, probabilities).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ...analyses.fidelity import output_kinds
from ...ir.inputs import inputs_and_target, tensor_leaves
from ...quant import FakeQuantize

__all__ = ["Score", "default_score", "speedup", "weight_bytes"]


def speedup(baseline: torch.nn.Module, candidate: torch.nn.Module, inputs: tuple, runs: int = 7) -> tuple:
    """(baseline seconds, candidate seconds): medians of `runs` interleaved calls after one warm-up."""
    times = {"baseline": [], "candidate": []}
    with torch.no_grad():
        baseline(*inputs), candidate(*inputs)
        for _ in range(runs):
            for name, module in (("baseline", baseline), ("candidate", candidate)):
                start = time.perf_counter()
                module(*inputs)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["baseline"]), statistics.median(times["candidate"])


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the constants `gm` reads, a quantized weight at its bits plus 4 bytes per scale."""
    bits = {}
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        source = node.all_input_nodes[0] if node.all_input_nodes else None
        if isinstance(module, FakeQuantize) and module.role == "weight" and source is not None \
                and source.op == "get_attr":
            bits[source.target] = (module.bits, module.scale.numel())
    total = 0
    for node in gm.graph.find_nodes(op="get_attr"):
        value = functools.reduce(getattr, node.target.split("."), gm)
        if not isinstance(value, torch.Tensor):
            continue
        if node.target in bits:
            b, scales = bits[node.target]
            total += (value.numel() * b + 7) // 8 + 4 * scales
        else:
            total += value.numel() * value.element_size()
    return total


@dataclass
class Score:
    """A model's score (higher is better) and what it measures."""

    name: str
    of: Callable[[torch.nn.Module], float]


def default_score(model: torch.nn.Module, gm: fx.GraphModule, held_out: list) -> Score:
    """The score compress uses without a metric: see the module doc. `gm` is the traced graph
    (its output kind), `held_out` the evaluation batches, `model` the fp32 reference."""
    batches = [inputs_and_target(b, "an evaluation batch") for b in held_out]
    labelled = all(isinstance(t, torch.Tensor) for _, t in batches)
    with torch.no_grad():
        reference = [tensor_leaves(model(*x))[0] for x, _ in batches]
    if output_kinds(gm)[:1] == ["logits"]:
        if labelled:
            return Score("accuracy", lambda m: _mean_over(m, batches, lambda out, i: out.argmax(-1) == batches[i][1]))
        return Score("top-1 agreement with fp32",
                     lambda m: _mean_over(m, batches, lambda out, i: out.argmax(-1) == reference[i].argmax(-1)))
    return Score("cosine to fp32", lambda m: _mean_over(m, batches, lambda out, i: torch.nn.functional.cosine_similarity(
        out.reshape(-1, out.shape[-1]).double(), reference[i].reshape(-1, out.shape[-1]).double(), dim=-1)))


def _mean_over(model, batches: list, per_row) -> float:
    values = []
    with torch.no_grad():
        for i, (x, _) in enumerate(batches):
            values.append(per_row(tensor_leaves(model(*x))[0], i).double().reshape(-1))
    return torch.cat(values).mean().item()
