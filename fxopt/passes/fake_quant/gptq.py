"""fake-quant with rounding=gptq: weights rounded by GPTQ (fxopt.quant.gptq) instead of to nearest.

How it fits the pass:
1. Before any quantizer goes in, the float graph runs on the calibration batches
   (`am.calibration`, else the `data=` batches) and every quantized linear / 2-D conv
   accumulates H = 2 Σ x xᵀ of its input (a conv's unfolded patches). All layers are
   measured at once on the float model's activations (not sequentially on the
   partly quantized model): one pass over the data, at the price of ignoring how
   earlier layers' rounding shifts later layers' inputs.
2. After the weight quantizers are in (their scales observed on the float weight, as
   for nearest rounding), each such weight is rounded by GPTQ on exactly that grid.
   The result, an exact grid value per element, is stored as a NEW tensor
   `<weight>_gptq` that the weight quantizer reads (the traced weight is not
   mutated; an unread one is dropped), and the quantizer is frozen so its scale never
   moves: the quantizer, the int8 backend and the exports all see the GPTQ integers.
3. report.gptq lists per layer ||W X - W_q X|| / ||W X|| on the calibration inputs
   for nearest and for GPTQ rounding, and every quantized weight left to nearest
   rounding with the reason (matmul constants, grouped / 1-D / 3-D convs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...errors import PassOptionError
from ...ir.graph import drop_unused_attrs, fetch_attr, fresh_attr_name, module_path, set_attr
from ...ir.inputs import inputs_and_target, positional, split_batch
from ...quant.gptq import gptq_quantize, nearest_quantize, reconstruction_error
from ..low_rank.layers import Layer, find_layers, run_recorder

__all__ = ["GptqReport", "GptqRounding", "GptqRow"]


@dataclass(frozen=True)
class GptqRow:
    """One GPTQ-rounded weight: relative output error on the calibration inputs, both ways."""

    node: str
    module: str
    columns: int          # input columns of the weight matrix (in, or in x kh x kw)
    nearest: float        # ||W X - W_q X|| / ||W X|| with round-to-nearest
    gptq: float           # the same with GPTQ rounding


@dataclass
class GptqReport:
    """rows: every weight rounded by GPTQ; nearest: (node, why) for every quantized op
    whose weight stayed with round-to-nearest; batches: calibration batches seen."""

    rows: list[GptqRow] = field(default_factory=list)
    nearest: list[tuple[str, str]] = field(default_factory=list)
    batches: int = 0

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "nearest": [list(n) for n in self.nearest],
                "batches": self.batches}

    def __str__(self) -> str:
        lines = [f"gptq: {len(self.rows)} weights rounded by GPTQ ({self.batches} calibration batches); "
                 "relative output error nearest -> gptq"]
        lines += [f"  {r.node:<24} {r.nearest:.4f} -> {r.gptq:.4f}  {r.module}" for r in self.rows]
        lines += [f"  nearest    {node}: {why}" for node, why in self.nearest]
        return "\n".join(lines)


def _batches(gm: fx.GraphModule, am) -> list[tuple]:
    """The graph's positional inputs of each calibration batch (else each data batch)."""
    if am.calibration:
        return [positional(gm, *split_batch(b)) for b in am.calibration]
    if am.data:
        return [inputs_and_target(b, "a data batch")[0] for b in am.data]
    raise PassOptionError("fake-quant: rounding=gptq needs calibration batches (it measures each layer's inputs)",
                          hint="pass them to compile: fxopt.compile(model, inputs, pipeline=..., "
                               "calibration=[batch, ...]), or use rounding=nearest")


def _rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The input vectors the weight matrix multiplies: tokens, or a conv's unfolded patches
    (channel-major, then kernel rows and columns: the order of weight.reshape(out, -1))."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])
    g = layer.geometry
    cols = F.unfold(x, tuple(layer.weight.shape[2:]), dilation=g.dilation, padding=g.padding, stride=g.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class GptqRounding:
    """The Hessians of the quantized layers (measured on the float graph), then their rounding."""

    def __init__(self, gm: fx.GraphModule, am, quantized: list[fx.Node]):
        wanted = set(quantized)
        layers, passed = find_layers(gm, ("linear", "conv"))
        self.layers = [layer for layer in layers if layer.node in wanted]
        found = {layer.node for layer in layers} | {node for node, _ in passed}
        batches = _batches(gm, am)
        self.report = GptqReport(batches=len(batches))
        self.report.nearest += [(node.name, why) for node, why in passed if node in wanted]
        self.report.nearest += [(node.name, "a matmul operand (GPTQ rounds linear and conv weights)")
                                for node in quantized if node not in found and _has_constant(node)]
        self.hessians: dict[fx.Node, torch.Tensor] = {}
        run_recorder(gm, self.layers, batches, self._accumulate)

    def _accumulate(self, layer: Layer, x: torch.Tensor) -> None:
        r = _rows(layer, x).float()
        h = (2 * r.T @ r).double()     # float32 products (4x faster than float64), summed in float64
        self.hessians[layer.node] = self.hessians[layer.node] + h if layer.node in self.hessians else h

    def apply(self, gm: fx.GraphModule, weight_paths: dict) -> GptqReport:
        """Round every measured layer's weight by GPTQ; returns report.gptq."""
        for layer in self.layers:
            quantizer = _weight_quantizer_node(layer)
            if quantizer is None or layer.node not in self.hessians:
                why = "its weight is not quantized" if quantizer is None else "no calibration batch reached it"
                self.report.nearest.append((layer.node.name, why))
                continue
            self.report.rows.append(self._round(gm, layer, quantizer))
        drop_unused_attrs(gm)
        return self.report

    def _round(self, gm: fx.GraphModule, layer: Layer, quantizer: fx.Node) -> GptqRow:
        fq = gm.get_submodule(quantizer.target)
        matrix = layer.weight.reshape(layer.weight.shape[0], -1).float()
        hessian = self.hessians[layer.node]
        rounded, _, _ = gptq_quantize(matrix, hessian, fq.spec, fq.scale.detach(), fq.zero_point)
        nearest = nearest_quantize(matrix, fq.spec, fq.scale.detach(), fq.zero_point)
        original = fetch_attr(gm, layer.weight_node.target)
        name = fresh_attr_name(gm, f"{layer.weight_node.target}_gptq")
        value = rounded.reshape(layer.weight.shape).to(original.dtype)
        set_attr(gm, name, torch.nn.Parameter(value, original.requires_grad)
                 if isinstance(original, torch.nn.Parameter) else value)
        with gm.graph.inserting_before(quantizer):
            attr = gm.graph.get_attr(name)
        attr.meta.update(layer.weight_node.meta)
        quantizer.replace_input_with(layer.weight_node, attr)
        if not layer.weight_node.users:
            gm.graph.erase_node(layer.weight_node)
        fq.freeze()   # the scale GPTQ rounded onto stays, even when trained (QAT)
        return GptqRow(layer.node.name, module_path(layer.node), matrix.shape[1],
                       reconstruction_error(matrix, nearest, hessian),
                       reconstruction_error(matrix, rounded, hessian))


def _weight_quantizer_node(layer: Layer) -> fx.Node | None:
    """The weight quantizer call the op reads its weight through (None if it reads it raw)."""
    w = layer.node.args[1]
    if isinstance(w, fx.Node) and w.op == "call_module" and w.args and w.args[0] is layer.weight_node:
        return w
    return None


def _has_constant(node: fx.Node) -> bool:
    return any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args)
