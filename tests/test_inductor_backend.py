"""inductor backend: TorchInductor's code (its C++ path on a CPU) equals eager, and
fake-quantized linears become real int8 matmuls (torch._int_mm) that agree with the
fake-quant graph.

Inductor compiles C++ on the first run of each graph (tens of seconds on 2 cores with
an empty cache), so this file compiles few models; the whole torchvision zoo runs in
`benchmarks/backends_zoo.py`. The int8 arithmetic is also checked without inductor, on
the rewritten graph run op by op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import fxopt
from fxopt.backends import get_backend
from fxopt.backends.inductor import InductorReport, Int8Matmuls, _shallow_copy

aten = torch.ops.aten
missing = fxopt.list_backends()["inductor"].available()
pytestmark = pytest.mark.skipif(bool(missing), reason=f"inductor: {missing}")

FOLD = "fold-bn,canonicalize,dce"
PRUNE = "prune-channels{ratio=0.5}"
QUANT = "fake-quant{joins=float}"
TOL = 1e-4


def _assert_close(expected, actual, tol: float = TOL) -> None:
    """Every output within `tol` of the expected one, relative to its scale (max |e|)."""
    for e, a in zip(tree_leaves(expected), tree_leaves(actual), strict=True):
        scale = (e.abs().max().item() if e.is_floating_point() and e.numel() else 0.0) or 1.0
        torch.testing.assert_close(a, e, atol=tol * scale, rtol=0)


def _run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():   # random BN statistics, so a wrong fold would show
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)
    return model, (torch.randn(1, 3, 64, 64),)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return transformers.BertModel(config).eval(), (ids, mask)


class _Encoder(nn.Module):
    """BERT's mean-pooled last hidden state: one tensor out, for the int8 agreement."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state.mean(1)


# ----- options and availability -----------------------------------------------------------


def test_listed_and_available_here():
    assert "inductor" in fxopt.list_backends()
    assert get_backend("inductor").available() is None


@pytest.mark.parametrize("options, words", [({"mode": "fast"}, ["option 'mode' takes one of", "max-autotune", "'fast'"]),
                                            ({"fullgraph": True}, ["no option 'fullgraph'", "int8_matmul"]),
                                            ({"dynamic": "yes"}, ["option 'dynamic' takes true or false"])])
def test_bad_options_say_what_is_allowed(options, words):
    model = nn.Linear(4, 4).eval()
    with pytest.raises(fxopt.UnsupportedError) as info:
        fxopt.compile(model, (torch.randn(2, 4),), pipeline="dce", backend="inductor", **options)
    assert all(w in str(info.value) for w in words), str(info.value)


# ----- float models: inductor == eager ------------------------------------------------------


def _check_fold_and_prune(model, inputs):
    expected = _run(model, *inputs)
    cm = fxopt.compile(model, inputs, pipeline=FOLD, backend="inductor")
    _assert_close(expected, _run(cm, *inputs))
    assert isinstance(cm.report.inductor, InductorReport) and cm.report.inductor.compile_seconds > 0
    pruned = fxopt.compile(model, inputs, pipeline=PRUNE)              # eager
    _assert_close(_run(pruned, *inputs), _run(fxopt.lower(pruned, backend="inductor"), *inputs))


@pytest.mark.slow   # ~40 s on 2 cores with an empty inductor cache
def test_resnet18_equals_eager_after_fold_and_prune():
    _check_fold_and_prune(*_resnet18())


def test_bert_equals_eager_after_fold_and_prune():
    _check_fold_and_prune(*_bert())


def test_user_graph_is_left_alone_and_modes_compile():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    cm = fxopt.compile(model, (x,), pipeline=FOLD)
    code = cm.graph_module.code
    for mode, dynamic in (("default", True), ("max-autotune-no-cudagraphs", False)):
        lowered = fxopt.lower(cm, backend="inductor", mode=mode, dynamic=dynamic)
        _assert_close(_run(model, x), _run(lowered, x))
        assert lowered.report.inductor.mode == mode
    assert cm.graph_module.code == code


# ----- int8 matmuls -------------------------------------------------------------------------


def _quantized(model, batches):
    return fxopt.compile(model, batches[0], pipeline=QUANT, calibration=batches[:4])


def _cosine(reference, candidate, batches) -> float:
    with torch.no_grad():
        ref = torch.cat([reference(*b).reshape(len(b[0]), -1) for b in batches])
        got = torch.cat([candidate(*b).reshape(len(b[0]), -1) for b in batches])
    return F.cosine_similarity(ref, got).mean().item()


def _int_mm_nodes(lowered) -> list:
    return [n for n in lowered._lowered.graph_module.graph.nodes if n.target is aten._int_mm.default]


def test_cpu_int_mm_is_exact():
    """torch._int_mm runs on CPU in this build, so the int8 path is tested here for real."""
    a = torch.randint(-128, 128, (5, 24), dtype=torch.int8)
    b = torch.randint(-128, 128, (24, 7), dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b), a.int() @ b.int())


def test_int8_mlp_agrees_with_fake_quant():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    batches = [(torch.randn(16, 32),) for _ in range(8)]
    cm = _quantized(model, batches)
    lowered = fxopt.lower(cm, backend="inductor", int8_matmul=True)
    assert len(_int_mm_nodes(lowered)) == 3
    report = lowered.report.inductor
    assert len(report.int8_matmuls) == 3 and report.fake_quant == []
    assert "3 linears on int8 matmuls" in str(report) and report.to_dict()["int8_matmuls"]
    assert _cosine(cm, lowered, batches[4:]) >= 0.999
    assert not any(n.target is aten._int_mm.default for n in cm.graph_module.graph.nodes)  # untouched


def test_int8_bert_encoder_agrees_with_fake_quant():
    bert, _ = _bert()
    batches = [(torch.randint(0, 1000, (4, 16)),) for _ in range(8)]
    cm = _quantized(_Encoder(bert).eval(), batches)
    lowered = fxopt.lower(cm, backend="inductor", int8_matmul=True)
    assert len(_int_mm_nodes(lowered)) == 13      # q, k, v, out, ffn x2 in both layers; the pooler
    rounds = [n for n in lowered._lowered.graph_module.graph.nodes if n.target is aten.round.default]
    assert len(rounds) < 13                        # q, k and v share their input's int8 codes
    assert _cosine(cm, lowered, batches[4:]) >= 0.999


def test_int8_off_by_default_on_cpu():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    batches = [(torch.randn(4, 8),) for _ in range(4)]
    lowered = fxopt.lower(_quantized(model, batches), backend="inductor")
    assert _int_mm_nodes(lowered) == [] and lowered.report.inductor.int8_matmuls == []


def _rewrite(cm, device=torch.device("cpu")):
    """The int8 rewrite alone, on a copy of the graph (run op by op, without inductor)."""
    graph, report = _shallow_copy(cm.graph_module), InductorReport()
    Int8Matmuls(graph, device, report).run()
    return graph, report


@pytest.mark.parametrize("pipeline", [QUANT, "fake-quant{joins=float act-symmetric=true}",
                                      "fake-quant{joins=float weight-granularity=per-tensor}"])
def test_int8_arithmetic_matches_fake_quant_closely(pipeline):
    """Integer accumulation with the zero point folded into column sums is the fake-quant
    result up to float rounding, on 3-D inputs, symmetric and affine grids alike."""
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12)).eval()
    batches = [(torch.randn(3, 5, 24) + 0.5,) for _ in range(6)]
    cm = fxopt.compile(model, batches[0], pipeline=pipeline, calibration=batches[:4])
    graph, report = _rewrite(cm)
    assert len(report.int8_matmuls) == 2
    for (x,) in batches[4:]:
        _assert_close(_run(cm, x), _run(graph, x), tol=1e-5)


def test_int8_leaves_what_does_not_fit_and_says_why():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    batches = [(torch.randn(4, 16),) for _ in range(4)]
    four_bit = fxopt.compile(model, batches[0], pipeline="fake-quant{joins=float weight-bits=4}",
                             calibration=batches)
    _, report = _rewrite(four_bit)
    assert len(report.fake_quant) == 2 and "8-bit" in report.fake_quant[0][1]
    _, report = _rewrite(_quantized(model, batches), torch.device("cuda"))   # 4 rows: too few for CUDA
    assert report.int8_matmuls == [] and "more than 16 rows" in report.fake_quant[0][1]
    observing = fxopt.compile(model, batches[0], pipeline=QUANT)           # not calibrated
    count = [int(m.observer.count) for m in observing.graph_module.modules() if hasattr(m, "observer")]
    lowered = fxopt.lower(observing, backend="inductor", int8_matmul=True)
    assert "not frozen" in lowered.report.inductor.fake_quant[0][1]
    after = [int(m.observer.count) for m in observing.graph_module.modules() if hasattr(m, "observer")]
    assert after == count   # compiling ran the example inputs, but the observers did not record them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_on_cuda_uses_int_mm_by_default():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval().cuda()
    batches = [(torch.randn(32, 64, device="cuda"),) for _ in range(8)]
    cm = _quantized(model, batches)
    lowered = fxopt.lower(cm, backend="inductor")
    assert len(_int_mm_nodes(lowered)) == 2
    assert _cosine(cm, lowered, batches[4:]) >= 0.999


def test_aot_package_runs_without_fxopt_at_any_batch(tmp_path):
    """package_path= writes an AOTInductor package: loaded by torch alone, it runs the pruned
    graph at batch sizes the example did not have; a foreign file there is never overwritten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = tmp_path / "model.pt2"
    cm = fxopt.compile(model, (torch.randn(1, 16),), pipeline="prune50", backend="inductor",
                       package_path=str(path))
    assert cm.report.inductor.package_path == str(path)
    runner = torch._inductor.aoti_load_package(str(path))
    for batch in (1, 5):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(runner(x), cm(x), atol=1e-5, rtol=1e-5)
    foreign = tmp_path / "notes.pt2"
    foreign.write_text("mine")
    with pytest.raises(fxopt.UnsupportedError, match="not an AOTInductor package"):
        fxopt.compile(model, (torch.randn(1, 16),), backend="inductor", package_path=str(foreign))
    assert foreign.read_text() == "mine"
