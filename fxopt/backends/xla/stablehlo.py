"""GraphModule -> StableHLO text, with every weight an argument of the function.

torch-mlir's FX importer freezes the tensors an ExportedProgram holds (parameters,
buffers, lifted constants) into `dense_resource` literals, which XLA's compiler
rejects; and an artefact whose weights are arguments keeps them in a safetensors
file beside the program instead of in megabytes of MLIR text. So the graph is
wrapped as `main(*weights, *inputs)`: a module whose forward swaps the graph's
tensors for its arguments (torch.func.functional_call) and calls the graph.
The wrapper holds the graph outside its module tree, so torch.export sees no
parameters of its own and every tensor arrives as a user input. (The few small
constants torch-mlir itself makes while lowering are inlined: `inline_resources`.)
Before that, `legalize` restates what torch-mlir lowers wrongly.

The flat argument order is the contract with the runtime and the artefact:
weights (by attribute path, in `weight_names` order) then the tensor leaves of the
inputs (torch.utils._pytree order); the outputs are the tensor leaves of the
graph's result, and `out_structure` rebuilds it (a tuple, a dict, a Hugging Face
ModelOutput). The structures are read off the example inputs and the traced call
rather than `gm._in_spec`, so graphs without pytree codegen work the same.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ...errors import UnsupportedError
from ...ir import fetch_attr
from ...ir.meta import INPUT_SHAPES, TensorInfo
from .legalize import legalize

FUNCTION = "main"
_WIDE = {torch.float64, torch.int64, torch.uint64, torch.complex128}  # need jax's x64 mode


@dataclass
class Program:
    """One exported function: its StableHLO text and what its arguments are."""

    text: str
    weight_names: list[str]
    weights: list[torch.Tensor]
    inputs: list[tuple[tuple[int, ...], torch.dtype]]   # flat input leaves: (shape, dtype)
    outputs: list[tuple[tuple[int, ...], torch.dtype]]
    in_structure: "Structure"
    out_structure: "Structure"
    input_names: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    dynamic_dims: list[list[int]] = field(default_factory=list)   # per input: dims the model lets vary

    @property
    def x64(self) -> bool:
        """Whether any argument or output is 64-bit (jax must run with x64 enabled)."""
        infos = [(tuple(w.shape), w.dtype) for w in self.weights] + self.inputs + self.outputs
        return any(dtype in _WIDE for _, dtype in infos)


def export_stablehlo(gm: fx.GraphModule, example_inputs: tuple) -> Program:
    """Export `gm` called on `example_inputs` as StableHLO `main(*weights, *inputs)`."""
    gm = legalize(gm)  # a copy, where torch-mlir needs the graph said differently
    flat_inputs, in_structure = Structure.of(tuple(example_inputs))
    _check_tensors(flat_inputs, "example input")
    weights = graph_tensors(gm)
    record: dict = {}
    wrapper = _Functional(gm, list(weights), in_structure, record)
    args = tuple(w.detach() for w in weights.values()) + tuple(flat_inputs)
    seconds = {}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, args, strict=False)
    except Exception as exc:
        raise _failure("torch.export of the functional graph", exc) from exc
    seconds["export"] = time.perf_counter() - start
    start = time.perf_counter()
    text = _to_stablehlo(program)
    seconds["stablehlo"] = time.perf_counter() - start
    return Program(text=text, weight_names=list(weights), weights=list(weights.values()),
                   inputs=[_info(t) for t in flat_inputs], outputs=record["out_infos"],
                   in_structure=in_structure, out_structure=record["out_structure"],
                   input_names=_input_names(gm, len(flat_inputs)), seconds=seconds,
                   dynamic_dims=_dynamic_dims(gm, len(flat_inputs)))


def _dynamic_dims(gm: fx.GraphModule, count: int) -> list[list[int]]:
    """Per flat tensor input, the dims traced as dynamic (the program itself is static)."""
    infos = [i for i in gm.meta.get(INPUT_SHAPES, ()) if isinstance(i, TensorInfo)]
    return [list(i.dynamic) for i in infos] if len(infos) == count else [[] for _ in range(count)]


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads, by attribute path: get_attr targets (parameters,
    buffers and plain tensor attributes such as lifted constants) and the parameters
    and buffers of called submodules. Stale weights no node reads are left out.
    Tied weights keep one name each (the runtime uploads a shared tensor once)."""
    named: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                named.setdefault(node.target, value)
        elif node.op == "call_module":
            sub = gm.get_submodule(node.target)
            for name, value in [*sub.named_parameters(prefix=node.target, remove_duplicate=False),
                                *sub.named_buffers(prefix=node.target, remove_duplicate=False)]:
                named.setdefault(name, value)
    return named


@dataclass(frozen=True)
class Structure:
    """A pytree's structure with its None leaves set aside: torch's pytree makes None
    a leaf, but a program takes and returns tensors only, so a None input or output
    is part of the structure (it must be None again at every call)."""

    spec: TreeSpec
    nones: tuple[int, ...] = ()

    @classmethod
    def of(cls, tree) -> tuple[list, "Structure"]:
        """(the non-None leaves, the structure) of `tree`."""
        leaves, spec = tree_flatten(tree)
        nones = tuple(i for i, leaf in enumerate(leaves) if leaf is None)
        return [leaf for leaf in leaves if leaf is not None], cls(spec, nones)

    def rebuild(self, tensors):
        """The tree with `tensors` in the non-None places."""
        values = iter(tensors)
        leaves = [None if i in self.nones else next(values) for i in range(self.spec.num_leaves)]
        return tree_unflatten(leaves, self.spec)


class _Functional(torch.nn.Module):
    """forward(*weights, *flat_inputs) -> flat outputs of `gm`, its tensors replaced by
    the weight arguments. Records the output structure while torch.export traces it."""

    def __init__(self, gm: fx.GraphModule, names: list[str], in_structure: "Structure", record: dict):
        super().__init__()
        # In a tuple: not registered as a submodule, so torch.export lifts none of gm's
        # tensors. `record` gets what the traced call returned; the caller keeps its own
        # reference, since torch.export restores the module's attributes (copies of them)
        # after tracing.
        self._held = (gm, record)
        self.names = names
        self.in_structure = in_structure

    def forward(self, *flat):
        count = len(self.names)
        tensors = dict(zip(self.names, flat[:count]))
        args = self.in_structure.rebuild(flat[count:])
        result = torch.func.functional_call(self._held[0], tensors, tuple(args),
                                            tie_weights=False, strict=False)
        leaves, self._held[1]["out_structure"] = Structure.of(result)
        _check_tensors(leaves, "output")
        self._held[1]["out_infos"] = [_info(t) for t in leaves]
        return tuple(leaves)


def _to_stablehlo(program) -> str:
    """torch-mlir's StableHLO for `program`, its diagnostics caught for the error
    (torch-mlir prints them to stderr and raises with a banner only)."""
    from torch_mlir import fx as torch_mlir_fx, ir
    from torch_mlir.dialects import torch as torch_dialect
    from torch_mlir.extras.fx_importer import FxImporter

    context = ir.Context()
    torch_dialect.register_dialect(context)
    diagnostics: list[str] = []

    def collect(diagnostic) -> bool:
        if str(diagnostic.severity).endswith("ERROR"):
            diagnostics.append(str(diagnostic.message))
        return True  # handled: not printed

    handler = context.attach_diagnostic_handler(collect)
    try:
        module = torch_mlir_fx.export_and_import(program, output_type="stablehlo", func_name=FUNCTION,
                                                 fx_importer=FxImporter(context=context))
    except Exception as exc:
        raise _failure("torch-mlir's lowering to StableHLO", exc, diagnostics) from exc
    finally:
        handler.detach()
    return inline_resources(str(module))


_RESOURCE_USE = re.compile(r'dense_resource<"?([^>"]+)"?>')
_RESOURCE_BLOB = re.compile(r'^\s*"?([^:"\s]+)"?\s*:\s*"0x([0-9A-Fa-f]*)"', re.M)


def inline_resources(text: str) -> str:
    """`text` with every `dense_resource<name>` constant replaced by the same data
    inline (`dense<"0x...">`), and the resource section dropped.

    Weights are arguments, so what is left are small constants torch-mlir makes
    while lowering (e.g. the index tensors of a gather: convnext's 1x768x1x1
    int64); XLA rejects the dense_resource form. A blob is its alignment (4 bytes)
    then the raw little-endian data, which is exactly what the hex form holds."""
    if "dense_resource<" not in text:
        return text
    body, _, resources = text.partition("{-#")
    blobs = {name: data[8:] for name, data in _RESOURCE_BLOB.findall(resources)}
    missing = sorted(set(_RESOURCE_USE.findall(body)) - set(blobs))
    if missing:
        raise UnsupportedError(
            f"backend 'xla': the StableHLO program uses dense_resource constants without data: {missing[:3]}",
            hint="report it with the model; run it with backend='eager' meanwhile")
    return _RESOURCE_USE.sub(lambda m: f'dense<"0x{blobs[m.group(1)]}">', body).rstrip() + "\n"


def _failure(stage: str, exc: Exception, diagnostics: list[str] = ()) -> UnsupportedError:
    """The error's own words: torch-mlir's diagnostics when it gave some (its
    exception is a banner), else the first lines of the message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    shown = list(dict.fromkeys(diagnostics or lines))
    detail = "; ".join(shown[:3]) + (" ..." if len(shown) > 3 else "")
    return UnsupportedError(
        f"backend 'xla': {stage} failed: {type(exc).__name__}: {detail}",
        where=stage,
        hint="the graph uses an op or construct that StableHLO export does not handle; run it with "
             "backend='eager' (or 'inductor'), or rewrite the op; the full error is chained below")


def _check_tensors(leaves: list, what: str) -> None:
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise UnsupportedError(
                f"backend 'xla': {what} {i} is a {type(leaf).__name__}, not a tensor",
                hint="XLA programs take and return tensors only: pass python values as "
                     "concrete_args when tracing, or return tensors")


def _info(t: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(int(s) for s in t.shape), t.dtype


def _input_names(gm: fx.GraphModule, count: int) -> list[str]:
    """The model's argument names when they map one to one onto the flat inputs,
    else input0, input1, ... (a nested or None input has no single name)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    names = list(info.orig_args) if info is not None else \
        [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return names if len(names) == count else [f"input{i}" for i in range(count)]


def to_numpy(t: torch.Tensor):
    """A numpy array of `t` (bfloat16 through ml_dtypes, which jax ships)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(array) -> torch.Tensor:
    """A torch tensor owning a copy of `array` (a jax or numpy array)."""
    import numpy as np

    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32', the numpy name the artefact uses."""
    return str(dtype).removeprefix("torch.")
