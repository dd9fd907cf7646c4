"""How far a run's outputs and gradients are from the model's own, in one process.

A split, compiled or distributed run is checked by the largest absolute difference from the
eager model (outputs leaf by leaf; gradients parameter by parameter, by name). Torch only, so
the command line can compare outputs without loading the pipelining runtime.
"""
from __future__ import annotations

import torch

from ..errors import FxoptError


def max_difference(expected, actual) -> float:
    """max |expected - actual| over the tensor leaves of two outputs (0.0 for no elements);
    an FxoptError if they do not have the same number of leaves."""
    leaves_e = torch.utils._pytree.tree_leaves(expected)
    leaves_a = torch.utils._pytree.tree_leaves(actual)
    if len(leaves_e) != len(leaves_a):
        raise FxoptError(f"the compiled run gave {len(leaves_a)} outputs, the model {len(leaves_e)}",
                         hint="a pass changed what the model returns: rerun with verify=True to find it")
    return max((float((e.double() - a.double()).abs().max()) for e, a in zip(leaves_e, leaves_a)
                if isinstance(e, torch.Tensor) and e.numel()), default=0.0)


def model_gradients(model: torch.nn.Module, inputs: tuple, loss_fn, target) -> dict:
    """{parameter name: gradient} of one forward + backward of `model` on the whole batch."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(*inputs), target).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def max_gradient_difference(per_stage: list[dict], single: dict) -> float:
    """max |pipeline - single| over every parameter, where `per_stage` holds each stage's
    {name: gradient} and `single` the model's (model_gradients). A weight two stages read is
    held (and trained) by both, so its stage gradients are summed first. FxoptError if the
    names differ: a pass before the split renamed or folded weights."""
    pipeline: dict[str, torch.Tensor] = {}
    for grads in per_stage:
        for name, g in grads.items():
            pipeline[name] = pipeline[name] + g if name in pipeline else g
    unknown = sorted(set(pipeline) - set(single))
    missing = sorted(set(single) - set(pipeline))
    if unknown or missing:
        raise FxoptError(f"the stages' parameters do not match the model's: unknown {unknown[:5]}, "
                         f"missing {missing[:5]}",
                         hint="a pass renamed or folded weights: run --train with -p \"\"")
    return max((float((pipeline[n].double() - g.double()).abs().max()) for n, g in single.items()), default=0.0)
