"""The layers low-rank may factorize, their cost in each form, and calibration statistics.

A target is an `aten.linear` or a 2-D, ungrouped, non-transposed `aten.conv2d` /
`aten.convolution` whose weight is a constant (get_attr). Its factorized forms:

  matrix   linear -> linear(in, r, no bias) -> linear(r, out); a 1x1 conv -> two 1x1
           convs (the stride on the first). MACs per output position r * (in + out).
  tucker2  conv -> 1x1 (I -> r_in, at the input resolution) -> kh x kw core
           (r_in -> r_out, the original stride / padding / dilation) -> 1x1 (r_out -> O).
  spatial  conv -> kh x 1 (I -> r; the height part of stride / padding / dilation)
           -> 1 x kw (r -> O; the width part).

Calibration statistics (activation-aware decomposition, and the output error the
report shows) come from running the graph on the calibration batches with an
interpreter that sees each target's input: Gram matrices of the rows a factor reads
(tokens for a linear, pixels for a 1x1 / Tucker input factor, vertical patches for
the spatial form).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ir.graph import fetch_attr, module_path
from ...ir.meta import TENSOR
from ...ir.nodes import arg

aten = torch.ops.aten
CONVS = {aten.conv2d.default, aten.convolution.default}


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass(eq=False)
class Layer:
    """One target op: its node, weight, bias and shapes (conv: `geometry` is set)."""

    node: fx.Node
    weight_node: fx.Node
    bias_node: fx.Node | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    geometry: ConvGeometry | None = None
    grams: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return module_path(self.node) or str(self.weight_node.target)

    @property
    def is_conv(self) -> bool:
        return self.geometry is not None

    @property
    def is_pointwise(self) -> bool:
        return not self.is_conv or self.weight.shape[2:] == (1, 1)

    @property
    def positions(self) -> int:
        """Output positions: tokens of a linear, N * Ho * Wo of a conv."""
        out = self.weight.shape[0]
        total = 1
        for s in self.out_shape:
            total *= s
        return total // out

    def dense_macs(self) -> int:
        return self.positions * self.weight[0].numel() * self.weight.shape[0]

    def matrix(self) -> torch.Tensor:
        """The weight as (out, in) for the matrix form (linear or 1x1 conv)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def matrix_macs(self, rank: int) -> int:
        out, inp = self.matrix().shape
        return self.positions * rank * (inp + out)

    def tucker2_macs(self, r_out: int, r_in: int) -> int:
        o, i, kh, kw = self.weight.shape
        n, _, h, w = self.in_shape
        return n * h * w * i * r_in + self.positions * (r_in * r_out * kh * kw + r_out * o)

    def spatial_macs(self, rank: int) -> int:
        o, i, kh, kw = self.weight.shape
        n, _, _, w_in = self.in_shape
        h_out = self.out_shape[2]
        return n * h_out * w_in * rank * i * kh + self.positions * o * rank * kw


def find_layers(gm: fx.GraphModule, kinds: tuple[str, ...]) -> tuple[list[Layer], list[tuple[fx.Node, str]]]:
    """(targets, [(node, why it is not one)]) for the linear / conv ops of the kinds asked."""
    layers, passed = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind = "linear" if node.target == aten.linear.default else "conv" if node.target in CONVS else None
        if kind is None or kind not in kinds:
            continue
        layer = _layer(gm, node, kind)
        if isinstance(layer, str):
            passed.append((node, layer))
        else:
            layers.append(layer)
    return layers, passed


def _layer(gm: fx.GraphModule, node: fx.Node, kind: str) -> Layer | str:
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return "weight is not a constant"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "bias is not a constant"
    info, out = x.meta.get(TENSOR), node.meta.get(TENSOR)
    if info is None or out is None:
        return "no recorded shapes"
    weight = fetch_attr(gm, w.target).detach()
    bias_t = fetch_attr(gm, bias.target).detach() if bias is not None else None
    geometry = None
    if kind == "conv":
        geometry = _conv_geometry(node, weight)
        if isinstance(geometry, str):
            return geometry
    return Layer(node, w, bias, weight, bias_t, tuple(info.shape), tuple(out.shape), geometry)


def _conv_geometry(node: fx.Node, weight: torch.Tensor) -> ConvGeometry | str:
    if weight.dim() != 4:
        return f"{weight.dim() - 2}-D convolution (only 2-D is factorized)"
    args = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        if args[6]:
            return "transposed convolution"
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
    if isinstance(padding, str):
        return f"padding={padding!r} (explicit padding only)"
    if groups not in (None, 1):
        return f"grouped convolution (groups={groups}): its weight has no dense matrix to factorize"
    return ConvGeometry(_pair(stride, 1), _pair(padding, 0), _pair(dilation, 1))


def _pair(value, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


# ---- calibration statistics -------------------------------------------------------------

class _Recorder(fx.Interpreter):
    """Runs the graph; for each target node, hands its actual input to `on_input`."""

    def __init__(self, gm: fx.GraphModule, by_node: dict, on_input):
        super().__init__(gm)
        self.by_node, self.on_input = by_node, on_input

    def run_node(self, n: fx.Node):
        if n in self.by_node:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.on_input(self.by_node[n], args[0].detach())
        return super().run_node(n)


def run_recorder(gm: fx.GraphModule, layers: list[Layer], batches, on_input) -> None:
    """Run every calibration batch; `on_input(layer, x)` sees each target's input."""
    recorder = _Recorder(gm, {layer.node: layer for layer in layers}, on_input)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*(batch if isinstance(batch, (tuple, list)) else (batch,)))


def rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The input rows a matrix / Tucker input factor reads: tokens (linear) or pixels (conv),
    for a strided 1x1 conv only the pixels it reads."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])
    if layer.is_pointwise:
        sh, sw = layer.geometry.stride
        x = x[:, :, ::sh, ::sw]
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def vertical_patches(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The (i, y) patches the vertical factor of the spatial form reads, as rows."""
    kh = layer.weight.shape[2]
    g = layer.geometry
    cols = F.unfold(x, (kh, 1), dilation=(g.dilation[0], 1), padding=(g.padding[0], 0),
                    stride=(g.stride[0], 1))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def collect_grams(gm: fx.GraphModule, layers: list[Layer], batches) -> None:
    """Fill layer.grams: 'rows' (every layer) and 'patches' (kh x kw convs), float64 sums."""
    def on_input(layer: Layer, x: torch.Tensor) -> None:
        _accumulate(layer.grams, "rows", rows(layer, x))
        if not layer.is_pointwise:
            _accumulate(layer.grams, "patches", vertical_patches(layer, x))

    run_recorder(gm, layers, batches, on_input)


def _accumulate(grams: dict, key: str, r: torch.Tensor) -> None:
    r = r.double()
    g = r.T @ r
    grams[key] = grams[key] + g if key in grams else g
