"""The integer model as plain C++17: `weights.h` (every parameter) and `model.cpp` (kernels + main).

    files = emit_cpp(spec, weights)                 # {"weights.h": bytes, "model.cpp": bytes}
    binary = compile_cpp(export_dir)                # g++ -std=c++17 -O2 model.cpp -o model
    values = run_cpp(binary, spec, {"x": codes})    # every tensor, [N, *shape], int8 / int32

The C++ is a reference for an FPGA / HLS implementation, so it is deliberately naive: one
integer kernel per op of model.json (see model.py), int32 accumulators, int64 only inside
the requantization, no floating point anywhere. `requant` reproduces fixedpoint.requantize
bit for bit, including its edges: right shifts capped at MAX_SHIFT as there, and numpy's
int64 semantics elsewhere (a shift count outside [0, 64) gives 0 or the sign, sums and
products wrap instead of being undefined behaviour), so C++ and simulator agree on every input.

`./model <input_dir> <output_dir> <N>` reads `<input_dir>/<tensor_file(input)>` (N samples of
raw int8) and writes `<output_dir>/<tensor_file(t)>` for every tensor t of spec["tensors"]
(N samples, raw int8 or little-endian int32), so any intermediate can be compared.
"""
from __future__ import annotations

import hashlib
import math
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ...errors import FxoptError, UnsupportedError
from ...ir.graph import fresh_name
from ...quant.fixedpoint import MAX_SHIFT, ROUNDINGS
from ...quant.intmath import LN_FRACTION
from .checks_attention import ATTENTION_OPS

CTYPES = {"int8": "int8_t", "int32": "int32_t"}
NP_DTYPES = {"int8": np.dtype("<i1"), "int32": np.dtype("<i4")}     # the .bin files: little-endian
DTYPE_RANGE = {"int8": (-128, 127), "int32": (-(1 << 31), (1 << 31) - 1)}
STRING_ENCODE_MIN = 4096     # int8 arrays at least this long become string literals (see _int8_array)


class CppBuildError(FxoptError, RuntimeError):
    """g++ failed on the generated C++, or the compiled model failed to run."""


def tensor_file(name: str) -> str:
    """The .bin file of a tensor, the same in Python and (embedded as literals) in the C++.

    Names made of [A-Za-z0-9_.-] (all fx node names) are kept; any other name is sanitized and
    given a hash of the original, so two tensors never share a file.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if safe != name or safe.startswith(".") or not safe:
        safe = f"{safe.lstrip('.')}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe + ".bin"


# ---- weights.h ------------------------------------------------------------------------------
def _c_int(v: int) -> str:
    """A C++ integer literal; INT32_MIN has no literal of type int, so it is spelled as a sum."""
    v = int(v)
    return "(-2147483647 - 1)" if v == -(1 << 31) else str(v)


def _int_array(ctype: str, name: str, values) -> str:
    values = [int(v) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(_c_int(v) for v in values[i:i + 32]) for i in range(0, len(values), 32)]
    return f"static const {ctype} {name}[{max(len(values), 1)}] = {{\n  " + ",\n  ".join(lines) + "\n};\n"


_ESCAPES = np.array([chr(b) if 32 <= b < 127 and chr(b) not in '\\"?' else f"\\{b:03o}" for b in range(256)],
                    dtype=object)


def _int8_array(name: str, values: np.ndarray) -> str:
    """int8 data; a large array is one string literal of its bytes, cast to int8_t.

    Why: g++ needs ~29 s and 1.4 GB for an initializer list of 11M int8 (resnet18), but ~1 s
    for the same bytes as a literal. Printable bytes stand for themselves, the others are
    three-digit octal escapes (so a following digit is never read as part of the escape).
    """
    data = np.ascontiguousarray(values, dtype=np.int8).reshape(-1)
    if data.size < STRING_ENCODE_MIN:
        return _int_array("int8_t", name, data)
    codes = _ESCAPES[data.view(np.uint8)]
    lines = ['  "' + "".join(codes[i:i + 128]) + '"' for i in range(0, data.size, 128)]
    return (f"static const char {name}_bytes[{data.size + 1}] =\n" + "\n".join(lines) + ";\n"
            f"static const int8_t* const {name} = reinterpret_cast<const int8_t*>({name}_bytes);\n")


_LIST_FIELDS = {"bias": "int32_t", "multiplier": "int32_t", "shift": "int", "multipliers": "int32_t",
                "shifts": "int", "input_zero_points": "int", "gamma": "int32_t", "beta": "int32_t", "table": "int",
                "offset": "int32_t"}
_SCALAR_FIELDS = ("input_zero_point", "output_zero_point", "left_shift")
_WIDE_FIELDS = ("eps", "ln2", "exp_b", "exp_c", "gelu_b", "gelu_one")      # int64 constants of intmath


def _layer_params(L: str, layer: dict, weight, out_dtype: str) -> str:
    """Every integer parameter of one layer as `static const` arrays named L_<field>."""
    parts = [f"// layer {_comment(layer['name'])}: {layer['op']}\n"]
    if "weight_shape" in layer:
        if weight is None or list(np.shape(weight)) != list(layer["weight_shape"]):
            raise ValueError(f"layer {layer['name']!r}: weight of shape {np.shape(weight)}, "
                             f"model.json says {layer['weight_shape']}")
        parts.append(_int8_array(f"{L}_weight", np.asarray(weight)))
    for key, ctype in _LIST_FIELDS.items():
        if key in layer:
            parts.append(_int_array(ctype, f"{L}_{key}", np.atleast_1d(layer[key])))
    parts += [f"static const int {L}_{key} = {_c_int(layer[key])};\n" for key in _SCALAR_FIELDS if key in layer]
    parts += [f"static const int64_t {L}_{key} = {int(layer[key])}LL;\n" for key in _WIDE_FIELDS if key in layer]
    lo, hi = layer.get("clamp", DTYPE_RANGE[out_dtype])      # no clamp: the output type's range
    parts += [_int_array("int", f"{L}_clamp_lo", np.atleast_1d(lo)),
              _int_array("int", f"{L}_clamp_hi", np.atleast_1d(hi))]
    return "".join(parts)


# ---- model.cpp: the kernels and main() (fixed C++ text, shipped next to this file) -------------
def _text(name: str) -> str:
    return (Path(__file__).with_name(name)).read_text()


_KERNELS = _text("kernels.inc") + _text("kernels_attention.inc")

_MAIN = _text("main.inc")


# ---- model.cpp: the generated calls ----------------------------------------------------------
class _Tensor:
    def __init__(self, ident: str, dtype: str, shape):
        self.ident, self.dtype, self.shape, self.size = ident, dtype, [int(d) for d in shape], math.prod(shape)


def _ident(prefix: str, name: str, taken: set) -> str:
    """A unique C identifier for a model name."""
    base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)
    ident = fresh_name(base, taken, first=2)
    taken.add(ident)
    return ident


def _pair(v) -> list[int]:
    return [int(v), int(v)] if np.ndim(v) == 0 else [int(x) for x in v]


def _requant(L: str, layer: dict, channels: int) -> str:
    """The Requant{...} output stage of a layer; a list has 1 entry or one per output channel."""
    for key in ("multiplier", "shift", "clamp"):
        for arr in ([layer[key]] if key != "clamp" else layer[key]) if key in layer else []:
            if np.size(arr) not in (1, channels):
                raise ValueError(f"layer {layer['name']!r}: {key} has {np.size(arr)} entries, expected 1 or {channels}")
    nc = np.size(layer["clamp"][0]) if "clamp" in layer else 1
    zp = f"{L}_output_zero_point" if "output_zero_point" in layer else "0"
    mult = (f"{L}_multiplier, {L}_shift, {np.size(layer['multiplier'])}" if "multiplier" in layer
            else "nullptr, nullptr, 0")
    return f"Requant{{{mult}, {zp}, {L}_clamp_lo, {L}_clamp_hi, {nc}}}"


def _pool(x: _Tensor, y: _Tensor, layer: dict, dilation) -> str:
    (kh, kw), pad = _pair(layer["kernel"]), _pair(layer.get("padding", 0))
    stride = _pair(layer.get("stride") or layer["kernel"])        # torch: stride defaults to the kernel
    return "Pool{%d, %d, %d, %d, %d, %d, %d, %d, %d, %d, %d, %d, %d}" % (
        *x.shape, kh, kw, *stride, *pad, *_pair(dilation), *y.shape[1:])


def _call(layer: dict, L: str, T: dict[str, _Tensor]) -> str:
    """The C++ statement running one layer."""
    op, xs, y = layer["op"], [T[n] for n in layer["inputs"]], T[layer["output"]]
    x = xs[0] if xs else None
    inner = math.prod(y.shape[1:])
    if op == "conv2d":
        o, _, kh, kw = layer["weight_shape"]
        geo = [*x.shape, o, kh, kw, *_pair(layer["stride"]), *_pair(layer["padding"]), *_pair(layer["dilation"]),
               layer["groups"], *y.shape[1:]]
        return (f"conv2d({x.ident}, {y.ident}, {L}_weight, {L}_bias, {L}_input_zero_point, "
                f"Conv{{{', '.join(map(str, geo))}}}, {_requant(L, layer, o)});")
    if op == "linear":
        o, i = layer["weight_shape"]
        return (f"linear({x.ident}, {y.ident}, {L}_weight, {L}_bias, {L}_input_zero_point, "
                f"{x.size // i}, {i}, {o}, {_requant(L, layer, o)});")
    if op == "add":
        if xs[0].shape != xs[1].shape or xs[0].shape != y.shape:
            raise UnsupportedError(f"add {layer['name']!r} broadcasts {xs[0].shape} with {xs[1].shape}")
        req = ("nullptr, nullptr" if "multiplier" not in layer else f"{L}_multipliers, {L}_shifts")
        return (f"add({xs[0].ident}, {xs[1].ident}, {y.ident}, {y.size}, {inner}, {L}_input_zero_points, {req}, "
                f"{layer.get('left_shift', 0)}, {_requant(L, layer, y.shape[0] if y.shape else 1)});")
    if op in ("concat", "requantize"):
        axis = layer.get("axis", 0) % len(y.shape)                   # a negative axis counts from the end
        inners = [str(math.prod(t.shape[axis:])) for t in xs]
        req = _requant(L, layer, 1)                                   # its zero point and clamp
        return (f"{{ const int8_t* const xs[] = {{{', '.join(t.ident for t in xs)}}}; "
                f"const long inner[] = {{{', '.join(inners)}}};\n    concat({len(xs)}, xs, inner, "
                f"{math.prod(y.shape[:axis])}, {y.ident}, {L}_input_zero_points, {L}_multipliers, {L}_shifts, "
                f"{req}); }}")
    if op == "max_pool2d":
        return f"max_pool2d({x.ident}, {y.ident}, {_pool(x, y, layer, layer.get('dilation', 1))});"
    if op == "avg_pool2d":
        izp = f"{L}_input_zero_point" if x.dtype == "int8" else "0"
        return f"avg_pool2d({x.ident}, {y.ident}, {izp}, {_pool(x, y, layer, 1)}, {_requant(L, layer, x.shape[0])});"
    if op == "reshape":
        if x.size != y.size or x.dtype != y.dtype:
            raise ValueError(f"reshape {layer['name']!r}: {x.dtype} {x.shape} -> {y.dtype} {y.shape}")
        return f"reshape({x.ident}, {y.ident}, {y.size});"
    if op == "clamp":
        req = _requant(L, layer, y.shape[0] if y.shape else 1)
        return f"clamp({x.ident}, {y.ident}, {y.size}, {max(inner, 1)}, {req});"
    if op in ATTENTION_OPS:
        return _attention_call(layer, L, xs, y)
    raise UnsupportedError(f"layer {layer['name']!r}: op {op!r} has no C++ kernel")


def _attention_call(layer: dict, L: str, xs: list[_Tensor], y: _Tensor) -> str:
    """The C++ statement of an attention op (kernels_attention.inc)."""
    op, x = layer["op"], (xs[0] if xs else None)
    if op == "matmul":
        *batch, m, k = x.shape
        n = xs[1].shape[-2] if layer.get("transpose_b") else xs[1].shape[-1]
        geo = f"MatMul{{{math.prod(batch)}, {m}, {k}, {n}, {int(bool(layer.get('transpose_b')))}}}"
        return (f"matmul({x.ident}, {xs[1].ident}, {y.ident}, {L}_input_zero_points, {geo}, "
                f"{_requant(L, layer, 1)});")
    if op == "slice":
        axis = int(layer["axis"])
        outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
        return (f"slice_axis({x.ident}, {y.ident}, {outer}, {x.shape[axis]}, {inner}, {int(layer['start'])}, "
                f"{int(layer['step'])}, {int(layer['count'])});")
    if op == "constant":
        return f"std::memcpy({y.ident}, {L}_weight, {y.size});"
    if op == "embedding":
        vocab, width = layer["weight_shape"]
        return f"embedding({x.ident}, {y.ident}, {L}_weight, {x.size}, {width}, {vocab});"
    if op == "sum":
        c = int(layer["channels"])
        offset = f"{L}_offset" if "offset" in layer else "nullptr"
        terms = "".join(f"\n    sum_term({t.ident}, acc, {y.size}, {c}, {L}_input_zero_points[{j}], "
                        f"{L}_multipliers + {j * c}, {L}_shifts + {j * c}, {int(j == 0)});"
                        for j, t in enumerate(xs))
        return (f"{{ static int64_t acc[{max(y.size, 1)}];{terms}\n    sum_finish(acc, {offset}, {y.ident}, "
                f"{y.size}, {_requant(L, layer, 1)}); }}")
    if op == "softmax":
        keep = xs[1].ident if len(xs) > 1 else "nullptr"
        geo = f"Softmax{{{x.size // x.shape[-1]}, {x.shape[-1]}, {L}_ln2, {L}_exp_b, {L}_exp_c}}"
        return f"softmax({x.ident}, {y.ident}, {keep}, {L}_output_zero_point, {geo});"
    if op == "gelu":
        return (f"gelu({x.ident}, {y.ident}, {y.size}, {L}_input_zero_point, {L}_gelu_b, {L}_gelu_one, "
                f"{_requant(L, layer, 1)});")
    if op == "lut":
        return f"lut({x.ident}, {y.ident}, {y.size}, {L}_table);"
    if op == "layernorm":
        geo = f"LayerNorm{{{x.size // x.shape[-1]}, {x.shape[-1]}, {L}_eps, {LN_FRACTION}}}"
        return f"layernorm({x.ident}, {y.ident}, {L}_gamma, {L}_beta, {geo}, {_requant(L, layer, 1)});"
    perm = [int(p) for p in layer["perm"]]
    if len(perm) > 4 or sorted(perm) != list(range(len(x.shape))):
        raise UnsupportedError(f"transpose {layer['name']!r}: perm {perm} of a {len(x.shape)}-axis tensor "
                               "(at most 4 axes)")
    shape = list(x.shape) + [1] * (4 - len(x.shape))
    perm += list(range(len(perm), 4))
    return (f"transpose({x.ident}, {y.ident}, Transpose{{{{{', '.join(map(str, shape))}}}, "
            f"{{{', '.join(map(str, perm))}}}}});")


def _comment(text: str) -> str:
    """Text safe in a // comment (no backslash that would continue it onto the next line)."""
    return re.sub(r"[^\w .,:()>\[\]'-]", "?", text)


def _model_cpp(spec: dict, T: dict[str, _Tensor], calls: list[str]) -> str:
    """model.cpp around the generated layer calls: kernels, buffers, run_model, file tables, main."""
    ins = [(e["name"], T[e["name"]]) for e in spec["inputs"]]
    table = lambda pairs: ",\n".join(  # noqa: E731
        f'  {{"{tensor_file(n)}", {t.ident}, {t.size}, {NP_DTYPES[t.dtype].itemsize}}}' for n, t in pairs)
    return "".join([
        "// Generated by fxopt.backends.fpga_int8.cpp: integer-only reference of model.json.\n"
        "// Build: g++ -std=c++17 -O2 model.cpp -o model;  run: ./model <input_dir> <output_dir> <N>\n",
        *(f"#include <{h}>\n" for h in ("cstdint", "cstdio", "cstdlib", "cstring", "string", "vector")),
        '#include "weights.h"\n\n',
        f"static const bool kRoundingSingle = {str(spec['rounding'] == 'single').lower()};"
        "  // model.json rounding: single, or gemmlowp's two roundings\n",
        f"static const int64_t kMaxShift = {MAX_SHIFT};  // fixedpoint.MAX_SHIFT: the widest right shift\n",
        _KERNELS,
        "\n// ---- one static buffer per tensor (one sample) ----\n",
        *(f"static {CTYPES[t.dtype]} {t.ident}[{max(t.size, 1)}];\n" for t in T.values()),
        "\nvoid run_model(", ", ".join(f"const void* in_{i}" for i in range(len(ins))), ") {\n",
        *(f"  std::memcpy({t.ident}, in_{i}, {t.size * NP_DTYPES[t.dtype].itemsize});\n"
          for i, (_, t) in enumerate(ins)), *calls, "}\n\n",
        "struct TensorFile { const char* file; const void* data; long count; int bytes; };\n",
        "static const std::vector<TensorFile> kInputs = {\n", table(ins), "\n};\n",
        "static const std::vector<TensorFile> kTensors = {\n", table((n, T[n]) for n in spec["tensors"]), "\n};\n",
        _MAIN.replace("RUN_MODEL_CALL", f"run_model({', '.join(f'samples[{i}].data()' for i in range(len(ins)))})")])


def emit_cpp(spec: dict, weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    """{"weights.h", "model.cpp"} for a parsed model.json and its {layer name: int8 weight}."""
    if spec.get("rounding") not in ROUNDINGS:
        raise ValueError(f"model.json rounding must be one of {ROUNDINGS}, got {spec.get('rounding')!r}")
    taken: set = set()
    shapes = {name: (t["dtype"], t["shape"]) for name, t in spec["tensors"].items()}
    for entry in spec["inputs"]:
        dtype = entry.get("dtype", "int8")
        if dtype not in CTYPES or shapes.setdefault(entry["name"], (dtype, entry["shape"]))[0] != dtype:
            raise ValueError(f"model input {entry['name']!r} is not an int8 or int32 tensor as its entry says")
    T = {name: _Tensor(_ident("T_", name, taken), dtype, shape) for name, (dtype, shape) in shapes.items()}
    header = ["// Generated by fxopt.backends.fpga_int8.cpp: every integer parameter of model.json.\n"
              "#pragma once\n#include <cstdint>\n\n"]
    calls = []
    for layer in spec["layers"]:
        L = _ident("L_", layer["name"], taken)
        header.append(_layer_params(L, layer, weights.get(layer["name"]), T[layer["output"]].dtype))
        calls.append(f"  // {_comment(layer['name'])}: {layer['op']}({_comment(', '.join(layer['inputs']))})"
                     f" -> {_comment(layer['output'])}\n  {_call(layer, L, T)}\n")
    return {"weights.h": "".join(header).encode(), "model.cpp": _model_cpp(spec, T, calls).encode()}


# ---- build and run -----------------------------------------------------------------------
def compile_cpp(export_dir, out_binary=None, opt: str = "-O2", timeout: float = 1800) -> Path:
    """g++ -std=c++17 <opt> model.cpp -o <binary> in export_dir; the binary's path."""
    export_dir = Path(export_dir)
    binary = Path(out_binary) if out_binary is not None else export_dir / "model"
    if not (export_dir / "model.cpp").exists():
        raise FileNotFoundError(f"{export_dir / 'model.cpp'} does not exist: write emit_cpp's files first")
    compiler = shutil.which("g++")
    if compiler is None:
        raise UnsupportedError("g++ was not found on PATH", hint="install g++ (e.g. apt-get install g++)")
    cmd = [compiler, "-std=c++17", *shlex.split(opt), "model.cpp", "-o", str(binary.resolve())]
    done = subprocess.run(cmd, cwd=export_dir, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CppBuildError(f"g++ failed (exit {done.returncode}) on {export_dir / 'model.cpp'}:\n"
                            f"{done.stderr[-8000:]}", where=" ".join(cmd))
    return binary.resolve()


def run_cpp(binary, spec: dict, inputs: dict[str, np.ndarray], timeout: float = 600) -> dict[str, np.ndarray]:
    """Run a compiled model on input codes ({input name: [N, *shape]}, int8 or the input's int32);
    every tensor, [N, *shape]."""
    arrays, n = {}, None
    for entry in spec["inputs"]:
        codes = np.asarray(inputs[entry["name"]])
        dtype = NP_DTYPES[entry.get("dtype", "int8")]
        info = np.iinfo(dtype)
        if codes.dtype != dtype and (codes.min(initial=0) < info.min or codes.max(initial=0) > info.max):
            raise ValueError(f"input {entry['name']!r} holds values outside {entry.get('dtype', 'int8')}")
        if list(codes.shape[1:]) != list(entry["shape"]) or (n is not None and codes.shape[0] != n):
            raise ValueError(f"input {entry['name']!r} has shape {codes.shape}, expected [N, *{entry['shape']}]")
        n, arrays[entry["name"]] = codes.shape[0], codes.astype(dtype)
    with tempfile.TemporaryDirectory(prefix="fxopt-cpp-") as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir(), out_dir.mkdir()
        for name, codes in arrays.items():
            codes.tofile(in_dir / tensor_file(name))
        done = subprocess.run([str(Path(binary).resolve()), str(in_dir), str(out_dir), str(n or 0)],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise CppBuildError(f"{binary} failed (exit {done.returncode}):\n{done.stderr[-8000:]}")
        return {name: np.fromfile(out_dir / tensor_file(name), dtype=NP_DTYPES[t["dtype"]])
                .astype(np.int8 if t["dtype"] == "int8" else np.int32).reshape(n or 0, *t["shape"])
                for name, t in spec["tensors"].items()}
