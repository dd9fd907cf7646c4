"""Verilog of the window layers: conv2d (depthwise and grouped too), linear, max and avg pooling.

One module per layer, one element per beat in and out (plan.py's stream order), and one
state machine per output pixel (a linear is a 1x1 convolution over a 1x1 image, or over
T rows of a [T, F] input):

- LOAD: input rows go into a line buffer of R = (kh - 1) * dilation + 1 rows, until the
  rows the next output row reads are in (rows past the last output row are taken and
  dropped, so the next frame starts aligned);
- GATHER (per group of channels): the window's K elements are read from the line buffer,
  padding reading the zero point, and spread over L banks (conv / linear), or reduced on
  the fly (max / sum, pools);
- MAC (per block of Q output channels): D cycles of Q x L multiplies from the banks and
  the weight ROM (one word of Q x L int8 weights per cycle, initialised by $readmemh);
- then the block's accumulators are handed to the emitter, which, while the next block or
  pixel computes, sends each channel's accumulator plus bias through the layer's requant unit
  (requant.py), the zero point and the clamp, and out; an int32 output is clamped only.
"""
from __future__ import annotations


import numpy as np

from .plan import Fold, fold, requant_chunk
from .requant import FIELD, FIELDS, channel_table, has_multiplier, instance, requant_cycles, table, unit


def bits(n: int) -> int:
    """Unsigned bits that hold 0..n."""
    return max(1, int(n).bit_length())


def geometry(spec: dict, layer: dict, weight, perm_in) -> dict:
    """The sizes of a window layer (see module docstring), and its weights as [G, Og, K]."""
    ins, out = spec["tensors"][layer["inputs"][0]], spec["tensors"][layer["output"]]
    g = {"IW": 8 if ins["dtype"] == "int8" else 32, "OWD": 8 if out["dtype"] == "int8" else 32,
         "ZP": int(layer.get("input_zero_point", 0)), "OZP": int(layer.get("output_zero_point", 0)),
         "kind": "mac", "weights": None}
    op = layer["op"]
    if op == "linear":
        shape = ins["shape"]
        g.update(C=shape[-1], H=shape[0] if len(shape) == 2 else 1, W=1, KH=1, KW=1, SH=1, SW=1, PH=0, PW=0,
                 DH=1, DW=1, G=1, O=int(weight.shape[0]))
        w = weight[:, perm_in] if len(shape) == 1 else weight
        g["weights"] = np.asarray(w, dtype=np.int64).reshape(1, g["O"], -1)
    else:
        C, H, W = ins["shape"]
        if op == "conv2d":
            O, _, KH, KW = weight.shape
            groups = int(layer["groups"])
            g["weights"] = np.asarray(weight, dtype=np.int64).reshape(groups, O // groups, -1)
        else:
            O, groups = C, C
            KH, KW = layer["kernel"]
            g["kind"] = "max" if op == "max_pool2d" else "avg"
        (SH, SW), (PH, PW) = layer["stride"], layer["padding"]
        DH, DW = layer.get("dilation", [1, 1])
        g.update(C=C, H=H, W=W, KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW, G=groups, O=O)
    g["Cg"], g["Og"] = g["C"] // g["G"], g["O"] // g["G"]
    g["K"] = g["Cg"] * g["KH"] * g["KW"]
    g["R"] = min((g["KH"] - 1) * g["DH"] + 1, g["H"])
    g["OH"] = (g["H"] + 2 * g["PH"] - g["DH"] * (g["KH"] - 1) - 1) // g["SH"] + 1
    g["OW"] = (g["W"] + 2 * g["PW"] - g["DW"] * (g["KW"] - 1) - 1) // g["SW"] + 1
    return g


def weight_words(g: dict, f: Fold) -> list[str]:
    """The weight ROM: for each group, block and cycle, Q lanes x L int8 weights, lane 0 / multiplier
    0 in the low byte; lanes past the group's channels and window positions past K hold 0."""
    words, digits = [], max(1, f.multipliers * 2)
    for grp in range(g["G"]):
        for block in range(f.blocks):
            for i in range(f.depth):
                word = 0
                for q in range(f.lanes):
                    o = block * f.lanes + q
                    for j in range(f.width):
                        k = i * f.width + j
                        if o < g["Og"] and k < g["K"]:
                            word |= (int(g["weights"][grp, o, k]) & 0xFF) << (8 * (q * f.width + j))
                words.append(f"{word:0{digits}x}")
    return words


def cycles_per_frame(g: dict, f: Fold | None, chunk: int) -> int:
    """MAC-side cycles of one inference (gather, MAC and emit; loading overlaps with upstream)."""
    emit = 4 + (requant_cycles(chunk) + 1 if chunk else 0)
    per_group = g["K"] + 2 + ((f.depth + 1) * f.blocks if f else 0)
    return g["OH"] * g["OW"] * (g["G"] * per_group + g["O"] * emit)


def module(name: str, spec: dict, layer: dict, weight, perm_in, reuse_factor: int) -> tuple[str, dict, dict]:
    """(Verilog, {mem file: lines}, facts) of one window layer."""
    g = geometry(spec, layer, weight, perm_in)
    f = fold(g["K"], g["Og"], reuse_factor) if g["kind"] == "mac" else None
    requants = "multiplier" in layer
    chunk = requant_chunk(g["O"], reuse_factor) if requants else 0
    words, plans = channel_table(layer, g["O"], spec["rounding"])
    mems = {f"{name}_tab.mem": words}
    if f:
        mems[f"{name}_w.mem"] = weight_words(g, f)
    text = _verilog(name, g, f, chunk, plans)
    if requants:
        text += "\n" + unit(f"{name}_rq", plans, spec["rounding"], chunk)
    facts = {"multipliers": f.multipliers if f else 0, "lanes": f.lanes if f else 1,
             "width": f.width if f else 0, "requant_chunk": chunk,
             "requant_multipliers": int(requants and has_multiplier(plans, chunk)),
             "cycles": cycles_per_frame(g, f, chunk), "line_buffer_bytes": g["R"] * g["W"] * g["C"] * g["IW"] // 8}
    return text, mems, facts


def _style(bits_: int, kind: str = "ram") -> str:
    """A ROM of at most 256 bits is kept in logic: a 4 Kbit block RAM for it is mostly empty,
    and small FPGAs have few of them. (Small RAMs stay in block RAM: in logic, their write and
    read multiplexers cost more LUTs than the block saves.)"""
    return f'(* {kind}_style = "logic" *) ' if bits_ <= 256 else ""


def _addressing(g: dict) -> str:
    """The line-buffer address of window element (ci, ky, kx) of group grp, and whether it lies
    inside the image (else it is padding). A layer reading whole rows in order (a linear) needs
    no arithmetic: the element is ci."""
    C, H, W, R = g["C"], g["H"], g["W"], g["R"]
    if g["KH"] == g["KW"] == g["W"] == g["SH"] == 1 and g["PH"] == g["PW"] == 0 and g["G"] == 1:
        return f"  wire in_win = 1'b1;\n  wire [{bits(R * W * C)}:0] rd_addr = ci;"
    return f"""  wire signed [31:0] iy = iy0 + ky * {g['DH']};
  wire signed [31:0] ix = ix0 + kx * {g['DW']};
  wire in_win = iy >= 0 && iy < {H} && ix >= 0 && ix < {W};
  wire signed [31:0] back = $signed({{1'b0, in_y}}) - iy;
  wire signed [31:0] slot = $signed({{1'b0, in_slot}}) - back + ($signed({{1'b0, in_slot}}) < back ? {R} : 0);
  wire [31:0] rd_addr = slot * {W * C} + ix * {C} + grp * {g['Cg']} + ci;"""


def _verilog(name: str, g: dict, f: Fold | None, chunk: int, plans: list) -> str:
    C, H, W, R, WC = g["C"], g["H"], g["W"], g["R"], g["W"] * g["C"]
    O, OH, OW, Og, Cg = g["O"], g["OH"], g["OW"], g["Og"], g["Cg"]
    IW, OWD = g["IW"], g["OWD"]
    lanes, width, depth, blocks = (f.lanes, f.width, f.depth, f.blocks) if f else (1, 0, 0, 1)
    need0 = -g["PH"] + (g["KH"] - 1) * g["DH"]
    centered = f"(pad_d ? 64'sd0 : $signed(rd) - {g['ZP']})" if g["kind"] != "max" else "$signed(rd)"
    decl, gather_store, mac, emit_value = [], [], "", ""
    if g["kind"] == "mac":
        decl.append("  integer b;")
        for j in range(width):
            decl.append(f"  reg signed [9:0] bank{j} [0:{depth - 1}];\n  reg signed [9:0] bq{j};\n"
                        f"  initial for (b = 0; b < {depth}; b = b + 1) bank{j}[b] = 10'sd0;  // past K: 0")
            gather_store.append(f"          {j}: bank{j}[wa] <= v[9:0];")
        decl.append(f"  {_style(lanes * width * 8 * g['G'] * blocks * depth, 'rom')}"
                    f"reg [{lanes * width * 8 - 1}:0] wrom [0:{g['G'] * blocks * depth - 1}];\n"
                    f"  initial $readmemh(\"{name}_w.mem\", wrom);\n  reg [{lanes * width * 8 - 1}:0] wq;")
        for q in range(lanes):
            decl.append(f"  reg signed [31:0] acc{q};")
        dots = [" + ".join(f"bq{j} * $signed(wq[{(q * width + j) * 8 + 7}:{(q * width + j) * 8}])"
                           for j in range(width)) for q in range(lanes)]
        reads = " ".join(f"bq{j} <= bank{j}[mi];" for j in range(width))
        accs = "\n".join(f"          acc{q} <= (mi == 1 ? 32'sd0 : acc{q}) + {dots[q]};" for q in range(lanes))
        mac = f"""      MAC: begin
        if (mi < {depth}) begin {reads} wq <= wrom[wbase + mi]; end
        mv <= mi < {depth};
        if (mv) begin
{accs}
        end
        if (mi == {depth}) state <= HAND;
        mi <= mi + 1;
      end"""
        for q in range(lanes):
            decl.append(f"  reg signed [31:0] hold{q};")
        sel = " : ".join(f"eq == {q} ? hold{q}" for q in range(lanes - 1))
        emit_value = f"({sel} : hold{lanes - 1})" if lanes > 1 else "hold0"
        handed = " ".join(f"hold{q} <= acc{q};" for q in range(lanes))
        after_gather = "state <= MAC; mi <= 0; mv <= 0;"
        reduce = "          case (wj)\n" + "\n".join(gather_store) + "\n          endcase"
    else:
        decl.append("  reg signed [63:0] red, hold0;\n  reg first;")
        handed = "hold0 <= red;"
        reduce = ("          if (!pad_d) begin red <= (first || v > red) ? v : red; first <= 1'b0; end"
                  if g["kind"] == "max" else "          red <= red + v;")
        after_gather = "state <= HAND;"
        emit_value = "hold0"
    requants = chunk > 0
    total = f"($signed({emit_value}) + $signed({FIELD['bias']}))"       # int32 by the proven bounds
    if requants:
        emit_steps = f"""          1: begin rq_start <= 1'b1; es <= 2; end
          2: if (rq_done) begin out_data <= clampv(64'sd0 + {g['OZP']} + rq_result); out_valid <= 1'b1; es <= 3; end"""
    elif g["kind"] == "max":
        emit_steps = f"          1: begin out_data <= hold0[{OWD - 1}:0]; out_valid <= 1'b1; es <= 3; end"
    else:
        emit_steps = f"          1: begin out_data <= clampv({total}); out_valid <= 1'b1; es <= 3; end"
    rq_inst = instance(name, total, plans) if requants else "  reg rq_start;"
    first_channel = (f"grp * {Og} + " if g["G"] > 1 else "") + (f"ob * {lanes}" if blocks > 1 else "0")
    last_lane = f"(ob * {lanes} + {lanes} > {Og} ? {Og - 1} - ob * {lanes} : {lanes - 1})" if blocks > 1 \
        else str(min(lanes, Og) - 1)
    return f"""// {name}: {g['kind']} window layer, input {C}x{H}x{W} (C x H x W), output {O}x{OH}x{OW},
// kernel {g['KH']}x{g['KW']} stride {g['SH']},{g['SW']} padding {g['PH']},{g['PW']} dilation {g['DH']},{g['DW']} groups {g['G']};
// line buffer {R} rows; {lanes} lane(s) x {width} multiplier(s), {depth} MAC cycle(s) per block of {lanes} channel(s)
module {name} (input clk, input rst,
    input [{IW - 1}:0] in_data, input in_valid, output in_ready,
    output reg [{OWD - 1}:0] out_data, output reg out_valid, input out_ready);
  localparam LOAD = 2'd0, GATHER = 2'd1, MAC = 2'd2, HAND = 2'd3;
  reg [1:0] state;
  reg [{IW - 1}:0] lb [0:{R * WC - 1}];
  reg [{bits(R * WC)}:0] wr_addr;
  reg [{bits(WC)}:0] row_pos;
  reg [{bits(H)}:0] in_y;
  reg [{bits(R)}:0] in_slot;
  reg signed [31:0] need, iy0, ix0;
  reg [{bits(OH)}:0] oy;
  reg [{bits(OW)}:0] ox;
  reg [{bits(g['G'])}:0] grp;
  reg [{bits(blocks)}:0] ob;
  reg [{bits(lanes)}:0] eq;
  reg [{bits(max(depth, 1) + 1)}:0] mi;
  reg [{bits(g['G'] * blocks * max(depth, 1))}:0] wbase;
  reg mv;
  // gather: issue counters (ci, ky, kx) and bank position (wj, wa); the read lands a cycle later
  reg [{bits(Cg)}:0] ci;
  reg [{bits(g['KH'])}:0] ky;
  reg [{bits(g['KW'])}:0] kx;
  reg [{bits(max(width, 1))}:0] gj, wj;
  reg [{bits(max(depth, 1))}:0] ga, wa;
  reg issuing, wv, pad_d;
  reg [{IW - 1}:0] rd;
  reg [2:0] es;
{table(name, O)}
{chr(10).join(decl)}
{rq_inst}
  function [{OWD - 1}:0] clampv(input signed [63:0] v);
    clampv = v < $signed(tq[{FIELDS['lo'][0]}:{FIELDS['lo'][1]}]) ? tq[{FIELDS['lo'][1] + OWD - 1}:{FIELDS['lo'][1]}]
           : v > $signed(tq[{FIELDS['hi'][0]}:{FIELDS['hi'][1]}]) ? tq[{FIELDS['hi'][1] + OWD - 1}:{FIELDS['hi'][1]}] : v[{OWD - 1}:0];
  endfunction
  wire frame_done = oy == {OH};
  wire rows_ready = !frame_done && ($signed({{1'b0, in_y}}) > need || in_y == {H});
  assign in_ready = state == LOAD && !rows_ready && in_y != {H} && !rst;
{_addressing(g)}
  wire signed [63:0] v = {centered};
  // the emitter: requantises and sends the channels handed to it while the next block computes
  reg ebusy;
  reg [{bits(O)}:0] e_o;
  reg [{bits(lanes)}:0] e_last;
  always @(posedge clk) begin
    rq_start <= 1'b0;
    if (rst) begin
      state <= LOAD; wr_addr <= 0; row_pos <= 0; in_y <= 0; in_slot <= 0; need <= {need0};
      oy <= 0; ox <= 0; iy0 <= -{g['PH']}; ix0 <= -{g['PW']}; out_valid <= 1'b0; wbase <= 0; ebusy <= 1'b0;
    end else begin
    case (state)
      LOAD: begin
        if (in_valid && in_ready) begin
          lb[wr_addr] <= in_data;
          wr_addr <= wr_addr == {R * WC - 1} ? 0 : wr_addr + 1;
          if (row_pos == {WC - 1}) begin
            row_pos <= 0; in_y <= in_y + 1; in_slot <= in_slot == {R - 1} ? 0 : in_slot + 1;
          end else row_pos <= row_pos + 1;
        end else if (frame_done && in_y == {H}) begin
          oy <= 0; ox <= 0; in_y <= 0; in_slot <= 0; wr_addr <= 0; need <= {need0};
          iy0 <= -{g['PH']}; ix0 <= -{g['PW']};
        end else if (rows_ready) begin
          state <= GATHER; grp <= 0; ci <= 0; ky <= 0; kx <= 0; gj <= 0; ga <= 0;
          issuing <= 1'b1; wv <= 1'b0; wbase <= 0; ob <= 0;{' red <= 0; first <= 1;' if g['kind'] != 'mac' else ''}
        end
      end
      GATHER: begin
        wv <= issuing;
        if (issuing) begin
          rd <= lb[in_win ? rd_addr : 0]; pad_d <= !in_win; wj <= gj; wa <= ga;
          if (gj == {max(width, 1) - 1}) begin gj <= 0; ga <= ga + 1; end else gj <= gj + 1;
          if (kx == {g['KW'] - 1}) begin
            kx <= 0;
            if (ky == {g['KH'] - 1}) begin
              ky <= 0;
              if (ci == {Cg - 1}) begin ci <= 0; issuing <= 1'b0; end else ci <= ci + 1;
            end else ky <= ky + 1;
          end else kx <= kx + 1;
        end
        if (wv) begin
{reduce}
        end
        if (!issuing && !wv) begin {after_gather} end
      end
{mac}
      HAND: if (!ebusy) begin
        ebusy <= 1'b1; es <= 0; eq <= 0; e_o <= {first_channel}; e_last <= {last_lane}; {handed}
        if (ob != {blocks - 1}) begin ob <= ob + 1; wbase <= wbase + {depth}; state <= MAC; mi <= 0; mv <= 0; end
        else if (grp != {g['G'] - 1}) begin
          grp <= grp + 1; ob <= 0; wbase <= wbase + {depth}; state <= GATHER; ci <= 0; ky <= 0; kx <= 0;
          gj <= 0; ga <= 0; issuing <= 1'b1; wv <= 1'b0;{' red <= 0; first <= 1;' if g['kind'] != 'mac' else ''}
        end else begin
          state <= LOAD;
          if (ox == {OW - 1}) begin
            ox <= 0; oy <= oy + 1; need <= need + {g['SH']}; iy0 <= iy0 + {g['SH']}; ix0 <= -{g['PW']};
          end else begin ox <= ox + 1; ix0 <= ix0 + {g['SW']}; end
        end
      end
    endcase
    if (ebusy) case (es)
      0: begin tq <= tab[e_o]; es <= 1; end
{emit_steps}
      3: if (out_ready) begin
        out_valid <= 1'b0; es <= 0;
        if (eq == e_last) ebusy <= 1'b0; else begin eq <= eq + 1; e_o <= e_o + 1; end
      end
      default: es <= 0;
    endcase
    end
  end
endmodule
"""
