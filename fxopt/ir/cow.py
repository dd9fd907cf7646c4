"""Copy-on-write copies of a model: the tracer's private model costs no memory.

fxopt never mutates the user's model, so it traces, checks and rewrites a copy. A
deep copy doubles the memory of the weights (a 7B model would need twice its size
to compress). `cow_copy` copies the module tree but gives every parameter and buffer
a copy-on-write clone (`torch._lazy_clone`): both tensors read the same memory until
one of them is written, and the write then copies only that tensor. So nothing is
copied to trace, analyse or prune (pruning makes new, smaller tensors), the compiled
graph owns its weights (finetuning the graph materialises what it trains, never
touching the model), and a model the user trains after compiling leaves the graph as
it was compiled. `tracer_copy` is that copy as the tracer wants it: without the
user's hooks (see `_without_user_hooks`).
"""
from __future__ import annotations

import copy
import itertools
import warnings

import torch

__all__ = ["cow_copy", "cow_tensor", "storage_key", "tracer_copy"]


def cow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are copy-on-write clones of
    the model's (tied weights stay tied: each tensor is cloned once)."""
    memo: dict[int, object] = {}
    copied = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            clone = cow_tensor(tensor)
            if clone is not None:
                memo[id(tensor)] = clone
            else:
                copied += tensor.numel() * tensor.element_size()
    if copied >> 20:   # a MiB or more copied for real: the memory it costs is said
        warnings.warn(f"fxopt.trace: {copied >> 20} MiB of the model's tensors cannot be shared copy-on-write "
                      "(memory torch does not own, e.g. memory-mapped weights, or tensor subclasses) and "
                      "were copied", stacklevel=4)
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


def tracer_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The tracer's private copy of `model`: copy-on-write weights, no user hooks."""
    return _without_user_hooks(cow_copy(model))


def _without_user_hooks(copied: torch.nn.Module) -> torch.nn.Module:
    """The tracer's copy without the user's hooks. Backward hooks act on gradients of the
    user's module and, traced, leave a `view_as` per hooked output in the graph. Forward
    hooks are the user's instrumentation: run while tracing they would see fake tensors,
    and the compiled model would not run them anyway. torch's own hooks that compute the
    model (nn.utils.prune masks, weight_norm, spectral_norm) stay. What was removed is
    said in a warning: a hook that changes outputs belongs in the module's forward."""
    removed = []
    for name, module in copied.named_modules():
        module._backward_hooks.clear()
        module._backward_pre_hooks.clear()
        module._is_full_backward_hook = None
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if not _computes_the_model(hook):
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
                    getattr(module, "_forward_hooks_always_called", {}).pop(key, None)
                    removed.append(name or "<root>")
    if removed:
        shown = ", ".join(sorted(set(removed))[:5]) + (" ..." if len(set(removed)) > 5 else "")
        warnings.warn(f"fxopt.trace: {len(removed)} forward hook(s) of the model ({shown}) are not part of the "
                      "compiled graph and did not run while tracing; a hook that changes outputs must be "
                      "folded into the module's forward", stacklevel=4)
    return copied


def _computes_the_model(hook) -> bool:
    """torch's hooks that are part of the computation, not instrumentation."""
    import importlib

    prune, weight_norm, spectral_norm = (importlib.import_module(f"torch.nn.utils.{name}")   # modules, not
                                         for name in ("prune", "weight_norm", "spectral_norm"))  # the functions
    return isinstance(hook, (prune.BasePruningMethod, weight_norm.WeightNorm, spectral_norm.SpectralNorm))
