"""The requantisation unit in Verilog, and the per-channel constant table that drives it.

A layer's unit takes an accumulator and one channel's plan (plan.requant_plan: multiplier,
pre shift, post shift, zero) and returns round(acc * M0 * 2^(shift-31)) exactly as
fixedpoint.requantize does. The 64-bit product is built over ceil(31 / chunk) cycles,
`chunk` bits of the multiplier per cycle (plan.requant_chunk), so a layer with cycles to
spare uses a narrow multiplier (one bit: an adder). The rounded right shift is a case over
the shift amounts the layer's channels actually use, not a 64-bit barrel shifter.

The table holds one word per output channel, from the most significant field down:
bias (32) | multiplier (31) | pre (6) | post (6) | zero (1) | lo (32) | hi (32).
"""
from __future__ import annotations

import math

import numpy as np

from .plan import RequantPlan, requant_plan

TABLE_BITS = 32 + 31 + 6 + 6 + 1 + 32 + 32
# (name, msb, lsb) of each field in a table word
FIELDS = {"bias": (139, 108), "mult": (107, 77), "pre": (76, 71), "post": (70, 65), "zero": (64, 64),
          "lo": (63, 32), "hi": (31, 0)}


def table_word(bias: int, plan: RequantPlan, lo: int, hi: int) -> str:
    """One channel's constants as a hex word of TABLE_BITS bits."""
    word = 0
    for name, value in (("bias", bias), ("mult", plan.mult), ("pre", plan.pre), ("post", plan.post),
                        ("zero", int(plan.zero)), ("lo", lo), ("hi", hi)):
        msb, lsb = FIELDS[name]
        word |= (int(value) & ((1 << (msb - lsb + 1)) - 1)) << lsb
    return f"{word:0{math.ceil(TABLE_BITS / 4)}x}"


def channel_table(layer: dict, channels: int, rounding: str) -> tuple[list[str], list[RequantPlan]]:
    """(hex words, plans) for a layer's output channels; scalars broadcast to every channel, and a
    layer without a requantization (int32 output, max pool) gets plans that are never used."""
    def per_channel(key, default):
        values = np.atleast_1d(np.asarray(layer.get(key, default), dtype=np.int64))
        return np.broadcast_to(values, (channels,)) if values.size == 1 else values

    bias = per_channel("bias", 0)
    lo = np.broadcast_to(np.atleast_1d(np.asarray(layer["clamp"][0], dtype=np.int64)), (channels,))
    hi = np.broadcast_to(np.atleast_1d(np.asarray(layer["clamp"][1], dtype=np.int64)), (channels,))
    if "multiplier" in layer:
        m0s, shifts = per_channel("multiplier", 0), per_channel("shift", 0)
        plans = [requant_plan(m, s, rounding) for m, s in zip(m0s, shifts)]
    else:
        plans = [RequantPlan(1, 0, 0, False)] * channels
    words = [table_word(b, p, lo_, hi_) for b, p, lo_, hi_ in zip(bias, plans, lo, hi)]
    return words, plans


def unit(module: str, plans: list[RequantPlan], rounding: str, chunk: int) -> str:
    """Verilog of one requant unit: `start` (one cycle) loads acc and the plan; `done` pulses
    with `result` after ceil(31 / chunk) cycles."""
    steps = math.ceil(31 / chunk)
    posts = sorted({p.post for p in plans} | {0})
    cases = []
    for p in posts:
        if p == 0:
            cases.append("      6'd0: rounded = x;")
            continue
        sticky = f"|x[{p - 2}:0]" if p > 1 else "1'b0"
        up = "g && (s || q[0])" if rounding == "single" else "g && (!x[63] || s)"
        cases.append(f"      6'd{p}: begin q = x >>> {p}; g = x[{p - 1}]; s = {sticky}; rounded = q + {{63'd0, {up}}}; end")
    srdhm = ("    if (m_is_one) begin x = shifted; end else begin\n"
             "      num = shifted + (shifted[63] ? 64'sd1 - 64'sd1073741824 : 64'sd1073741824);\n"
             "      x = num[63] ? -((-num) >>> 31) : num >>> 31;\n    end"
             if rounding == "double" else "    x = shifted;")
    return f"""module {module} (input clk, input start, input signed [63:0] acc, input [30:0] mult,
    input [5:0] pre, input [5:0] post, input zero, output reg done, output reg signed [63:0] result);
  // requantisation ({rounding} rounding), {chunk} multiplier bit(s) per cycle, {steps} cycle(s)
  reg signed [63:0] a, prod;
  reg [30:0] m;
  reg [5:0] r_pre, r_post;
  reg r_zero, m_is_one, busy;
  reg [5:0] step;
  wire signed [63:0] term = a * $signed({{1'b0, m[{chunk - 1}:0]}});
  wire signed [63:0] sum = prod + term;
  reg signed [63:0] shifted, num, x, q, rounded;
  reg g, s;
  always @* begin
    shifted = sum <<< r_pre;
    num = 64'sd0; q = 64'sd0; g = 1'b0; s = 1'b0;
{srdhm}
    case (r_post)
{chr(10).join(cases)}
      default: rounded = 64'sd0;
    endcase
  end
  always @(posedge clk) begin
    done <= 1'b0;
    if (start) begin
      a <= acc; prod <= 64'sd0; m <= mult; r_pre <= pre; r_post <= post; r_zero <= zero;
      m_is_one <= (mult == 31'd1); busy <= 1'b1; step <= 6'd0;
    end else if (busy) begin
      prod <= sum; a <= a <<< {chunk}; m <= m >> {chunk}; step <= step + 6'd1;
      if (step == 6'd{steps - 1}) begin
        busy <= 1'b0; done <= 1'b1; result <= r_zero ? 64'sd0 : rounded;
      end
    end
  end
endmodule
"""
