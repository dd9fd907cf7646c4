"""The contract of the attention ops' fields (kernels_attention.py), checked before anything runs them.

The C++ indexes buffers by the shapes model.json records and computes in int64 on the
constants it records, so an edited or damaged export must not reach it with shapes that
disagree (reads out of bounds) or constants that overflow: each op's shapes are checked
against its inputs, and each constant against the bound its kernel's arithmetic needs.
"""
from __future__ import annotations

import math

from ...quant.fixedpoint import INT32_MAX
from ...quant.intmath import LN_FRACTION

ATTENTION_OPS = ("matmul", "softmax", "gelu", "lut", "layernorm", "transpose", "embedding", "sum", "constant", "slice")


def check_attention(c, where: str, layer: dict, tensors: dict) -> None:
    """Raise through the checker `c` (checks._Checker) at the first field of an attention layer
    outside its contract."""
    op = layer["op"]

    def need(ok: bool, what: str):
        if not ok:
            c.fail(where, what)

    need(all(n in tensors for n in [*layer["inputs"], layer["output"]]), f"{op} reads or writes a tensor "
                                                                        "without a record in tensors")
    ins = [tensors[n] for n in layer["inputs"]]
    out = tensors[layer["output"]]
    shapes = [t["shape"] for t in ins]

    def dtypes(*want: str):
        need(all(t["dtype"] == w for t, w in zip(ins, want)), f"{op} reads {[t['dtype'] for t in ins]}, "
                                                              f"needs {list(want)}")

    if op == "matmul":
        need(len(ins) == 2, "matmul takes two inputs")
        dtypes("int8", "int8")
        (*batch, m, k), b = shapes[0], shapes[1]
        kb, n = (b[-1], b[-2]) if layer.get("transpose_b") else (b[-2], b[-1])
        need(len(b) == len(shapes[0]) and b[:-2] == batch and kb == k and out["shape"] == [*batch, m, n],
             f"matmul of {shapes[0]} and {b} (transpose_b={bool(layer.get('transpose_b'))}) cannot give "
             f"{out['shape']}")
        need(k < 33000, f"matmul over {k} terms could overflow its int32 sum")
    elif op == "softmax":
        need(len(ins) in (1, 2) and ins[0]["dtype"] == "int32" and out["shape"] == shapes[0],
             "softmax reads int32 logits (and an int8 mask) and keeps their shape")
        need(len(ins) == 1 or (ins[1]["dtype"] == "int8" and shapes[1] == shapes[0][-1:]),
             f"the softmax mask must be int8 of shape {shapes[0][-1:]}")
        ln2 = c.int_in(f"{where}.ln2", layer.get("ln2"), 1, 1 << 20)
        b = c.int_in(f"{where}.exp_b", layer.get("exp_b"), 0, 1 << 20)
        c.int_in(f"{where}.exp_c", layer.get("exp_c"), 0, INT32_MAX - (ln2 + b) ** 2)
        c.int_in(f"{where}.output_zero_point", layer.get("output_zero_point"), -128, -128)
    elif op == "gelu":
        dtypes("int8")
        c.int_in(f"{where}.gelu_b", layer.get("gelu_b"), 0, 1 << 15)
        c.int_in(f"{where}.gelu_one", layer.get("gelu_one"), 0, (1 << 22) - 1)   # 256 * 2 one < 2^31
    elif op == "lut":
        dtypes("int8")
        table = layer.get("table")
        need(isinstance(table, list) and len(table) == 256, "a lut's table holds 256 codes")
        c.ints_in(f"{where}.table", table, -128, 127)
    elif op == "layernorm":
        width = shapes[0][-1]
        need(ins[0]["dtype"] == "int8" or ins[0].get("bound", INT32_MAX) <= 1 << 15,
             "layernorm reads int8, or int32 within +-2^15")
        need(width <= 1024 and out["shape"] == shapes[0], "layernorm keeps its input's shape, of at most 1024 "
                                                          "channels")
        c.int_in(f"{where}.eps", layer.get("eps"), 0, 1 << 40)
        gamma = c.ints_in(f"{where}.gamma", layer.get("gamma"), -(1 << 15), 1 << 15)
        beta = c.ints_in(f"{where}.beta", layer.get("beta"), -INT32_MAX, INT32_MAX)
        need(len(gamma) == len(beta) == width, f"gamma and beta need {width} entries")
        reach = math.sqrt(width) * (1 << LN_FRACTION) * (max(map(abs, gamma)) + 1) + max(map(abs, beta))
        need(reach < 2 ** 31, "gamma and beta would overflow the int32 sum y gamma + beta")
    elif op == "slice":
        rank = len(shapes[0]) if len(ins) == 1 else 0
        axis = c.int_in(f"{where}.axis", layer.get("axis"), 0, max(rank - 1, 0))
        size = shapes[0][axis] if rank else 0
        start = c.int_in(f"{where}.start", layer.get("start"), 0, max(size - 1, 0))
        step = c.int_in(f"{where}.step", layer.get("step"), 1, 1 << 20)
        count = c.int_in(f"{where}.count", layer.get("count"), 1, 1 << 20)
        need(rank > 0 and start + (count - 1) * step < size, f"slice of {count} from {start} by {step} leaves "
                                                              f"an axis of {size}")
        need(math.prod(out["shape"]) == math.prod(shapes[0]) // size * count and out["dtype"] == ins[0]["dtype"]
             and layer.get("shape") == out["shape"], f"slice of {shapes[0]} cannot give {out['shape']}")
    elif op == "constant":
        need(not ins and out["dtype"] == "int8" and layer.get("weight_shape") == out["shape"],
             "a constant has no input and its int8 weight has its output's shape")
    elif op == "embedding":
        table = layer.get("weight_shape")
        need(len(ins) == 1 and isinstance(table, list) and len(table) == 2, "an embedding reads one tensor of ids "
                                                                           "and a 2-d table")
        dtypes("int32")
        width = table[-1]
        need(out["dtype"] == "int32" and out["shape"] == [*shapes[0], width],
             f"embedding of ids {shapes[0]} cannot give {out['shape']}")
    elif op == "sum":
        width = c.int_in(f"{where}.channels", layer.get("channels"), 1, 1 << 20)
        need(len(ins) >= 1 and all(sh == out["shape"] for sh in shapes) and out["shape"][-1:] == [width],
             f"sum of {shapes} cannot give {out['shape']} over {width} channels")
        terms = len(ins) * width
        need(len(layer.get("multipliers", [])) == terms and len(layer.get("shifts", [])) == terms
             and len(layer.get("input_zero_points", [])) == len(ins),
             f"sum needs {terms} multipliers and shifts and {len(ins)} zero points")
        if "offset" in layer:
            offset = c.ints_in(f"{where}.offset", layer["offset"], -INT32_MAX, INT32_MAX)
            need(len(offset) == math.prod(out["shape"]), "sum's offset holds one value per element of a sample")
    elif op == "transpose":
        perm = layer.get("perm")
        need(isinstance(perm, list) and sorted(perm) == list(range(len(shapes[0]))) and len(perm) <= 4,
             f"perm {perm!r} is not a permutation of the {len(shapes[0])} axes (at most 4)")
        need(out["shape"] == [shapes[0][p] for p in perm] and out["dtype"] == ins[0]["dtype"],
             f"transpose of {shapes[0]} by {perm} cannot give {out['shape']}")
