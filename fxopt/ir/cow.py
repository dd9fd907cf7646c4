"""Copy-on-write copies of a model: the tracer's private model costs no memory.

fxopt never mutates the user's model, so it traces, checks and rewrites a copy. A
deep copy doubles the memory of the weights (a 7B model would need twice its size
to compress). `cow_copy` copies the module tree but gives every parameter and buffer
a copy-on-write clone (`torch._lazy_clone`): both tensors read the same memory until
one of them is written, and the write then copies only that tensor. So nothing is
copied to trace, analyse or prune (pruning makes new, smaller tensors), the compiled
graph owns its weights (finetuning the graph materialises what it trains, never
touching the model), and a model the user trains after compiling leaves the graph as
it was compiled.
"""
from __future__ import annotations

import copy
import itertools

import torch

__all__ = ["cow_copy", "cow_tensor", "storage_key"]


def cow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are copy-on-write clones of
    the model's (tied weights stay tied: each tensor is cloned once)."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            clone = cow_tensor(tensor)
            if clone is not None:
                memo[id(tensor)] = clone
    return copy.deepcopy(model, memo)


def cow_tensor(tensor: torch.Tensor):
    """A copy-on-write clone of a plain dense tensor or Parameter (same type, dtype,
    device, strides and requires_grad), or None where one cannot be made (tensor
    subclasses, quantized or sparse tensors, memory torch does not own: those are copied)."""
    if not hasattr(torch, "_lazy_clone") or type(tensor) not in (torch.Tensor, torch.nn.Parameter) \
            or tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        return None
    try:
        clone = torch._lazy_clone(tensor.detach())
    except RuntimeError:   # memory torch does not own (a memory-mapped file): it cannot be shared so
        return None
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(clone, requires_grad=tensor.requires_grad)
    return clone.requires_grad_(tensor.requires_grad) if tensor.is_leaf else clone


def storage_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's memory (tied weights share it) without asking for its
    data pointer: `data_ptr()` would make a copy-on-write tensor copy itself."""
    return (tensor.device, tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape))
