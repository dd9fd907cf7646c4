"""Which ops mixed-precision keeps in fp32, which follow their input, and the classifier.

FP32_RULES is the rule table: ATen op name (the overload packet, without `aten.`) -> why
it stays fp32. It is a plain dict, so a program extends (or trims) it before compiling:

    from fxopt.passes.mixed_precision import FP32_RULES
    FP32_RULES["my_custom_op"] = "custom reduction: sums a whole row"
    del FP32_RULES["batch_norm"]       # run eval-mode BatchNorm in 16 bits too

(the `keep` option does the same per compile, by op name or module path).

FOLLOW_OPS are exact in any precision (views, data movement, max / relu, `zeros_like`):
they run in the precision their input arrives in, so no cast is put around them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ...ir.graph import fqn_matches, module_path
from ...ir.meta import TENSOR, TensorInfo
from ...ir.nodes import arg_position, op_name

FP32_RULES: dict[str, str] = {}


def _rows(reason: str, names: str) -> None:
    for name in names.split():
        FP32_RULES[name] = reason


_rows("softmax: exponentials normalised by a row sum; 16-bit logits shift every probability",
      "softmax _softmax log_softmax _log_softmax _safe_softmax")
_rows("normalisation: mean and variance over many values need fp32 range and precision",
      "layer_norm native_layer_norm group_norm native_group_norm batch_norm native_batch_norm "
      "_native_batch_norm_legit _native_batch_norm_legit_no_training _native_batch_norm_legit_functional "
      "instance_norm rms_norm _fused_rms_norm")
_rows("reduction: accumulates many values, its rounding error grows with their number",
      "mean sum nansum prod var std var_mean std_mean cumsum cumprod logsumexp logcumsumexp norm "
      "linalg_vector_norm linalg_norm frobenius_norm adaptive_avg_pool1d adaptive_avg_pool2d "
      "adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d cdist dist trace")
_rows("loss: a reduction over log / exp terms",
      "cross_entropy_loss nll_loss nll_loss_forward nll_loss2d nll_loss2d_forward mse_loss l1_loss "
      "smooth_l1_loss huber_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div "
      "soft_margin_loss multi_margin_loss multilabel_margin_loss margin_ranking_loss "
      "hinge_embedding_loss cosine_embedding_loss poisson_nll_loss triplet_margin_loss ctc_loss")
_rows("wide-range math: exp / log / pow overflow or lose digits in 16 bits",
      "exp exp2 expm1 log log1p log2 log10 pow reciprocal rsqrt erfinv sinh cosh tan acos asin")

FOLLOW_OPS: frozenset[str] = frozenset((
    "getitem view _unsafe_view reshape transpose permute expand expand_as slice select squeeze "
    "unsqueeze flatten unflatten contiguous clone alias detach t narrow split split_with_sizes "
    "chunk unbind cat concat stack repeat tile flip roll index_select gather index take "
    "pixel_shuffle pixel_unshuffle channel_shuffle constant_pad_nd relu max_pool1d max_pool2d "
    "max_pool3d max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d "
    "adaptive_max_pool2d adaptive_max_pool3d max amax min amin maximum minimum neg abs where "
    "dropout lift_fresh_copy zeros_like ones_like full_like empty_like new_zeros new_ones new_full "
    "new_empty").split())

CASTS: frozenset[str] = frozenset(("to", "_to_copy"))

FLOAT32 = torch.float32


@dataclass(frozen=True)
class Decision:
    """How one node is computed. kind:
    low    in the 16-bit dtype: its fp32 inputs are cast down, its constants stored converted;
    fp32   as the model has it (inputs cast back up to their traced dtype); `reason` says why;
    follow exact in any precision: runs in the precision its input arrives in;
    asis   reads its inputs as they come, no casts (casts, non-float results, in-place ops);
    orig   no floating-point output: reads every input in its traced dtype (asserts)."""

    node: fx.Node
    kind: Literal["low", "fp32", "follow", "asis", "orig"]
    reason: str = ""
    error: float | None = None     # auto: the measured relative output error in 16 bits


def leaves(info) -> list:
    """The TensorInfo leaves of a node's recorded value (a tensor, or a tuple of them)."""
    if isinstance(info, TensorInfo):
        return [info]
    if isinstance(info, (tuple, list)):
        return [leaf for item in info for leaf in leaves(item)]
    return []


def _has_fp32(info) -> bool:
    return any(leaf.dtype == FLOAT32 for leaf in leaves(info))


def is_constant(node: fx.Node) -> bool:
    return node.op == "get_attr"


def keep_match(node: fx.Node, patterns) -> str | None:
    """The first `keep` pattern naming this op (its ATen name, with or without `aten.`), its
    module path or one of its weights' FQNs; None when none does."""
    names = [op_name(node), f"aten.{op_name(node)}"]
    paths = [module_path(node)] + [str(a.target) for a in node.all_input_nodes if is_constant(a)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
        if any(p and fqn_matches(p, pattern) for p in paths):
            return pattern
    return None


def classify(gm: fx.GraphModule, keep=()) -> list[Decision]:
    """A Decision per computing node (call_function / call_module / call_method), in graph order."""
    return [_decide(node, keep) for node in gm.graph.nodes
            if node.op in ("call_function", "call_module", "call_method")]


def _decide(node: fx.Node, keep) -> Decision:
    out = node.meta.get(TENSOR)
    float_in = any(_has_fp32(a.meta.get(TENSOR)) for a in node.all_input_nodes)
    name = op_name(node)
    if not leaves(out):
        return Decision(node, "orig" if out is None and float_in else "asis")
    if node.op == "call_module":
        return _fp32_if(node, out, float_in, "leaf module call: runs as traced, its weights stay fp32")
    if node.op == "call_method":
        return _fp32_if(node, out, float_in, f"method call .{node.target}(): run canonicalize first to "
                                             "get ATen ops this pass knows")
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return Decision(node, "asis")     # in-place: writes into its input, whatever its dtype
    if name in CASTS:
        return Decision(node, "follow" if _keeps_dtype(node, out) else "asis")
    if not any(leaf.dtype.is_floating_point for leaf in leaves(out)):
        return Decision(node, "asis")
    if not _has_fp32(out):
        return Decision(node, "fp32", f"computes in {leaves(out)[0].dtype} (not float32): left as traced")
    if not float_in:
        return Decision(node, "fp32", "creates a float32 tensor from no floating-point input; its users cast it")
    if name in FOLLOW_OPS:
        return Decision(node, "follow")
    pattern = keep_match(node, keep)
    if pattern is not None:
        return Decision(node, "fp32", f"matches keep pattern '{pattern}'")
    if name in FP32_RULES:
        return Decision(node, "fp32", FP32_RULES[name])
    return Decision(node, "low")


def _fp32_if(node: fx.Node, out, float_in: bool, reason: str) -> Decision:
    return Decision(node, "fp32", reason) if _has_fp32(out) or float_in else Decision(node, "asis")


def _keeps_dtype(node: fx.Node, out) -> bool:
    """A cast op whose traced input and output dtypes agree (`x.float()` on an fp32 x): it is
    a no-op in the model, so it follows its (possibly 16-bit) input."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src, dst = leaves(source.meta.get(TENSOR)) if source is not None else [], leaves(out)
    return len(src) == 1 and len(dst) == 1 and src[0].dtype == dst[0].dtype


def with_low_dtype(node: fx.Node, args, kwargs, low: torch.dtype):
    """(args, kwargs) with an explicit `dtype=float32` argument turned into `low`: a low op that
    names its result dtype (sum(..., dtype=float32) let through by a trimmed table)."""
    index = arg_position(node, None, "dtype")   # None: the op takes no dtype
    if index is None:
        return args, kwargs
    if kwargs.get("dtype") == FLOAT32:
        kwargs = {**kwargs, "dtype": low}
    elif len(args) > index and args[index] == FLOAT32:
        args = tuple(args[:index]) + (low,) + tuple(args[index + 1:])
    return args, kwargs
