"""Verilog of the element-wise layers (add, concat, requantize, clamp, lut, gelu) and of the stream FIFO.

They work on the streams as they come (plan.py's order), one element at a time. An add
waits for both inputs, requantises each ((x - zp) << left_shift, then its multiplier) and
the sum with the layer's requant unit, one after the other; a concat takes `chunk[i]`
elements of input i in turn, `outer` times per inference, each requantised to the output
grid; a requantize layer is a concat of one input. A tensor read by several layers goes
through a fork of FIFOs, each as deep as the tensor, so a residual path never stalls the
other. A lut (tanh, sigmoid, tanh-approximate GELU: fake-quant{integer=true}) is its 256-entry
table as a ROM, read combinationally at the code's unsigned index (its sign bit flipped); a
gelu computes I-BERT's erf polynomial on the centred code and requantises it like a concat.
"""
from __future__ import annotations

import numpy as np

from .plan import refuse, requant_plan
from .requant import FIELD, instance, table, table_word, unit
from .window import bits

FIFO = """module fxopt_fifo #(parameter W = 8, parameter DEPTH = 2, parameter AB = 1) (input clk, input rst,
    input [W-1:0] in_data, input in_valid, output in_ready,
    output [W-1:0] out_data, output out_valid, input out_ready);
  // first in, first out; DEPTH entries
  reg [W-1:0] mem [0:DEPTH-1];
  reg [AB:0] count;
  reg [AB-1:0] head, tail;
  assign in_ready = count != DEPTH && !rst;
  assign out_valid = count != 0;
  assign out_data = mem[head];
  wire push = in_valid && in_ready, pop = out_valid && out_ready;
  always @(posedge clk) begin
    if (rst) begin count <= 0; head <= 0; tail <= 0; end
    else begin
      if (push) begin mem[tail] <= in_data; tail <= tail == DEPTH - 1 ? 0 : tail + 1; end
      if (pop) head <= head == DEPTH - 1 ? 0 : head + 1;
      count <= count + push - pop;
    end
  end
endmodule
"""


def _clamp_text(width: int, lo: int, hi: int, expr: str) -> str:
    return f"({expr} < {lo} ? {width}'d{lo & ((1 << width) - 1)} : {expr} > {hi} ? {width}'d{hi & ((1 << width) - 1)} : {expr}[{width - 1}:0])"


def scalar_clamp(layer: dict) -> tuple[int, int]:
    lo, hi = layer["clamp"]
    if np.ndim(lo) or np.ndim(hi):
        raise refuse(layer, "clamps each channel of an element-wise int32 result differently",
                     "quantize the add's output (fake-quant{outputs=true}) or keep it inside a layer")
    return int(lo), int(hi)


def clamp_module(name: str, layer: dict, width: int) -> str:
    lo, hi = scalar_clamp(layer)
    return f"""module {name} (input clk, input rst, input [{width - 1}:0] in_data, input in_valid, output in_ready,
    output [{width - 1}:0] out_data, output out_valid, input out_ready);
  // clamp to [{lo}, {hi}], combinational
  wire signed [{width - 1}:0] x = in_data;
  assign out_data = {_clamp_text(width, lo, hi, "x")};
  assign out_valid = in_valid;
  assign in_ready = out_ready;
endmodule
"""


def lut_module(name: str, layer: dict) -> tuple[str, dict]:
    """A table lookup: out = table[in + 128], combinational; the ROM image `<name>_lut.mem`."""
    words = [f"{int(v) & 0xFF:02x}" for v in layer["table"]]
    return f"""module {name} (input clk, input rst, input [7:0] in_data, input in_valid, output in_ready,
    output [7:0] out_data, output out_valid, input out_ready);
  // lut: 256 codes, entry c + 128 for input code c
  reg [7:0] rom [0:255];
  initial $readmemh("{name}_lut.mem", rom);
  assign out_data = rom[in_data ^ 8'h80];
  assign out_valid = in_valid;
  assign in_ready = out_ready;
endmodule
""", {f"{name}_lut.mem": words}


def gelu_module(name: str, spec: dict, layer: dict, chunk: int) -> tuple[str, dict]:
    """i-GELU on one element at a time: v (one + sign(v) (one - (min(|v|, b) - b)^2)) from the
    centred code v, then the layer's requantisation, zero point and clamp (intmath.i_gelu)."""
    lo, hi = scalar_clamp(layer)
    plans = [requant_plan(layer["multiplier"], layer["shift"], spec["rounding"])]
    b, one, izp = int(layer["gelu_b"]), int(layer["gelu_one"]), int(layer["input_zero_point"])
    text = f"""module {name} (input clk, input rst, input [7:0] in_data, input in_valid, output in_ready,
    output reg [7:0] out_data, output reg out_valid, input out_ready);
  // gelu: requant(v (one + sign(v) (one - (min(|v|, b) - b)^2))), v = x - {izp}, b = {b}, one = {one}
{table(name, 1)}
  localparam signed [63:0] B = {b}, ONE = {one}, IZP = {izp};
  reg [1:0] es;
  reg signed [31:0] acc;
  wire signed [63:0] v = $signed(in_data) - IZP;
  wire signed [63:0] mag = v < 0 ? -v : v;
  wire signed [63:0] t = mag < B ? mag : B;
  wire signed [63:0] part = ONE - (t - B) * (t - B);
  wire signed [63:0] erf = v > 0 ? part : v < 0 ? -part : 64'sd0;
  wire signed [63:0] product = v * (ONE + erf);
{instance(name, "acc", plans)}
  wire signed [63:0] y = 64'sd0 + {int(layer['output_zero_point'])} + rq_result;
  assign in_ready = es == 0 && !rst;
  always @(posedge clk) begin
    rq_start <= 1'b0;
    if (rst) begin es <= 0; out_valid <= 1'b0; end
    else case (es)
      0: if (in_valid) begin acc <= product[31:0]; tq <= tab[0]; es <= 1; end
      1: begin rq_start <= 1'b1; es <= 2; end
      2: if (rq_done) begin out_data <= {_clamp_text(8, lo, hi, "y")}; out_valid <= 1'b1; es <= 3; end
      3: if (out_ready) begin out_valid <= 1'b0; es <= 0; end
    endcase
  end
endmodule
"""
    return text + "\n" + unit(f"{name}_rq", plans, spec["rounding"], chunk), {f"{name}_tab.mem": [
        table_word(0, plans[0], lo, hi)]}


def concat_parts(spec: dict, layer: dict) -> tuple[int, list[int]]:
    """(outer, chunk per input) of a concat in stream order."""
    shapes = [spec["tensors"][n]["shape"] for n in layer["inputs"]]
    rank = len(shapes[0])
    order = [1, 2, 0] if rank == 3 else list(range(rank))
    position = order.index(layer["axis"])
    outer = int(np.prod([shapes[0][d] for d in order[:position]], dtype=np.int64))
    return outer, [int(np.prod([s[d] for d in order[position:]], dtype=np.int64)) for s in shapes]


def concat_module(name: str, spec: dict, layer: dict, chunk: int) -> tuple[str, dict]:
    """A concat (or a requantize: one input) with its requant table of one word per input."""
    outer, parts = concat_parts(spec, layer) if layer["op"] == "concat" else (1, [
        int(np.prod(spec["tensors"][layer["inputs"][0]]["shape"]))])
    lo, hi = scalar_clamp(layer)
    plans = [requant_plan(m, s, spec["rounding"]) for m, s in zip(layer["multipliers"], layer["shifts"])]
    words = [table_word(-z, p, lo, hi) for z, p in zip(layer["input_zero_points"], plans)]
    n = len(parts)
    pre = ["in"] if n == 1 else [f"in{i}" for i in range(n)]       # the top names a single input `in`
    ports = "\n".join(f"    input [7:0] {p}_data, input {p}_valid, output {p}_ready," for p in pre)
    readies = "\n".join(f"  assign {p}_ready = es == 0 && part == {i} && !rst;" for i, p in enumerate(pre))
    takes = "\n".join(f"          {i}: if ({p}_valid) begin x <= {p}_data; es <= 1; tq <= tab[{i}]; end"
                      for i, p in enumerate(pre))
    sizes = "\n".join(f"          {i}: last_in_part = cnt == {parts[i] - 1};" for i in range(n))
    text = f"""module {name} (input clk, input rst,
{ports}
    output reg [7:0] out_data, output reg out_valid, input out_ready);
  // {layer['op']}: {outer} time(s) per inference, {parts} element(s) of each input, requantised
{table(name, n)}
  reg [1:0] es;
  reg [{bits(n)}:0] part;
  reg [31:0] cnt, rep;
  reg [7:0] x;
  reg last_in_part;
{instance(name, f"$signed(x) + $signed({FIELD['bias']})", plans)}
  wire signed [63:0] y = 64'sd0 + {int(layer['output_zero_point'])} + rq_result;
{readies}
  always @* begin
    case (part)
{sizes}
      default: last_in_part = 1'b1;
    endcase
  end
  always @(posedge clk) begin
    rq_start <= 1'b0;
    if (rst) begin es <= 0; part <= 0; cnt <= 0; rep <= 0; out_valid <= 1'b0; end
    else case (es)
      0: case (part)
{takes}
          default: ;
        endcase
      1: begin rq_start <= 1'b1; es <= 2; end
      2: if (rq_done) begin out_data <= {_clamp_text(8, lo, hi, "y")}; out_valid <= 1'b1; es <= 3; end
      3: if (out_ready) begin
        out_valid <= 1'b0; es <= 0;
        if (!last_in_part) cnt <= cnt + 1;
        else begin
          cnt <= 0;
          if (part != {n - 1}) part <= part + 1;
          else begin part <= 0; rep <= rep == {outer - 1} ? 0 : rep + 1; end
        end
      end
    endcase
  end
endmodule
"""
    return text + "\n" + unit(f"{name}_rq", plans, spec["rounding"], chunk), {f"{name}_tab.mem": words}


def add_module(name: str, spec: dict, layer: dict, chunk: int) -> tuple[str, dict]:
    """An add: int8 out through three requantisations, or int32 out as the plain sum."""
    z0, z1 = (int(z) for z in layer["input_zero_points"])
    header = f"""module {name} (input clk, input rst,
    input [7:0] in0_data, input in0_valid, output in0_ready,
    input [7:0] in1_data, input in1_valid, output in1_ready,"""
    if "multiplier" not in layer:
        lo, hi = scalar_clamp(layer)
        return header + f"""
    output [31:0] out_data, output out_valid, input out_ready);
  // add on one grid: int32 sum of the centred inputs
  wire signed [31:0] s = ($signed(in0_data) - {z0}) + ($signed(in1_data) - {z1});
  assign out_data = {_clamp_text(32, lo, hi, "s")};
  assign out_valid = in0_valid && in1_valid;
  assign in0_ready = out_ready && in1_valid;
  assign in1_ready = out_ready && in0_valid;
endmodule
""", {}
    lo, hi = scalar_clamp(layer)
    rounding = spec["rounding"]
    plans = [requant_plan(m, s, rounding) for m, s in zip(layer["multipliers"], layer["shifts"])]
    plans.append(requant_plan(layer["multiplier"], layer["shift"], rounding))
    words = [table_word(0, p, lo, hi) for p in plans]
    ls = int(layer["left_shift"])
    text = header + f"""
    output reg [7:0] out_data, output reg out_valid, input out_ready);
  // add: requant((x0 - {z0}) << {ls}) + requant((x1 - {z1}) << {ls}), requantised to the output grid
{table(name, 3)}
  reg [2:0] es;
  reg [1:0] phase;
  reg signed [63:0] c0, c1, total;
  wire signed [63:0] operand = phase == 0 ? c0 : phase == 1 ? c1 : total;
{instance(name, "operand", plans)}
  wire signed [63:0] y = 64'sd0 + {int(layer['output_zero_point'])} + rq_result;
  assign in0_ready = es == 0 && in1_valid && !rst;
  assign in1_ready = es == 0 && in0_valid && !rst;
  always @(posedge clk) begin
    rq_start <= 1'b0;
    if (rst) begin es <= 0; out_valid <= 1'b0; end
    else case (es)
      0: if (in0_valid && in1_valid) begin
        c0 <= ($signed(in0_data) - {z0}) <<< {ls}; c1 <= ($signed(in1_data) - {z1}) <<< {ls};
        phase <= 0; total <= 64'sd0; tq <= tab[0]; es <= 1;
      end
      1: begin rq_start <= 1'b1; es <= 2; end
      2: if (rq_done) begin
        if (phase == 2) begin out_data <= {_clamp_text(8, lo, hi, "y")}; out_valid <= 1'b1; es <= 3; end
        else begin total <= total + rq_result; phase <= phase + 1; tq <= tab[phase + 1]; es <= 1; end
      end
      3: if (out_ready) begin out_valid <= 1'b0; es <= 0; end
      default: es <= 0;
    endcase
  end
endmodule
"""
    return text + "\n" + unit(f"{name}_rq", plans, rounding, chunk, acc_bits=64), {f"{name}_tab.mem": words}
