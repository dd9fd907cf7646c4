"""mixed-precision: bf16 / fp16 graphs agree with fp32, sensitive ops stay fp32 and are
reported, casts sit at boundaries only, auto beats a blanket rule, options fail clearly.

Models: torchvision's ResNet-50 (weights=None, realistic statistics, 2x3x64x64), the
BERT-like encoder of the backend tests (transformers' BertModel, 2 layers, hidden 64),
and small nets built here. Each big model is traced once per module.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes.mixed_precision import FP32_RULES

aten = torch.ops.aten
CAST = aten._to_copy.default


def _cosine(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run_pipeline(gm, text, calibration=None):
    """Run `text` on a copy of a traced graph (so one trace serves several tests)."""
    gm = copy.deepcopy(gm)
    report = fxopt.PassManager(text).run(gm, fxopt.AnalysisManager(gm, calibration))
    gm.recompile()
    return gm, report


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.target == target]


def _assert_casts_only_at_boundaries(gm):
    """No cast of a cast, each value cast at most once per dtype, and the graph's inputs and
    outputs stay fp32."""
    seen = set()
    for cast in _nodes(gm, CAST):
        source = cast.args[0]
        assert source.target != CAST, f"{cast.name} casts the cast {source.name}"
        key = (source, cast.kwargs["dtype"])
        assert key not in seen, f"{source.name} is cast twice to {key[1]}"
        seen.add(key)
    for p in gm.graph.find_nodes(op="placeholder"):
        assert p.meta["fxopt.tensor"] is None or p.meta["fxopt.tensor"].dtype != torch.bfloat16
    (output,) = gm.graph.find_nodes(op="output")
    for value in output.all_input_nodes:
        assert value.meta["fxopt.tensor"].dtype == torch.float32, value.name


# ---- real models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50():
    torchvision = pytest.importorskip("torchvision")
    from benchmarks.models import with_realistic_statistics

    torch.manual_seed(0)
    model = with_realistic_statistics(torchvision.models.resnet50(weights=None),
                                      [torch.randn(4, 3, 64, 64) for _ in range(2)])
    x = torch.randn(2, 3, 64, 64)
    gm = fxopt.trace(model, (x,))
    fxopt.PassManager("fold-bn,canonicalize,dce").run(gm, fxopt.AnalysisManager(gm))
    gm.recompile()
    with torch.no_grad():
        return gm, x, model(x)


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    return model, (ids, mask), (ref.last_hidden_state, ref.pooler_output)


def test_bf16_resnet50_agrees_with_fp32(resnet50):
    gm, x, ref = resnet50
    out_gm, report = _run_pipeline(gm, "mixed-precision{dtype=bf16}")
    with torch.no_grad():
        out = out_gm(x)
    assert out.dtype == torch.float32
    assert _cosine(out, ref) >= 0.999
    precision = report.precision
    assert precision.low_by_op()["conv2d"] == 53 and precision.low_by_op()["linear"] == 1
    assert [p.op for p in precision.kept] == ["adaptive_avg_pool2d"]      # the global average: a reduction
    assert "reduction" in precision.kept[0].reason
    convs = _nodes(out_gm, aten.conv2d.default)
    assert all(c.args[1].target.endswith("weight_bf16") for c in convs)   # weights stored converted once
    assert all(c.meta["fxopt.tensor"].dtype == torch.bfloat16 for c in convs)
    assert not any(p.dtype == torch.float32 for name, p in out_gm.named_parameters() if "conv" in name)
    assert precision.constant_bytes[1] * 2 == precision.constant_bytes[0]
    _assert_casts_only_at_boundaries(out_gm)
    assert precision.casts <= 4     # entry, around the pool, and exit


def test_bert_like_encoder_bf16_and_fp16(bert):
    model, inputs, refs = bert
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype, cosine in (("bf16", 0.999), ("fp16", 0.9999)):
        cm = fxopt.compile(model, inputs, pipeline=f"canonicalize,dce,mixed-precision{{dtype={dtype}}}")
        with torch.no_grad():
            outs = list(cm(*inputs).values())
        for out, ref in zip(outs, refs):
            assert out.dtype == torch.float32 and _cosine(out, ref) >= cosine, (dtype, _cosine(out, ref))
        precision = cm.report.precision
        assert {p.op for p in precision.kept} == {"layer_norm"} and len(precision.kept) == 5
        assert all(p.reason.startswith("normalisation") for p in precision.kept)
        assert precision.low_by_op()["linear"] == 13
        assert precision.low_by_op()["scaled_dot_product_attention"] == 2
        _assert_casts_only_at_boundaries(cm.graph_module)
    # the user's model is untouched: same tensors, same values, still fp32
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


# ---- the rule table and the report -------------------------------------------------------

class Attention(nn.Module):
    """Explicit softmax attention, a LayerNorm and a mean: every kind the table keeps."""

    def __init__(self, d=32):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1)
        h = self.norm(x + self.out(attn @ v))
        return self.head(F.gelu(h)).mean(1)


def _attention():
    torch.manual_seed(0)
    return Attention().eval(), torch.randn(2, 8, 32)


def test_report_lists_softmax_layer_norm_and_reductions_with_reasons():
    model, x = _attention()
    cm = fxopt.compile(model, (x,), pipeline="mixed-precision", verify=True)
    precision = cm.report.precision
    reasons = {p.op: p.reason for p in precision.kept}
    assert set(reasons) == {"softmax", "layer_norm", "mean"}
    assert reasons["softmax"].startswith("softmax") and reasons["layer_norm"].startswith("normalisation")
    assert reasons["mean"].startswith("reduction")
    assert precision.counts() == {"low": len(precision.low), "fp32": 3, "follow": precision.follows}
    assert {"linear", "matmul", "gelu", "add", "div"} <= set(precision.low_by_op())
    text = str(precision)
    assert "kept fp32" in text and "softmax" in text and "layer_norm" in text
    assert precision.to_dict()["counts"]["fp32"] == 3
    _assert_casts_only_at_boundaries(cm.graph_module)
    softmax = next(n for n in cm.graph_module.graph.nodes if "softmax" in str(n.target))
    assert softmax.meta["fxopt.tensor"].dtype == torch.float32            # computed in fp32 ...
    assert all(u.target == CAST for u in softmax.users)                   # ... and cast down for the matmul
    with torch.no_grad():
        assert _cosine(cm(x), model(x)) >= 0.999


def test_keep_option_takes_op_names_and_module_paths():
    model, x = _attention()
    cm = fxopt.compile(model, (x,), pipeline="mixed-precision{keep=[aten.gelu,head]}")
    kept = {p.node: p for p in cm.report.precision.kept}
    assert "keep pattern 'aten.gelu'" in kept["gelu"].reason
    assert "keep pattern 'head'" in next(p.reason for p in kept.values() if p.module == "head")
    with pytest.warns(UserWarning, match="keep pattern 'nothing_here' matches no op"):
        cm = fxopt.compile(model, (x,), pipeline="mixed-precision{keep=[nothing_here]}")
    assert any("nothing_here" in n for n in cm.report.precision.notes)


def test_the_rule_table_is_extensible_from_python(monkeypatch):
    model, x = _attention()
    monkeypatch.setitem(FP32_RULES, "gelu", "my rule: gelu stays fp32")
    monkeypatch.delitem(FP32_RULES, "layer_norm")
    precision = fxopt.compile(model, (x,), pipeline="mixed-precision").report.precision
    assert precision.reason_for("gelu") == "my rule: gelu stays fp32"
    assert "layer_norm" in precision.low_by_op()


def test_a_second_run_and_a_16_bit_graph_are_left_alone():
    model, x = _attention()
    cm = fxopt.compile(model, (x,), pipeline="mixed-precision,mixed-precision{dtype=fp16}")
    second = cm.report.records[1]
    assert not second.changed and "already computes in 16-bit" in second.notes[0]


# ---- auto --------------------------------------------------------------------------------

OFFSET = 1000.0


class SensorNet(nn.Module):
    """Raw sensor readings: a unit signal on an offset of 1000. `inp` removes the offset
    through its bias (an input normalisation folded into the first layer), so in 16 bits
    its input is rounded on the offset's scale (bf16's step at 1000 is 4) and the signal is
    lost: the one sensitive layer. The rest is an ordinary residual MLP with 7 linears."""

    def __init__(self, d=32, width=64, blocks=3):
        super().__init__()
        self.inp = nn.Linear(d, width)
        with torch.no_grad():
            self.inp.bias -= OFFSET * self.inp.weight.sum(1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def _readings(n=16, d=32):
    return OFFSET + torch.randn(n, d)


def test_auto_keeps_fewer_layers_than_a_blanket_rule_at_equal_error():
    """Budget: output error <= 1% relative. The default table misses it. auto meets it by
    keeping the layers whose own bf16 error exceeds layer-tolerance; the blanket rule keeps
    every op of each kind auto found a layer of above tolerance (here: keep=[linear])."""
    torch.manual_seed(0)
    model, x = SensorNet().eval(), _readings()
    calibration = [_readings() for _ in range(4)]
    budget = 0.01
    with torch.no_grad():
        ref = model(x)

    def error_and_report(text):
        cm = fxopt.compile(model, (x,), pipeline=text, calibration=calibration)
        with torch.no_grad():
            return _rel(cm(x), ref), cm.report.precision

    default_error, _ = error_and_report("mixed-precision")
    auto_error, auto = error_and_report("mixed-precision{auto=true}")
    auto_layers = [p for p in auto.kept if p.reason.startswith("auto")]
    assert [p.module for p in auto_layers] == ["inp"] and auto_layers[0].error > 0.1
    assert all(p.error is not None and p.error <= 0.01 for p in auto.low)
    kinds = sorted({p.op for p in auto_layers})
    blanket_error, blanket = error_and_report(f"mixed-precision{{keep=[{','.join(kinds)}]}}")
    assert default_error > budget
    assert auto_error <= budget and blanket_error <= budget
    assert len(auto.kept) < len(blanket.kept)                 # 2 (inp, norm) vs 9 (8 linears, norm)
    assert len(auto.kept) == 2 and len(blanket.kept) == 9


def test_auto_without_calibration_is_a_clear_error():
    model, x = _attention()
    with pytest.raises(fxopt.PassOptionError, match="calibration") as info:
        fxopt.compile(model, (x,), pipeline="mixed-precision{auto=true}")
    assert "calibration=[batch" in str(info.value)


def test_auto_tolerance_zero_keeps_every_layer_and_reports_its_error():
    model, x = _attention()
    cm = fxopt.compile(model, (x,), pipeline="mixed-precision{auto=true layer-tolerance=0}",
                       calibration=[torch.randn(2, 8, 32)])
    precision = cm.report.precision
    assert not precision.low and not cm.report.records[-1].changed
    measured = [p for p in precision.kept if p.reason.startswith("auto")]
    assert measured and all(0 < p.error < 0.02 for p in measured)


# ---- options -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("mixed-precision{dtype=fp8}", "bf16|fp16"),
    ("mixed-precision{dtype=bfloat16}", "bf16|fp16"),
    ("mixed-precision{layer-tolerance=-0.1}", r"option 'layer-tolerance' takes a finite number in \[0, inf\)"),
    ("mixed-precision{auto=yes}", "auto"),
    ("mixed-precision{tolerance=0.01}", "no option 'tolerance'"),
])
def test_bad_options_fail_at_parse_time(text, match):
    with pytest.raises(fxopt.PassOptionError, match=match):
        fxopt.parse_pipeline(text)


def test_bad_options_fail_when_built_from_python():
    cls = fxopt.list_passes()["mixed-precision"]
    with pytest.raises(fxopt.PassOptionError, match="option 'dtype' takes one of bf16, fp16, got 'float16'"):
        cls(dtype="float16")
    with pytest.raises(fxopt.PassOptionError, match="option 'keep' takes a string, got 1"):
        cls(keep=(1,))
    with pytest.raises(fxopt.PassOptionError, match="finite"):
        cls(layer_tolerance=float("inf"))
    assert cls(keep="fc").keep == ("fc",)


def test_options_round_trip_as_text():
    text = "mixed-precision{dtype=fp16 keep=[linear,encoder.*] auto=true layer-tolerance=0.02}"
    passes = fxopt.parse_pipeline(text)
    assert fxopt.format_pipeline(passes) == text
    assert fxopt.format_pipeline(fxopt.parse_pipeline("mixed-precision")) == "mixed-precision"
    assert passes[0].tolerance is None and passes[0].limit == 0.02


def test_warnings_free_on_a_plain_compile():
    model, x = _attention()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fxopt.compile(model, (x,), pipeline="mixed-precision{dtype=fp16}")
