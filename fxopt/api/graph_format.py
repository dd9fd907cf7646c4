"""A GraphModule as JSON plus named tensors, and back, with no pickle and no code run.

torch.export's `.pt2` would inline the modules fxopt keeps in its graphs (the fake
quantizers a backend lowers to integers, the stages of a split), so a compiled graph
is stored in its own small format instead: every node as data (op, target, args),
targets named as `torch.ops.<ns>.<op>.<overload>` or an allow-listed Python function,
modules as a table of kinds fxopt knows how to rebuild, tensors by their path (the
caller writes them with safetensors). Loading resolves names only against that
allow-list: an unknown target or module kind is an error, never an import.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.utils._pytree import treespec_dumps, treespec_loads

from ..errors import UnsupportedError
from ..ir.meta import INPUT_NAMES, INPUT_RANGES, INPUT_SHAPES, INPUT_SYMBOLS, TensorInfo
from ..quant import FakeQuantize
from ..quant.integer_modules import (LUT_FUNCTIONS, IntegerGELU, IntegerLayerNorm, IntegerLut, IntegerOp,
                                     IntegerSoftmax)
from ..quant.qparams import QSpec

FORMAT = "fxopt.graph/1"
_TORCH_FUNCTIONS = {f"torch.{name}": getattr(torch, name) for name in (
    "_assert", "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum")
    if hasattr(torch, name)}
_KEPT_META = ("nn_module_stack", "stack_trace")


# -- saving ---------------------------------------------------------------------------------------
def graph_to_json(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors by path) for `gm` and every module under it."""
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        if _inside_rebuilt(path, modules):
            continue
        modules[path] = _module_record(path, module, tensors)
    return {"format": FORMAT, "modules": modules, "meta": _graph_meta(gm)}, tensors


def _inside_rebuilt(path: str, modules: dict) -> bool:
    """A submodule that its parent's constructor makes (a quantizer's observer) or that its
    parent rebuilds (an integer op's kernel)."""
    parts = path.split(".")
    return any(modules.get(".".join(parts[:i]), {}).get("kind") == "fake_quantize"
               or (modules.get(".".join(parts[:i]), {}).get("kind") == "integer_op" and parts[i] == "kernel")
               for i in range(1, len(parts)))


def _module_record(path: str, module: torch.nn.Module, tensors: dict) -> dict:
    if isinstance(module, FakeQuantize):
        for name, t in module.state_dict().items():
            if isinstance(t, torch.Tensor):
                tensors[_join(path, name)] = t.detach()
        return {"kind": "fake_quantize", "bits": module.bits, "symmetric": module.symmetric,
                "axis": module.axis, "group_size": module.group_size, "observer": module.observer_kind,
                "role": module.role,
                "channels": int(module.scale.numel()), "learnable": module.learnable,
                "observing": module.observing, "label": module.label}
    if isinstance(module, IntegerOp):
        return {"kind": "integer_op", "op": module.kind, "scale": getattr(module, "scale", None),
                "eps": getattr(module, "eps", None), "function": getattr(module, "function", None),
                "frozen": module.frozen, "tensors": _own_tensors(path, module, tensors)}
    if type(module).__name__ == "GuardsFn":
        return {"kind": "guards"}   # input checks; fxopt's own call checks replace them
    if isinstance(module, fx.GraphModule):
        record = {"kind": "graph", "graph": _graph_record(module), "class_name": type(module).__name__}
    elif type(module) is torch.nn.Module:
        record = {"kind": "container"}
    else:
        raise UnsupportedError(
            f"cannot save module '{path or '<root>'}' of class {type(module).__name__}: fxopt stores "
            "only the modules it builds (graphs, fake quantizers), never the user's classes",
            hint="trace without leaf_modules so the module's ops are in the graph")
    record["tensors"] = _own_tensors(path, module, tensors)
    return record


def _own_tensors(path: str, module: torch.nn.Module, tensors: dict) -> dict:
    """name -> "parameter" | "parameter-frozen" | "buffer" | "constant" for the tensors
    held directly by `module` (constants: plain tensor attributes a get_attr reads)."""
    kinds = {}
    for name, p in module._parameters.items():
        if p is not None:
            kinds[name] = "parameter" if p.requires_grad else "parameter-frozen"
            tensors[_join(path, name)] = p.detach()
    for name, b in module._buffers.items():
        if b is not None:
            kinds[name] = "buffer"
            tensors[_join(path, name)] = b.detach()
    if isinstance(module, fx.GraphModule):
        for node in module.graph.find_nodes(op="get_attr"):
            if "." not in node.target and node.target not in kinds:
                value = getattr(module, node.target)
                if isinstance(value, torch.Tensor):
                    kinds[node.target] = "constant"
                    tensors[_join(path, node.target)] = value.detach()
    return kinds


def _graph_record(gm: fx.GraphModule) -> dict:
    codegen = gm.graph._codegen
    record = {"nodes": [_node_record(n) for n in gm.graph.nodes
                        if not (n.op == "call_module" and n.target == "_guards_fn")]}
    pytree_info = getattr(codegen, "pytree_info", None)
    if pytree_info is not None:
        record["in_spec"] = treespec_dumps(pytree_info.in_spec) if pytree_info.in_spec else None
        record["out_spec"] = treespec_dumps(pytree_info.out_spec) if pytree_info.out_spec else None
        record["orig_args"] = list(pytree_info.orig_args)
    return record


def _node_record(node: fx.Node) -> dict:
    record = {"name": node.name, "op": node.op, "target": _target_name(node),
              "args": _encode(node.args, node), "kwargs": _encode(dict(node.kwargs), node)}
    meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
    if "nn_module_stack" in meta:
        meta["nn_module_stack"] = {k: [str(v[0]), str(v[1] if isinstance(v[1], str) else
                                                       getattr(v[1], "__qualname__", v[1]))]
                                   for k, v in meta["nn_module_stack"].items()}
    if meta:
        record["meta"] = meta
    return record


def _target_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.__name__}"
    for prefix, namespace in (("operator", operator), ("math", math)):
        if getattr(namespace, getattr(target, "__name__", ""), None) is target:
            return f"{prefix}.{target.__name__}"
    for name, fn in _TORCH_FUNCTIONS.items():
        if fn is target:
            return name
    raise UnsupportedError(f"cannot save node '{node.name}': its target {target!r} is not a torch op",
                           hint="only graphs of torch ops (and operator/math functions) can be saved")


def _encode(value, node: fx.Node):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v, node) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, node)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {"torch": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(v, node) for v in (value.start, value.stop, value.step)]}
    raise UnsupportedError(f"cannot save node '{node.name}': an argument of type {type(value).__name__}",
                           hint="only graphs whose arguments are nodes, numbers, strings, dtypes and "
                                "devices can be saved")


def _graph_meta(gm: fx.GraphModule) -> dict:
    shapes = [None if i is None else {"shape": list(i.shape), "dtype": str(i.dtype).removeprefix("torch."),
                                      "device": str(i.device), "dynamic": list(i.dynamic)}
              for i in gm.meta.get(INPUT_SHAPES, ())]
    symbols = [None if dims is None else list(dims) for dims in gm.meta.get(INPUT_SYMBOLS, ())]
    ranges = {k: list(v) for k, v in (gm.meta.get(INPUT_RANGES) or {}).items()}
    return {"input_shapes": shapes, "input_names": list(gm.meta.get(INPUT_NAMES, ())),
            "input_symbols": symbols, "input_ranges": ranges}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- loading --------------------------------------------------------------------------------------
def graph_from_json(document: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule `graph_to_json` described (the inverse, up to node meta)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UnsupportedError("not a saved fxopt graph (format missing or of another version)",
                               hint="load a folder written by fxopt.save")
    records = document["modules"]
    built: dict[str, torch.nn.Module] = {}
    for path in sorted(records, key=lambda p: -p.count(".") if p else 1):   # children first
        built[path] = _build(path, records[path], tensors, built)
    gm = built[""]
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError("the saved root is not a graph", hint="load a folder written by fxopt.save")
    _restore_meta(gm, document.get("meta", {}))
    return gm


def _build(path: str, record: dict, tensors: dict, built: dict) -> torch.nn.Module:
    kind = record.get("kind")
    if kind == "fake_quantize":
        return _fake_quantize(path, record, tensors)
    if kind == "guards":
        return torch.nn.Module()
    if kind == "integer_op":
        return _integer_op(path, record, tensors, built)
    if kind not in ("graph", "container"):
        raise UnsupportedError(f"saved module '{path}' has an unknown kind {kind!r}",
                               hint="load it with the fxopt version that saved it")
    holder = torch.nn.Module()
    for name, tensor_kind in record.get("tensors", {}).items():
        value = _tensor(tensors, _join(path, name))
        if tensor_kind.startswith("parameter"):
            holder.register_parameter(name, torch.nn.Parameter(value, requires_grad=tensor_kind == "parameter"))
        elif tensor_kind == "buffer":
            holder.register_buffer(name, value)
        else:
            setattr(holder, name, value)
    prefix = path + "." if path else ""
    for child_path, child in built.items():
        if child_path.startswith(prefix) and child_path != path and "." not in child_path[len(prefix):]:
            holder.add_module(child_path[len(prefix):], child)
    if kind == "container":
        return holder
    graph = _graph(record["graph"], path)
    name = str(record.get("class_name", ""))
    return fx.GraphModule(holder, graph, class_name=name if name.isidentifier() else "GraphModule")


def _fake_quantize(path: str, record: dict, tensors: dict) -> torch.nn.Module:
    spec = QSpec(bits=int(record["bits"]), symmetric=bool(record["symmetric"]),
                 axis=None if record["axis"] is None else int(record["axis"]),
                 group_size=None if record.get("group_size") is None else int(record["group_size"]))
    fq = FakeQuantize(spec, observer=str(record["observer"]), role=str(record["role"]),
                      channels=int(record["channels"]), learnable=bool(record["learnable"]))
    state = {name: _tensor(tensors, _join(path, name)) for name in fq.state_dict()
             if isinstance(fq.state_dict()[name], torch.Tensor)}
    fq.load_state_dict(state, strict=False)
    fq.observing, fq.label = bool(record["observing"]), str(record.get("label", ""))
    return fq


def _integer_op(path: str, record: dict, tensors: dict, built: dict) -> torch.nn.Module:
    """An integer op (quant.integer_modules) with its saved quantizers; its kernel is rebuilt."""
    op, own = record.get("op"), {name: _tensor(tensors, _join(path, name)) for name in record.get("tensors", {})}
    if op == "softmax":
        module = IntegerSoftmax(float(record["scale"]))
    elif op == "gelu":
        module = IntegerGELU()
    elif op == "layernorm":
        module = IntegerLayerNorm(own["weight"], own["bias"], float(record["eps"]))
    elif op == "lut" and record.get("function") in LUT_FUNCTIONS:
        module = IntegerLut(str(record["function"]))
    else:
        raise UnsupportedError(f"saved module '{path}' is an unknown integer op {op!r}",
                               hint="load it with the fxopt version that saved it")
    for name, value in own.items():
        if name in module._buffers:
            setattr(module, name, value)
    for name in ("input_fq", "output_fq"):
        if getattr(module, name) is not None:
            setattr(module, name, built[_join(path, name)])
    if record.get("frozen"):
        module.freeze()
    return module


def _tensor(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise UnsupportedError(f"the saved weights have no tensor '{key}'",
                               hint="the folder is incomplete or from another model; save it again")
    return tensors[key]


def _graph(record: dict, path: str) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in record["nodes"]:
        args = _decode(spec["args"], env)
        kwargs = _decode(spec["kwargs"], env)
        target = _resolve(spec["target"], path) if spec["op"] == "call_function" else spec["target"]
        node = graph.create_node(spec["op"], target, tuple(args), dict(kwargs), name=spec["name"])
        node.meta.update(spec.get("meta", {}))
        env[spec["name"]] = node
    if record.get("in_spec") is not None or record.get("out_spec") is not None:
        graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            record.get("orig_args", []), _spec(record.get("in_spec")), _spec(record.get("out_spec"))))
    return graph


def _spec(text):
    if text is None:
        return None
    try:
        return treespec_loads(text)
    except Exception as exc:   # a container type (e.g. a Hugging Face ModelOutput) not registered yet
        raise UnsupportedError(f"the saved graph's inputs or outputs use a container type that is not "
                               f"registered here ({exc})",
                               hint="import the library that defines it (e.g. `import transformers`) "
                                    "before fxopt.load") from exc


def _resolve(name: str, path: str):
    parts = name.split(".")
    if parts[:2] == ["torch", "ops"] and len(parts) == 5 and parts[2] != "higher_order":
        packet = getattr(getattr(torch.ops, parts[2]), parts[3], None)
        target = getattr(packet, parts[4], None) if packet is not None else None
        if isinstance(target, torch._ops.OpOverload):
            return target
    elif parts[:3] == ["torch", "ops", "higher_order"] and len(parts) == 4:
        target = getattr(torch.ops.higher_order, parts[3], None)
        if isinstance(target, torch._ops.HigherOrderOperator):
            return target
    elif len(parts) == 2 and parts[0] in ("operator", "math") and not parts[1].startswith("_"):
        target = getattr(operator if parts[0] == "operator" else math, parts[1], None)
        if callable(target):
            return target
    elif name in _TORCH_FUNCTIONS:
        return _TORCH_FUNCTIONS[name]
    raise UnsupportedError(f"saved graph '{path or '<root>'}' calls {name!r}, which is not a known torch op",
                           hint="load it where the op is registered, or save it again")


def _decode(value, env: dict):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "node":
            return env[inner]
        if kind in ("list", "tuple"):
            items = [_decode(v, env) for v in inner]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            return {k: _decode(v, env) for k, v in inner}
        if kind == "float":
            return float(inner)
        if kind == "dtype":
            return _torch_attr(inner, torch.dtype)
        if kind == "device":
            return torch.device(inner)
        if kind == "torch":
            return _torch_attr(inner, (torch.layout, torch.memory_format))
        if kind == "slice":
            return slice(*[_decode(v, env) for v in inner])
    raise UnsupportedError(f"saved graph holds an argument it cannot read: {value!r}"[:200],
                           hint="save the model again with this fxopt version")


def _torch_attr(name: str, kind):
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise UnsupportedError(f"saved graph names torch.{name}, which is not a {kind}",
                               hint="save the model again with this fxopt version")
    return value


def _restore_meta(gm: fx.GraphModule, meta: dict) -> None:
    gm.meta[INPUT_SHAPES] = tuple(
        None if i is None else TensorInfo(tuple(i["shape"]), _torch_attr(i["dtype"], torch.dtype),
                                          torch.device(i["device"]), tuple(i["dynamic"]))
        for i in meta.get("input_shapes", ()))
    gm.meta[INPUT_NAMES] = tuple(meta.get("input_names", ()))
    gm.meta[INPUT_SYMBOLS] = tuple(None if dims is None else tuple(None if s is None else str(s) for s in dims)
                                   for dims in meta.get("input_symbols", ()))
    gm.meta[INPUT_RANGES] = {str(k): (int(v[0]), None if v[1] is None else int(v[1]))
                             for k, v in dict(meta.get("input_ranges", {})).items()}
