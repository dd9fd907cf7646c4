"""Does the int8 graph compute what its fake-quant graph computes? Measured, per layer.

The int8 kernels are meant to give the fake-quant model's codes to within a rounding
(1 LSB). Some engine kernels do not on some weights: AVX2 code paths that add pairs of
u8 x s8 products in 16 bits saturate when large activations meet large weights, which
trained depthwise convolutions have after BatchNorm folding. So the backend runs both
graphs on the calibration batches and compares, for every int8 op with an int8 output,
its codes with the fake-quant model's at the same point (the quantizer that reads it),
in LSBs of that grid. A layer disagrees when more than 1% of its codes are over
`FAR_LSB` away: far beyond the rounding drift a deep network accumulates (a few LSB),
well within what saturation does (tens to hundreds). A kernel whose int32 result is
scaled straight to float (its result read by float ops: a BatchNorm after the ReLU, a
sigmoid) is compared with the fake-quant op's own float output, in LSBs of an 8-bit grid
spanning that output (its largest magnitude / 127): the grid the next quantized op would
see it on, so float and int8 outputs are held to the same standard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...ir.inputs import split_batch
from ...ir.inputs import positional
from ...quant import quantizer_of
from .lowering import CODE_OPS, RELUS

FAR_LSB = 8.0          # codes further apart than this are not a rounding difference
MAX_FAR_SHARE = 0.01   # a layer may have this share of them (isolated outliers)


@dataclass
class LayerAgreement:
    layer: str          # the fake-quant graph's conv / linear / add / cat node
    max_lsb: float      # the largest |int8 code - fake-quant code|
    far_share: float    # the share of codes more than FAR_LSB apart

    @property
    def agrees(self) -> bool:
        return self.far_share <= MAX_FAR_SHARE

    def __str__(self) -> str:
        return (f"{self.layer}: {self.far_share:.1%} of codes more than {FAR_LSB:g} LSB from the fake-quant "
                f"model (up to {self.max_lsb:.0f})")


def layer_agreement(gm: fx.GraphModule, lowered: fx.GraphModule, batches) -> list[LayerAgreement]:
    """Every int8 op's agreement with the fake-quant graph on `batches`, in graph order."""
    pairs = _pairs(gm, lowered)
    worst: dict[str, tuple[float, float, int]] = {}
    for batch in batches:   # the sample api._run_batches kept
        args, kwargs = split_batch(batch)
        inputs = positional(gm, args, kwargs)
        ours = _Recorder(lowered, {new for new, _, _ in pairs.values()}).values(inputs)
        theirs = _Recorder(gm, {old for _, old, _ in pairs.values()}).values(inputs)
        for layer, (new, old, scale) in pairs.items():
            if new not in ours or old not in theirs or ours[new].numel() != theirs[old].numel():
                continue
            mine, reference = ours[new], theirs[old].double().reshape(-1)
            if mine.is_quantized:
                gap = (mine.dequantize().double().reshape(-1) - reference).abs() / scale
            elif old == layer:   # a float-output kernel against the fake-quant op's float output
                unit = max(float(reference.abs().max()) / 127, 1e-30)
                gap = (mine.double().reshape(-1) - reference).abs() / unit
            else:
                continue
            top, far, n = worst.get(layer, (0.0, 0.0, 0))
            worst[layer] = (max(top, float(gap.max())), far + float((gap > FAR_LSB).sum()), n + gap.numel())
    return [LayerAgreement(layer, top, far / max(n, 1)) for layer, (top, far, n) in worst.items()]


def _pairs(gm: fx.GraphModule, lowered: fx.GraphModule) -> dict[str, tuple[str, str, float]]:
    """{fake-quant op node: (int8 node name in `lowered`, the node in `gm` it is compared with,
    the quantizer's grid scale)}: the quantizer that reads the op, or, for a kernel with a float
    output, the op itself (scale 0: the unit comes from the output, see the module doc)."""
    new_by_target = {str(n.target): n.name for n in lowered.graph.nodes if n.op == "call_module"}
    pairs = {}
    for node in gm.graph.nodes:
        new = new_by_target.get(f"int8.{node.name}")
        if new is None:
            continue
        quantizer = _reader(gm, node)
        if quantizer is not None:
            pairs[node.name] = (new, quantizer.name, float(gm.get_submodule(quantizer.target).scale.reshape(-1)[0]))
        else:
            pairs[node.name] = (new, node.name, 0.0)
    return pairs


def _reader(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The activation quantizer whose grid `node`'s int8 kernel writes its codes on: one that
    reads it directly, or through the ops the lowering carries codes through (views, a
    ReLU fused into the kernel), as `Lowering.output_grid` follows them."""
    users = list(node.users)
    quantizers = [u for u in users if quantizer_of(gm, u, "activation") is not None]
    if users and len(quantizers) == len(users):
        return quantizers[0]
    if len(users) == 1 and users[0].op == "call_function" and users[0].args[0] is node \
            and (users[0].target in CODE_OPS or users[0].target in RELUS):
        return _reader(gm, users[0])
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.seen[n.name] = out.detach().clone()   # a later in-place op (add_, relu_) would change it
        return out

    def values(self, inputs) -> dict:
        with torch.no_grad():
            self.run(*inputs)
        return self.seen
