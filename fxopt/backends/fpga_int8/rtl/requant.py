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
FIELD = {k: f"tq[{msb}:{lsb}]" for k, (msb, lsb) in FIELDS.items()}   # the fields of the word read, `tq`


def table(module: str, words: int) -> str:
    """Verilog of a layer's constant table (`<module>_tab.mem`, `words` words) and the word read, tq."""
    return (f'  (* rom_style = "logic" *) reg [{TABLE_BITS - 1}:0] tab [0:{words - 1}];   // few words, too wide '
            f'for a BRAM\n  initial $readmemh("{module}_tab.mem", tab);\n  reg [{TABLE_BITS - 1}:0] tq;')


def instance(module: str, acc: str, plans: list[RequantPlan]) -> str:
    """Verilog wiring a layer's unit `<module>_rq` to `acc` and the fields of tq: `rq_start` (a
    one-cycle pulse), `rq_done`, `rq_result`."""
    return (f"  reg rq_start;\n  wire rq_done;\n  wire signed [{result_bits(plans) - 1}:0] rq_result;\n"
            f"  {module}_rq rq (.clk(clk), .start(rq_start), .acc({acc}), .mult({FIELD['mult']}), "
            f".pre({FIELD['pre']}), .post({FIELD['post']}), .zero({FIELD['zero']}), .done(rq_done), "
            f".result(rq_result));")


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
    clamp = layer.get("clamp", [-128, 127])          # a max pool keeps its input's codes: no clamp
    lo = np.broadcast_to(np.atleast_1d(np.asarray(clamp[0], dtype=np.int64)), (channels,))
    hi = np.broadcast_to(np.atleast_1d(np.asarray(clamp[1], dtype=np.int64)), (channels,))
    if "multiplier" in layer:
        m0s, shifts = per_channel("multiplier", 0), per_channel("shift", 0)
        plans = [requant_plan(m, s, rounding) for m, s in zip(m0s, shifts)]
    else:
        plans = [RequantPlan(1, 0, 0, False)] * channels
    words = [table_word(b, p, lo_, hi_) for b, p, lo_, hi_ in zip(bias, plans, lo, hi)]
    return words, plans


def result_bits(plans: list[RequantPlan]) -> int:
    """Signed bits of the unit's result: the 64-bit product (|acc * M0| < 2^63) loses `post` bits
    to the right shift, and a pre shift, a plan of 0 or no shift keeps all 64."""
    live = [p for p in plans if not p.zero]
    if not live or any(p.pre or p.post == 0 for p in live):
        return 64
    return 64 - min(p.post for p in live) + 1


def has_multiplier(plans: list[RequantPlan], chunk: int | None) -> bool:
    """Whether a unit has a multiplier cell: a serial one (`chunk` bits per cycle) above 4 bits,
    a pipelined one (chunk None) unless every multiplier is 1."""
    return chunk > 4 if chunk else any(p.mult != 1 for p in plans)


def requant_cycles(chunk: int) -> int:
    """Cycles of the unit from `start` to `done`: the product's steps, then the rounding."""
    return math.ceil(31 / chunk) + 1


def unit(module: str, plans: list[RequantPlan], rounding: str, chunk: int, acc_bits: int = 32) -> str:
    """Verilog of one requant unit: `start` (one cycle) loads acc and the plan; `done` pulses
    with `result` after ceil(31 / chunk) + 1 cycles (the product, then the rounding from the
    registered product: the multiplier's adder and the rounding's are not one path). The multiplier's chunks are taken from the most
    significant end, so the product shifts left and acc stays as it came; `pre` and `post` are
    cases over the values the layer's channels use (no barrel shifters), and the result is as
    wide as the largest rounded value can be (result_bits)."""
    steps = requant_cycles(chunk) - 1
    padded = steps * chunk
    width = result_bits(plans)
    if chunk <= 4:      # a few bits: shifted copies of acc, added (no multiplier cell, no DSP)
        term = " + ".join(f"(m[{padded - chunk + i}] ? a <<< {i} : 64'sd0)" for i in range(chunk))
    else:
        term = f"a * $signed({{1'b0, m[{padded - 1}:{padded - chunk}]}})"
    return f"""module {module} (input clk, input start, input signed [{acc_bits - 1}:0] acc, input [30:0] mult,
    input [5:0] pre, input [5:0] post, input zero, output reg done, output reg signed [{width - 1}:0] result);
  // requantisation ({rounding} rounding), {chunk} multiplier bit(s) per cycle, {steps} + 1 cycle(s)
  reg signed [{acc_bits - 1}:0] a;
  reg signed [63:0] prod;
  reg [{padded - 1}:0] m;
  reg [5:0] r_pre, r_post;
  reg r_zero, m_is_one, busy;
  reg [5:0] step;
  wire signed [63:0] term = {term};
  wire signed [63:0] prod_next = (prod <<< {chunk}) + term;
{rounding_logic(plans, rounding)}
  always @(posedge clk) begin
    done <= 1'b0;
    if (start) begin
      a <= acc; prod <= 64'sd0; m <= mult; r_pre <= pre; r_post <= post; r_zero <= zero;
      m_is_one <= (mult == 31'd1); busy <= 1'b1; step <= 6'd0;
    end else if (busy) begin
      if (step != 6'd{steps}) begin prod <= prod_next; m <= m << {chunk}; step <= step + 6'd1; end
      else begin busy <= 1'b0; done <= 1'b1; result <= r_zero ? 0 : rounded; end   // from the registered product
    end
  end
endmodule
"""


def rounding_logic(plans: list[RequantPlan], rounding: str) -> str:
    """The combinational half of a unit: from the registered product `prod` and the registered
    plan (`r_pre`, `r_post`, `m_is_one`) to `rounded`: the pre shift, the SRDHM high half in
    "double" mode, then the rounded right shift, each a case over the values the layer uses."""
    width = result_bits(plans)
    pres = sorted({p.pre for p in plans} | {0})
    posts = sorted({p.post for p in plans} | {0})
    pre_cases = "\n".join(f"      6'd{v}: shifted = prod <<< {v};" for v in pres)
    cases = []
    for p in posts:
        if p == 0:
            cases.append(f"      6'd0: rounded = x[{width - 1}:0];")
            continue
        sticky = f"|x[{p - 2}:0]" if p > 1 else "1'b0"
        up = "x[{0}] && ({1} || x[{2}])".format(p - 1, sticky, p) if rounding == "single" else \
            "x[{0}] && (!x[63] || {1})".format(p - 1, sticky)
        cases.append(f"      6'd{p}: begin up = {up}; rounded = $signed(x[63:{p}]) + (up ? 1 : 0); end")
    srdhm = ("    if (m_is_one) x = shifted; else begin\n"
             "      num = shifted + (shifted[63] ? 64'sd1 - 64'sd1073741824 : 64'sd1073741824);\n"
             "      x = num[63] ? -((-num) >>> 31) : num >>> 31;\n    end"
             if rounding == "double" else "    x = shifted;")
    return f"""  reg signed [63:0] shifted, num, x;
  reg signed [{width - 1}:0] rounded;
  reg up;
  always @* begin
    num = 64'sd0; up = 1'b0;
    case (r_pre)
{pre_cases}
      default: shifted = 64'sd0;
    endcase
{srdhm}
    case (r_post)
{chr(10).join(cases)}
      default: rounded = 0;
    endcase
  end"""


PIPELINED_CYCLES = 3      # a pipelined unit's result comes 3 edges after its start


def pipelined_unit(module: str, plans: list[RequantPlan], rounding: str, acc_bits: int = 32) -> str:
    """Verilog of a unit that takes one accumulator every cycle, for a layer whose lanes finish
    a block of channels every cycle or two: `start` latches acc and the plan, the next edge
    multiplies all 31 bits at once (or passes acc on, when every multiplier is 1), the one
    after rounds; `done` pulses with `result` PIPELINED_CYCLES edges after `start`, in the
    order the accumulators came."""
    width = result_bits(plans)
    # a layer whose every multiplier is 1 (pow2_scales: shifts only) needs no multiplier cell
    product = "a * $signed({1'b0, m})" if has_multiplier(plans, None) else "a"
    return f"""module {module} (input clk, input start, input signed [{acc_bits - 1}:0] acc, input [30:0] mult,
    input [5:0] pre, input [5:0] post, input zero, output reg done, output reg signed [{width - 1}:0] result);
  // requantisation ({rounding} rounding), pipelined: one accumulator per cycle, {PIPELINED_CYCLES} cycles each
  reg signed [{acc_bits - 1}:0] a;
  reg [30:0] m;
  reg [5:0] pre1, post1, r_pre, r_post;
  reg zero1, r_zero, m_is_one, v1, v2;
  reg signed [63:0] prod;
{rounding_logic(plans, rounding)}
  always @(posedge clk) begin
    v1 <= start; v2 <= v1; done <= v2;
    if (start) begin a <= acc; m <= mult; pre1 <= pre; post1 <= post; zero1 <= zero; end
    if (v1) begin
      prod <= {product}; r_pre <= pre1; r_post <= post1; r_zero <= zero1; m_is_one <= m == 31'd1;
    end
    if (v2) result <= r_zero ? 0 : rounded;
  end
endmodule
"""
