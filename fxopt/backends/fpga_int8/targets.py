"""The graph targets the integer lowering knows, grouped by op family.

One place for the aten ops (and the torch / operator functions a hand-built graph may
hold) that each family of the lowering takes: the op-family modules key their handlers
by these sets in LOWERINGS, the output-form search follows CLAMPS and MOVES, and the reference
snaps the biases of CONVS and LINEARS.
"""
from __future__ import annotations

import operator

import torch

from ...ir.registry import OpRegistry

aten = torch.ops.aten
LOWERINGS = OpRegistry("fpga-int8 lowering")   # each op family registers its handlers here

CLAMPS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
          aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default, torch.relu}
PERMUTES = {aten.transpose.int, aten.permute.default}
SLICES = {aten.slice.Tensor, aten.select.int}
MOVES = {aten.max_pool2d.default, aten.flatten.using_ints, aten.reshape.default, aten.view.default,
         aten._unsafe_view.default, aten.dropout.default, aten.clone.default, aten.contiguous.default,
         aten.alias.default, aten.detach.default, torch.flatten, aten.unsqueeze.default, aten.squeeze.dim,
         *PERMUTES, *SLICES}
CONVS = {aten.conv2d.default, aten.convolution.default}
LINEARS = {aten.linear.default}
MATMULS = {aten.matmul.default, aten.bmm.default, torch.matmul}
ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
CATS = {aten.cat.default, torch.cat}
EMBEDDINGS = {aten.embedding.default}
SIZE_READS = {aten.sym_size.int, aten.size.default}       # read a tensor's size, not its values
MAX_POOLS = {aten.max_pool2d.default}
AVG_POOLS = {aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim}
SQUEEZES = {aten.unsqueeze.default, aten.squeeze.dim}
RESHAPES = {aten.flatten.using_ints, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
            torch.flatten, *SQUEEZES}
ALIASES = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
           aten.detach.default}
