"""Verilog of the parallel-io design (`rtl_io="parallel"`): every tensor is a vector moved whole in one beat.

The stream design (window.py) moves one element per beat, so a layer costs at least as
many cycles as its input and output have elements, however many multipliers it has. A
fully connected network (linears over vectors, clamps, as hls4ml's io_parallel builds it)
needs no line buffer, so here each tensor crosses a layer boundary as one wide word, and at
a low reuse factor a layer takes a handful of cycles.

A dense module (one linear) reads its input in place: the producer keeps the word and its
valid up until the handshake, and writes no new result while its output is valid. The
folding is plan.fold's (Q lanes x L multipliers, D cycles per block of Q channels, B
blocks); each cycle one (block, cycle) position is issued:

- S1: the position's L inputs, minus the zero point, and its ROM word of Q x L weights
  (registered; when B = D = 1 the one word is a constant and S1 is wires, a cycle saved);
- S2: Q dot products of L, accumulated; at a block's last cycle the sums plus bias go
  straight into the lanes' requant units, one per lane;
- a unit's result, plus the output zero point and clamped, is written into the output
  word at its channel; after the last block the output is valid.

The units: pipelined (requant.pipelined_unit, a new accumulator every cycle) when a block
takes one or two cycles, else the serial unit at ceil(31 / (D - 2)) multiplier bits per
cycle, done before its lane's next block starts. A layer takes its next input once the
previous output has been handed on.
"""
from __future__ import annotations

import math

import numpy as np

from ....errors import UnsupportedError
from .plan import fold, refuse
from .requant import (FIELDS, PIPELINED_CYCLES, TABLE_BITS, channel_table, has_multiplier, pipelined_unit,
                      requant_cycles, result_bits, table, unit)
from .stream import scalar_clamp
from .top import Design, one_input_one_output, testbench, verilog_name
from .window import bits, weight_words

PARALLEL_OPS = ("linear", "clamp", "reshape")


def _lo_hi(width: int) -> tuple[str, str]:
    """The clamp bounds of table word `w`, cut to `width` bits."""
    lo, hi = FIELDS["lo"][1], FIELDS["hi"][1]
    return f"w[{lo + width - 1}:{lo}]", f"w[{hi + width - 1}:{hi}]"


def dense_module(name: str, spec: dict, layer: dict, weight, reuse_factor: int) -> tuple[str, dict, dict]:
    """(Verilog, {mem file: lines}, facts) of one linear over a vector, parallel io."""
    K, O = int(spec["tensors"][layer["inputs"][0]]["shape"][0]), int(weight.shape[0])
    OWD = 8 if spec["tensors"][layer["output"]]["dtype"] == "int8" else 32
    f = fold(K, O, reuse_factor)
    Q, L, D, B = f.lanes, f.width, f.depth, f.blocks
    direct = B * D == 1
    words, plans = channel_table(layer, O, spec["rounding"])
    requants = "multiplier" in layer
    pipelined = D <= 2
    chunk = 31 if pipelined else math.ceil(31 / (D - 2))
    g = {"G": 1, "Og": O, "K": K, "weights": np.asarray(weight, dtype=np.int64).reshape(1, O, K)}
    mems = {f"{name}_tab.mem": words, f"{name}_w.mem": weight_words(g, f)}
    lo, hi = _lo_hi(OWD)
    zp, ozp = int(layer.get("input_zero_point", 0)), int(layer.get("output_zero_point", 0))

    def channel(q: int, block: str) -> str:
        return f"{block} * {Q} + {q}" if B > 1 else str(q)

    def position(j: int) -> str:
        return f"ii * {L} + {j}" if D > 1 else str(j)

    s1, decl = [], []
    for j in range(L):
        inside = f"{position(j)} < {K}" if D > 1 else ("1'b1" if j < K else "1'b0")
        value = f"({inside} ? centre(in_data[({position(j)}) * 8 +: 8]) : 10'sd0)"
        if direct:
            decl.append(f"  wire signed [9:0] xs{j} = {value};")
        else:
            decl.append(f"  reg signed [9:0] xs{j};")
            s1.append(f"      xs{j} <= {value};")
    rom_bits = Q * L * 8
    decl.append(f"  reg [{rom_bits - 1}:0] wrom [0:{B * D - 1}];\n  initial $readmemh(\"{name}_w.mem\", wrom);")
    if direct:
        decl.append(f"  wire [{rom_bits - 1}:0] wq = wrom[0];\n  wire s1_valid = go, s1_first = 1'b1, "
                    f"s1_last = 1'b1;\n  wire [{bits(B)}:0] s1_block = 0;")
    else:
        decl.append(f"  reg [{rom_bits - 1}:0] wq;\n  reg s1_valid, s1_first, s1_last;\n  reg [{bits(B)}:0] s1_block;")
        s1.append(f"      wq <= wrom[wa]; s1_first <= ii == 0; s1_last <= ii == {D - 1}; s1_block <= ib;")
    lanes = []
    for q in range(Q):
        dot = " + ".join(f"xs{j} * $signed(wq[{(q * L + j) * 8 + 7}:{(q * L + j) * 8}])" for j in range(L))
        o = channel(q, "s1_block")
        lanes.append(f"  reg signed [31:0] acc{q};\n"
                     f"  wire signed [31:0] sum{q} = (s1_first ? 32'sd0 : acc{q}) + {dot};\n"
                     f"  wire [{TABLE_BITS - 1}:0] tw{q} = tab[{o} < {O} ? {o} : 0];\n"
                     f"  wire signed [31:0] total{q} = sum{q} + $signed(tw{q}[{FIELDS['bias'][0]}:{FIELDS['bias'][1]}]);")
    s2 = [f"      acc{q} <= sum{q};" for q in range(Q)]
    writes = []
    if requants:
        module_rq = f"{name}_rq"
        rq_text = (pipelined_unit(module_rq, plans, spec["rounding"]) if pipelined
                   else unit(module_rq, plans, spec["rounding"], chunk))
        for q in range(Q):
            fields = ", ".join(f".{k}(tw{q}[{FIELDS[k][0]}:{FIELDS[k][1]}])" for k in ("mult", "pre", "post", "zero"))
            lanes.append(f"  wire done{q};\n  wire signed [{result_bits(plans) - 1}:0] result{q};\n"
                         f"  {module_rq} rq{q} (.clk(clk), .start(s1_valid && s1_last), .acc(total{q}), {fields}, "
                         f".done(done{q}), .result(result{q}));")
            o = channel(q, "rb")
            writes.append(f"        if ({o} < {O}) res[({o}) * {OWD} +: {OWD}] <= "
                          f"clampv(64'sd0 + ({ozp}) + result{q}, tab[{o} < {O} ? {o} : 0]);")
        rb = (f"  reg [{bits(B)}:0] rb1, rb2, rb;\n  always @(posedge clk) begin rb1 <= s1_block; rb2 <= rb1; "
              f"rb <= rb2; end" if pipelined else
              f"  reg [{bits(B)}:0] rb;\n  always @(posedge clk) if (s1_valid && s1_last) rb <= s1_block;")
        results = f"""    if (done0) begin
{chr(10).join(writes)}
        if (rb == {B - 1}) begin pending <= 1'b1; tail <= 1'b0; end
    end"""
        cycles_rq = PIPELINED_CYCLES if pipelined else requant_cycles(chunk) + 1
    else:
        rq_text, rb, cycles_rq = "", "", 0
        for q in range(Q):
            o = channel(q, "s1_block")
            writes.append(f"        if ({o} < {O}) res[({o}) * {OWD} +: {OWD}] <= clampv(64'sd0 + total{q}, tw{q});")
        results = f"""    if (s1_valid && s1_last) begin
{chr(10).join(writes)}
        if (s1_block == {B - 1}) begin pending <= 1'b1; tail <= 1'b0; end
    end"""
    if direct:
        issue = "      tail <= 1'b1;"
    else:
        issue = f"""      wa <= last_pos ? 0 : wa + 1;
      if (last_pos) begin busy <= 1'b0; ii <= 0; ib <= 0; tail <= 1'b1; end
      else begin
        busy <= 1'b1;
        if (ii == {D - 1}) begin ii <= 0; ib <= ib + 1; end else ii <= ii + 1;
      end"""
    reset_s1 = "" if direct else " s1_valid <= 1'b0;"
    last_pos = "1'b1" if direct else f"ib == {B - 1} && ii == {D - 1}"
    text = f"""// {name}: linear {K} -> {O}, parallel io; {Q} lane(s) x {L} multiplier(s), {D} cycle(s) per block of {Q}
// channel(s), {B} block(s); requant: {'none (int32 output)' if not requants else ('pipelined' if pipelined else f'{chunk} bit(s) per cycle')}
module {name} (input clk, input rst,
    input [{K * 8 - 1}:0] in_data, input in_valid, output in_ready,
    output [{O * OWD - 1}:0] out_data, output out_valid, input out_ready);
{table(name, O)}
  function signed [9:0] centre(input signed [7:0] c);
    centre = c - ({zp});
  endfunction
  function [{OWD - 1}:0] clampv(input signed [63:0] v, input [{TABLE_BITS - 1}:0] w);
    clampv = v < $signed(w[{FIELDS['lo'][0]}:{FIELDS['lo'][1]}]) ? {lo}
           : v > $signed(w[{FIELDS['hi'][0]}:{FIELDS['hi'][1]}]) ? {hi} : v[{OWD - 1}:0];
  endfunction
  reg busy, pending, tail;       // issuing an input; the output word is complete; its last block is in the units
  reg [{bits(D)}:0] ii;
  reg [{bits(B)}:0] ib;
  reg [{bits(B * D)}:0] wa;
  reg [{O * OWD - 1}:0] res;
  wire last_pos = {last_pos};
  wire can_start = busy || (!tail && !pending);
  wire go = in_valid && can_start && !rst;
  assign in_ready = can_start && last_pos && !rst;
  assign out_data = res;
  assign out_valid = pending;
{chr(10).join(decl)}
{chr(10).join(lanes)}
{rb}
  always @(posedge clk) begin
    if (rst) begin
      busy <= 1'b0; pending <= 1'b0; tail <= 1'b0; ii <= 0; ib <= 0; wa <= 0;{reset_s1}
    end else begin
{'' if direct else '    s1_valid <= go;'}
    if (go) begin
{chr(10).join(s1)}
{issue}
    end
    if (s1_valid) begin
{chr(10).join(s2)}
    end
{results}
    if (pending && out_ready) pending <= 1'b0;
    end
  end
endmodule
"""
    if rq_text:
        text += "\n" + rq_text
    multiplies = requants and has_multiplier(plans, None if pipelined else chunk)
    facts = {"multipliers": Q * L, "lanes": Q, "width": L, "requant_multipliers": Q if multiplies else 0,
             "requant_chunk": chunk if requants else 0, "cycles": B * D + (0 if direct else 1) + cycles_rq + 1}
    return text, mems, facts


def clamp_vector_module(name: str, layer: dict, size: int, width: int) -> str:
    lo, hi = scalar_clamp(layer)
    elements = ", ".join(f"c(in_data[{k * width} +: {width}])" for k in reversed(range(size)))
    return f"""module {name} (input clk, input rst, input [{size * width - 1}:0] in_data, input in_valid, output in_ready,
    output [{size * width - 1}:0] out_data, output out_valid, input out_ready);
  // clamp each of {size} elements to [{lo}, {hi}], combinational
  function [{width - 1}:0] c(input signed [{width - 1}:0] x);
    c = x < {lo} ? {lo} : x > {hi} ? {hi} : x;
  endfunction
  assign out_data = {{{elements}}};
  assign out_valid = in_valid;
  assign in_ready = out_ready;
endmodule
"""


def parallel_design(spec: dict, weights: dict, reuse_factor: int = 1) -> Design:
    """The Design of a fully connected model in parallel io; any other layer is refused by name."""
    one_input_one_output(spec)
    alias, readers = {}, {}
    for layer in spec["layers"]:
        if layer["op"] not in PARALLEL_OPS:
            raise refuse(layer, "has no parallel-io form (a linear over a vector, a clamp or a reshape)",
                         "use rtl_io='stream', which covers convolutions, pools, adds and concats")
        source = alias.get(layer["inputs"][0], layer["inputs"][0])
        if layer["op"] == "reshape":          # a wire: the same word under another name
            alias[layer["output"]] = source
            continue
        readers.setdefault(source, []).append(layer["name"])
        if layer["op"] == "linear" and len(spec["tensors"][layer["inputs"][0]]["shape"]) != 1:
            raise refuse(layer, f"reads a tensor of shape {spec['tensors'][layer['inputs'][0]]['shape']}, not a vector",
                         "use rtl_io='stream' (a linear over rows)")
    for tensor, names in readers.items():
        if len(names) > 1:
            raise UnsupportedError(f"fpga-int8 RTL: tensor {tensor!r} is read by {len(names)} layers ({names}); "
                                   "parallel io has no forks", where=f"tensor {tensor!r}", hint="use rtl_io='stream'")
    width = lambda t: 8 if spec["tensors"][t]["dtype"] == "int8" else 32  # noqa: E731
    size = lambda t: int(np.prod(spec["tensors"][t]["shape"]))  # noqa: E731
    first, last = spec["inputs"][0]["name"], spec["outputs"][0]
    out = Design(input_perm=np.arange(size(first)), output_perm=np.arange(size(last)), output_width=width(last),
                 input_size=size(first), output_size=size(last), io="parallel")
    used, texts, body = set(), [], []
    wires = {first: "in"}
    for layer in spec["layers"]:
        if layer["op"] == "reshape":
            wires[layer["output"]] = wires[alias.get(layer["inputs"][0], layer["inputs"][0])]
            continue
        name = verilog_name(layer["name"], used)
        src, n = wires[alias.get(layer["inputs"][0], layer["inputs"][0])], size(layer["output"])
        if layer["op"] == "linear":
            text, mems, facts = dense_module(name, spec, layer, weights[layer["name"]], reuse_factor)
            out.files.update({k: "\n".join(v) + "\n" for k, v in mems.items()})
        else:
            text, facts = clamp_vector_module(name, layer, n, width(layer["output"])), {"cycles": 0}
        texts.append(text)
        out.layers[layer["name"]] = {"module": name, **facts}
        body.append(f"  wire [{n * width(layer['output']) - 1}:0] s_{name}_data;\n  wire s_{name}_valid, s_{name}_ready;\n"
                    f"  {name} u_{name} (.clk(clk), .rst(rst), .in_data({src}_data), .in_valid({src}_valid), "
                    f".in_ready({src}_ready), .out_data(s_{name}_data), .out_valid(s_{name}_valid), "
                    f".out_ready(s_{name}_ready));")
        wires[layer["output"]] = f"s_{name}"
    end = wires[alias.get(last, last)]
    top = (f"module fxopt_top (input clk, input rst, input [{out.input_size * 8 - 1}:0] in_data, input in_valid, "
           f"output in_ready,\n    output [{out.output_size * out.output_width - 1}:0] out_data, output out_valid, "
           f"input out_ready);\n" + "\n".join(body) +
           f"\n  assign out_data = {end}_data; assign out_valid = {end}_valid; assign {end}_ready = out_ready;\n"
           "endmodule\n")
    out.files["fxopt_top.v"] = "\n".join(texts) + "\n" + top
    out.files["tb.v"] = testbench(out)
    return out

