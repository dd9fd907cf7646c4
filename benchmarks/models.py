"""The benchmark model zoo: real models (random weights, nothing downloaded) and
synthetic graphs of a chosen size.

Every entry builds `(model, example_inputs)` on demand, in eval mode:

- `resnet50`: torchvision's ResNet-50 (weights=None), input 1x3x224x224.
- `transformer-24`: a 24-layer `nn.TransformerEncoder` (d_model 256, 4 heads,
  batch_first), input 1x128x256.
- `synthetic-1k` / `-10k` / `-50k`: a chain of tiny residual blocks
  (conv1x1 -> BatchNorm -> ReLU -> add) on a 1x4x2x2 tensor, sized so the traced
  graph has about that many nodes. Each block traces to 11 nodes (7 get_attr:
  conv weight/bias, BN weight/bias/mean/var/num_batches_tracked; conv, batch_norm,
  relu, add) plus 3 for the input, the export guard and the output. The op mix
  stays the same at every size, so time per node is comparable across sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

NODES_PER_BLOCK = 11
FIXED_NODES = 3


class TinyBlock(nn.Module):
    """x + relu(bn(conv1x1(x))): cheap ops, so graph size (not arithmetic) dominates."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class SyntheticChain(nn.Module):
    """`blocks` TinyBlocks in a row."""

    def __init__(self, blocks: int, channels: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*(TinyBlock(channels) for _ in range(blocks)))

    def forward(self, x):
        return self.blocks(x)


def blocks_for(nodes: int) -> int:
    """The number of TinyBlocks whose traced graph has about `nodes` nodes."""
    return max(1, round((nodes - FIXED_NODES) / NODES_PER_BLOCK))


def synthetic(nodes: int, channels: int = 4):
    """A SyntheticChain with about `nodes` traced nodes, and its input."""
    torch.manual_seed(0)
    model = SyntheticChain(blocks_for(nodes), channels).eval()
    return model, (torch.randn(1, channels, 2, 2),)


RESIDUAL_DAMPING = 0.25


def with_realistic_statistics(model: nn.Module, batches) -> nn.Module:
    """A random-weight torchvision model made to behave numerically like a trained one.

    Why: with torchvision's random initialisation and default BatchNorm statistics
    (mean 0, var 1) a mobilenet_v2's logits vanish (~1e-9), so any 8-bit grid rounds
    them to zero; and with statistics alone its residual branches, each normalised to
    unit variance, make the net chaotic: 8-bit rounding noise alone takes the logits'
    cosine to fp32 down to 0.92 (trained nets keep top-1 within a point at 8 bits), so
    two correct int8 implementations differing by one-code rounding flips disagree
    on top-1, and logit margins are so thin that top-1 measures tie-breaking.
    So: (1) BatchNorm statistics come from `batches` (train-mode passes, cumulative
    averages); (2) the last BatchNorm of every residual branch (ResNet blocks,
    MobileNetV2 inverted residuals with a skip) has its weight scaled by
    RESIDUAL_DAMPING, as trained nets' branches are small next to their skip path.
    Measured (mobilenet_v2, 96x96): 8-bit fake-quant vs fp32 cosine 0.918 undamped,
    0.998 at 0.5, 0.9996 at 0.25 (resnet18: 0.997, 0.9998, 0.9999).
    Returns `model` (changed in place) in eval mode.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None   # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
        for bn in _residual_branch_ends(model):
            bn.weight.mul_(RESIDUAL_DAMPING)
    return model.eval()


def _residual_branch_ends(model: nn.Module) -> list[nn.Module]:
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    ends = []
    for block in model.modules():
        if isinstance(block, BasicBlock):
            ends.append(block.bn2)
        elif isinstance(block, Bottleneck):
            ends.append(block.bn3)
        elif isinstance(block, InvertedResidual) and block.use_res_connect:
            ends.append([m for m in block.conv.modules() if isinstance(m, nn.BatchNorm2d)][-1])
    return ends


def resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def transformer_encoder(layers: int = 24, d_model: int = 256, heads: int = 4, seq: int = 128):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=heads, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    return model, (torch.randn(1, seq, d_model),)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], tuple]
    description: str
    synthetic_nodes: int | None = None   # the target size, for the synthetic graphs


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("resnet50", resnet50, "torchvision ResNet-50, 1x3x224x224"),
    ZooEntry("transformer-24", transformer_encoder,
             "nn.TransformerEncoder, 24 layers, d_model 256, 4 heads, 1x128x256"),
    *(ZooEntry(f"synthetic-{k}k", (lambda n=k * 1000: synthetic(n)),
               f"{blocks_for(k * 1000)} x (conv1x1, BN, ReLU, add) on 1x4x2x2", k * 1000)
      for k in (1, 10, 50)),
)}


def get(name: str) -> ZooEntry:
    """The zoo entry called `name` (KeyError lists the known names)."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(ZOO)}") from None
