"""The whole design: one module per layer, the top module that wires their streams, and the testbench.

`design(spec, weights, reuse_factor)` returns a `Design`: its files ({name: text}, the
Verilog, the $readmemh ROM images and the testbench), the stream order of the input and
the output (plan.stream_perms), and per-layer facts (multipliers, cycles).

The top module `fxopt_top` has one input and one output stream (valid / ready, one element
per beat, int8 in; int8 or int32 out); a reshape is a wire, and a tensor read by several
layers goes through a fork of FIFOs (stream.FIFO), each as deep as the tensor.

The testbench `tb.v` (Verilog-2005, for Verilator `--binary --timing` and Icarus alike)
reads `inputs.hex` (N samples back to back, in stream order), streams them in, writes every
output element to `outputs.txt` and, per sample, the cycle of its first input and of its
last output to `cycles.txt`. With STALL=1 both sides stall on a pseudo-random pattern, to
exercise every handshake. A design that stops moving for `idle_limit` cycles ends the run
with "STALLED" instead of hanging.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ....errors import UnsupportedError
from .plan import requant_chunk, stream_perms
from .requant import has_multiplier, requant_cycles
from .stream import FIFO, add_module, clamp_module, concat_module, gelu_module, lut_module
from .window import bits, module as window_module

WINDOW_OPS = ("conv2d", "linear", "max_pool2d", "avg_pool2d")


@dataclass
class Design:
    files: dict[str, str] = field(default_factory=dict)
    input_perm: np.ndarray | None = None
    output_perm: np.ndarray | None = None
    output_width: int = 8
    input_size: int = 0
    output_size: int = 0
    layers: dict[str, dict] = field(default_factory=dict)   # per layer: multipliers, cycles, ...
    io: str = "stream"                                        # or "parallel": a whole tensor per beat (dense.py)

    @property
    def multipliers(self) -> int:
        return sum(f.get("multipliers", 0) for f in self.layers.values())

    @property
    def port_bits(self) -> int:
        """Pins the top needs: data in and out (a whole tensor in parallel io) and clk, rst and the
        two valid / ready pairs."""
        if self.io == "parallel":
            return self.input_size * 8 + self.output_size * self.output_width + 6
        return 8 + self.output_width + 6

    @property
    def cycle_estimate(self) -> int:
        beats = 2 if self.io == "parallel" else self.input_size + self.output_size
        return sum(f.get("cycles", 0) for f in self.layers.values()) + beats


def verilog_name(layer_name: str, used: set) -> str:
    """A Verilog identifier for a layer, distinct from every other module name of the design
    (each layer may also define `<name>_rq`, its requant unit)."""
    base = "L_" + re.sub(r"[^A-Za-z0-9_]", "_", layer_name)
    name, i = base, 1
    while name in used or f"{name}_rq" in used:
        name, i = f"{base}_{i}", i + 1
    used.update((name, f"{name}_rq"))
    return name


def one_input_one_output(spec: dict) -> None:
    """The top has one input and one output port: refuse any other model."""
    if len(spec["inputs"]) != 1 or len(spec["outputs"]) != 1:
        raise UnsupportedError(
            f"fpga-int8 RTL: the design has {len(spec['inputs'])} inputs and {len(spec['outputs'])} outputs; "
            "the RTL top takes exactly one of each", where="model inputs / outputs",
            hint="export a model with one input tensor and one output tensor")


def design(spec: dict, weights: dict, reuse_factor: int = 1) -> Design:
    one_input_one_output(spec)
    perms = stream_perms(spec)
    alias = {}                                   # reshape outputs are their input's stream
    for layer in spec["layers"]:
        if layer["op"] == "reshape":
            alias[layer["output"]] = alias.get(layer["inputs"][0], layer["inputs"][0])
    stream = lambda t: alias.get(t, t)  # noqa: E731
    out = Design(input_perm=perms[spec["inputs"][0]["name"]], output_perm=perms[spec["outputs"][0]])
    out.output_width = 8 if spec["tensors"][spec["outputs"][0]]["dtype"] == "int8" else 32
    out.input_size = int(np.prod(spec["inputs"][0]["shape"]))
    out.output_size = int(np.prod(spec["tensors"][spec["outputs"][0]]["shape"]))
    used, instances, texts = set(), [], [FIFO]
    readers: dict[str, list[str]] = {}           # stream -> port prefixes reading it
    for layer in spec["layers"]:
        if layer["op"] == "reshape":
            continue
        name = verilog_name(layer["name"], used)
        text, mems, facts = _layer(name, spec, layer, weights.get(layer["name"]), perms, reuse_factor)
        texts.append(text)
        out.files.update({k: "\n".join(v) + "\n" for k, v in mems.items()})
        out.layers[layer["name"]] = {"module": name, **facts}
        ports = [f"{name}_in{i}" if len(layer["inputs"]) > 1 else f"{name}_in" for i in range(len(layer["inputs"]))]
        for port, tensor in zip(ports, layer["inputs"]):
            readers.setdefault(stream(tensor), []).append(port)
        width = 8 if spec["tensors"][layer["output"]]["dtype"] == "int8" else 32
        instances.append((name, ports, stream(layer["output"]), width, layer))
    readers.setdefault(stream(spec["outputs"][0]), []).append("top_out")
    out.files["fxopt_top.v"] = "\n".join(texts) + "\n" + _top(spec, instances, readers, stream, out)
    out.files["tb.v"] = testbench(out)
    return out


def _layer(name, spec, layer, weight, perms, reuse_factor):
    op = layer["op"]
    outputs = int(np.prod(spec["tensors"][layer["output"]]["shape"]))
    if op in WINDOW_OPS:
        return window_module(name, spec, layer, weight, perms[layer["inputs"][0]], reuse_factor)
    if op == "clamp":
        return clamp_module(name, layer, 8), {}, {"cycles": 0}
    if op == "lut":
        return (*lut_module(name, layer), {"cycles": 0})
    chunk = requant_chunk(1, reuse_factor)
    module = {"add": add_module, "gelu": gelu_module}.get(op, concat_module)
    text, mems = module(name, spec, layer, chunk)
    per = 4 + requant_cycles(chunk)
    return text, mems, {"requant_chunk": chunk, "requant_multipliers": int(has_multiplier([], chunk)),
                        "cycles": outputs * per * (3 if op == "add" else 1)}


def _wires(prefix: str, width: int) -> str:
    return f"  wire [{width - 1}:0] {prefix}_data;\n  wire {prefix}_valid, {prefix}_ready;\n"


def _top(spec, instances, readers, stream, design_: Design) -> str:
    widths = {stream(spec["inputs"][0]["name"]): 8}
    for name, _, produced, width, _ in instances:
        widths[produced] = width
    lines = ["module fxopt_top (input clk, input rst, input [7:0] in_data, input in_valid, output in_ready,",
             f"    output [{design_.output_width - 1}:0] out_data, output out_valid, input out_ready);"]
    source = {stream(spec["inputs"][0]["name"]): "in"}
    for name, _, produced, width, _ in instances:
        lines.append(_wires(f"s_{name}", width))
        source[produced] = f"s_{name}"
    body = []
    for tensor, ports in readers.items():
        src, width = source[tensor], widths[tensor]
        depth = int(np.prod(spec["tensors"][tensor]["shape"])) if tensor in spec["tensors"] else design_.input_size
        for port in ports:
            lines.append(_wires(port, width))
        if len(ports) == 1:
            body.append(f"  assign {ports[0]}_data = {src}_data; assign {ports[0]}_valid = {src}_valid; "
                        f"assign {src}_ready = {ports[0]}_ready;")
            continue
        readies = " && ".join(f"f_{p}_ready" for p in ports)
        body.append(f"  wire {', '.join(f'f_{p}_ready' for p in ports)};\n  assign {src}_ready = {readies};")
        for p in ports:
            body.append(f"  fxopt_fifo #(.W({width}), .DEPTH({depth}), .AB({bits(depth)})) fork_{p} (.clk(clk), "
                        f".rst(rst), .in_data({src}_data), .in_valid({src}_valid && {src}_ready), "
                        f".in_ready(f_{p}_ready), .out_data({p}_data), .out_valid({p}_valid), .out_ready({p}_ready));")
    for name, ports, _, _, layer in instances:
        conns = [".clk(clk)", ".rst(rst)"]
        for i, port in enumerate(ports):
            p = "in" if len(ports) == 1 else f"in{i}"
            conns += [f".{p}_data({port}_data)", f".{p}_valid({port}_valid)", f".{p}_ready({port}_ready)"]
        conns += [f".out_data(s_{name}_data)", f".out_valid(s_{name}_valid)", f".out_ready(s_{name}_ready)"]
        body.append(f"  {name} u_{name} ({', '.join(conns)});")
    body.append("  assign out_data = top_out_data; assign out_valid = top_out_valid; "
                "assign top_out_ready = out_ready;")
    return "\n".join(lines + body) + "\nendmodule\n"


def _io_parts(d: Design) -> dict[str, str]:
    """The parts of tb.v that differ between the io modes: the input word, what an accepted
    input and a given output do, and how the inputs are counted (elements or samples)."""
    S, OW = d.input_size, d.output_width
    if d.io == "parallel":      # one sample per beat, its latency counted from when it is first offered
        word = ", ".join(f"inputs[i_idx * {S} + {k}]" for k in reversed(range(S)))
        return {"total": "N", "width": f"{S * 8}", "out_width": f"{d.output_size * OW}",
                "data": f"{{{word}}}", "comment": f"one sample of {S} int8 per beat",
                "take": "// a layer reads its input in place and takes it after its last MAC cycle\n"
                        "      if (in_valid && !offered) begin $fwrite(fc, \"in %0d %0d\\n\", i_idx, cycle); "
                        "offered <= 1'b1; end\n      if (in_valid && in_ready) begin i_idx <= i_idx + 1; "
                        "offered <= 1'b0; end",
                "give": f"for (k = 0; k < {d.output_size}; k = k + 1) $fwrite(fo, \"%0d\\n\", "
                        f"$signed(out_data[k * {OW} +: {OW}]));\n        $fwrite(fc, \"out %0d %0d\\n\", o_idx, cycle);\n"
                        "        o_idx <= o_idx + 1;\n        if (o_idx + 1 == N) begin $fclose(fo); $fclose(fc); $finish; end"}
    return {"total": f"N * {S}", "width": "8", "out_width": f"{OW}", "data": "inputs[i_idx]",
            "comment": f"{S} int8 per sample, one per beat",
            "take": "if (in_valid && in_ready) begin\n"
                    f"        if (i_idx % {S} == 0) $fwrite(fc, \"in %0d %0d\\n\", i_idx / {S}, cycle);\n"
                    "        i_idx <= i_idx + 1;\n      end",
            "give": "$fwrite(fo, \"%0d\\n\", $signed(out_data));\n        o_idx <= o_idx + 1;\n"
                    f"        if ((o_idx + 1) % {d.output_size} == 0) $fwrite(fc, \"out %0d %0d\\n\", "
                    f"o_idx / {d.output_size}, cycle);\n"
                    f"        if (o_idx + 1 == N * {d.output_size}) begin $fclose(fo); $fclose(fc); $finish; end"}


def testbench(d: Design) -> str:
    """tb.v: reads N samples from inputs.hex and streams them in (one element per beat, or one
    sample per beat in parallel io), writes every output element to outputs.txt and each
    sample's first-input and last-output cycles to cycles.txt."""
    p = _io_parts(d)
    return f"""`timescale 1ns/1ps
module tb;
  // N samples from inputs.hex ({p['comment']}); writes outputs.txt and cycles.txt
  parameter N = 1;
  parameter STALL = 0;
  reg clk = 1'b0;
  always #5 clk = ~clk;
  reg rst = 1'b1;
  reg [7:0] inputs [0:N * {d.input_size} - 1];
  integer fo, fc, i_idx, o_idx, k, cycle, idle;
  reg [15:0] lfsr;
  reg offered = 1'b0;
  wire in_ready, out_valid;
  wire [{p['out_width']} - 1:0] out_data;
  wire in_valid = !rst && i_idx < {p['total']} && (!STALL || lfsr[0]);
  wire out_ready = !rst && (!STALL || lfsr[3]);
  wire [{p['width']} - 1:0] in_data = i_idx < {p['total']} ? {p['data']} : 0;
  fxopt_top dut (.clk(clk), .rst(rst), .in_data(in_data), .in_valid(in_valid), .in_ready(in_ready),
      .out_data(out_data), .out_valid(out_valid), .out_ready(out_ready));
  initial begin
    $readmemh("inputs.hex", inputs);
    fo = $fopen("outputs.txt", "w");
    fc = $fopen("cycles.txt", "w");
    i_idx = 0; o_idx = 0; cycle = 0; idle = 0; lfsr = 16'hACE1;
    repeat (3) @(posedge clk);
    rst = 1'b0;
  end
  always @(posedge clk) begin
    if (!rst) begin
      cycle <= cycle + 1;
      lfsr <= {{lfsr[14:0], lfsr[15] ^ lfsr[13] ^ lfsr[12] ^ lfsr[10]}};
      idle <= (in_valid && in_ready) || (out_valid && out_ready) ? 0 : idle + 1;
      {p['take']}
      if (out_valid && out_ready) begin
        {p['give']}
      end
      if (idle > {4 * d.cycle_estimate + 2000}) begin
        $display("STALLED after %0d cycles: %0d inputs taken, %0d outputs given", cycle, i_idx, o_idx);
        $fclose(fo); $fclose(fc); $finish;
      end
    end
  end
endmodule
"""
