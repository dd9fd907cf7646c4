"""Compile once, run at any batch: dynamic dims, keyword inputs, calibration and finetuning
at other sizes, torch.compile under dynamic shapes, and clear errors for static dims."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fxopt


class _Net(nn.Module):
    """Conv, BN, a reshape that mixes the batch with literal sizes, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.fc(y.reshape(y.shape[0], 8 * 4 * 4))


def _net():
    torch.manual_seed(0)
    return _Net().eval()


@pytest.mark.parametrize("pipeline", ["default", "prune50", "lowrank30",
                                      "prune-weights{sparsity=0.5}", "mixed-precision{dtype=bf16}"])
def test_every_pass_keeps_the_batch_dynamic(pipeline):
    model = _net()
    cm = fxopt.compile(model, (torch.randn(1, 3, 8, 8),), pipeline=pipeline, verify=True)
    assert cm.input_shapes[0].dynamic == (0,)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 8, 8)
        out = cm(x)
        assert out.shape == (batch, 5)
        if pipeline == "default":
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)


def test_static_dims_and_dtype_raise_input_shape_error():
    cm = fxopt.compile(_net(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(fxopt.InputShapeError, match=r"dim 2 is static \(8\) and got 6") as info:
        cm(torch.randn(2, 3, 6, 8))
    assert "input 'x'" in str(info.value)
    with pytest.raises(fxopt.InputShapeError, match="float64"):
        cm(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    static = fxopt.compile(_net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes="static")
    assert static.input_shapes[0].dynamic == ()
    with pytest.raises(fxopt.InputShapeError, match=r"dim 0 is static \(2\) and got 3"):
        static(torch.randn(3, 3, 8, 8))


def test_a_bad_dynamic_shapes_setting_is_a_trace_error():
    with pytest.raises(fxopt.TraceError, match="not a known setting"):
        fxopt.compile(_net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes="batches")
    with pytest.raises(fxopt.TraceError, match="dynamic dims asked for"):
        fxopt.compile(_net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {2: Dim("h", max=4)}})


def test_calibrate_at_another_batch_than_the_example():
    model = _net()
    cm = fxopt.compile(model, (torch.randn(1, 3, 8, 8),), pipeline="int8", backend="int8",
                       calibration=[torch.randn(16, 3, 8, 8) for _ in range(4)])
    x = torch.randn(3, 3, 8, 8)
    assert (cm(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()
    with pytest.raises(fxopt.InputShapeError, match="calibration batch"):
        fxopt.compile(model, (torch.randn(1, 3, 8, 8),), pipeline="int8",
                      calibration=[torch.randn(4, 3, 7, 8)])


def test_keyword_inputs_with_a_batch_and_sequence_spec():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    spec = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    calibration = [{"input_ids": torch.randint(0, 100, (4, 12)),
                    "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    cm = fxopt.compile(model, (ids,), {"attention_mask": mask}, dynamic_shapes=spec,
                       pipeline="canonicalize,fold-bn,dce,fake-quant{joins=float}", backend="int8",
                       calibration=calibration)
    ids3, mask3 = torch.randint(0, 100, (3, 24)), torch.ones(3, 24, dtype=torch.long)
    mask3[1, 18:] = 0
    out = cm(ids3, attention_mask=mask3)
    ref = model(ids3, attention_mask=mask3).last_hidden_state
    assert out["last_hidden_state"].shape == (3, 24, 64)
    cosine = nn.functional.cosine_similarity(out["last_hidden_state"].flatten(1), ref.flatten(1)).min()
    assert cosine > 0.95
    by_keyword = cm(input_ids=ids3, attention_mask=mask3)["last_hidden_state"]
    torch.testing.assert_close(by_keyword, out["last_hidden_state"])
    with pytest.raises(fxopt.InputShapeError, match="does not fit"):
        cm(ids3, attention_mask=mask3, token_type_ids=mask3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_runs_the_pipeline_at_every_batch():
    torchvision = pytest.importorskip("torchvision")
    torch._dynamo.reset()
    model = torchvision.models.resnet18(num_classes=10).eval()
    reference = fxopt.compile(model, (torch.randn(1, 3, 32, 32),), pipeline="prune50")
    compiled = torch.compile(model, backend="fxopt", options={"pipeline": "prune50"})
    with torch.no_grad():
        for batch in (1, 2, 4, 8, 9, 16):
            x = torch.randn(batch, 3, 32, 32)
            expected = reference(x)
            assert not torch.allclose(expected, model(x), atol=1e-3)   # the pruned model, not the eager one
            torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_finetune_at_one_batch_evaluate_at_any(digits, trained):
    import digits as data

    x_train, y_train, x_test, _ = digits
    cm = fxopt.compile(trained, (x_test[:1],), pipeline="prune50")
    fxopt.finetune(cm, teacher=trained, data=data.batches(x_train, y_train, 0), steps=20, lr=1e-2)
    with torch.no_grad():
        whole = cm(x_test)
        chunks = torch.cat([cm(x_test[i:i + 64]) for i in range(0, len(x_test), 64)])
    torch.testing.assert_close(whole, chunks, atol=1e-5, rtol=0)
    assert (whole.argmax(1) == digits[3]).float().mean() > 0.9
    with pytest.raises(fxopt.InputShapeError, match="finetune"):
        fxopt.finetune(cm, teacher=trained, data=[x_train[:8, :, :7]], steps=1)


def test_finetune_reaches_a_lowered_backend():
    """After finetune every later call sees the trained weights, whatever the backend."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    cm = fxopt.compile(model, (torch.randn(2, 4),), pipeline="fake-quant", backend="int8",
                       calibration=[torch.randn(8, 4)])
    x = torch.randn(5, 4)
    before = cm(x)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    fxopt.finetune(cm, data=data, steps=10, lr=1e-1)
    assert not torch.allclose(cm(x), before)


def test_fpga_int8_says_its_shapes_are_fixed_and_simulate_refuses_others(tmp_path):
    from fxopt.backends.fpga_int8 import simulate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 6, 6)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant{outputs=true}", backend="fpga-int8",
                       calibration=[torch.randn(8, 1, 6, 6)], export_dir=str(tmp_path / "hw"))
    assert "fixed shapes: input_1 1x6x6 per sample" in str(cm.report.fpga)
    assert simulate(str(tmp_path / "hw"), torch.randn(5, 1, 6, 6)).shape == (5, 3)   # the batch streams
    with pytest.raises(fxopt.InputShapeError, match=r"per-sample shape \[1, 7, 6\]"):
        simulate(str(tmp_path / "hw"), torch.randn(5, 1, 7, 6))


class _BiasCache(nn.Module):
    """Caches a tensor computed from its weight on first use, keyed by device (as attention
    modules cache their relative-position bias)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = torch.tanh(self.lin.weight.detach()).sum(0)
        return self.lin(x) + self.cache[key]


def test_a_model_caching_tensors_from_its_weights_traces():
    model = _BiasCache().eval()
    cm = fxopt.compile(model, (torch.randn(2, 8),))
    assert model.cache == {}          # the user's model is left as it was
    x = torch.randn(5, 8)
    torch.testing.assert_close(cm(x), model(x))


def test_compiling_from_several_threads_at_once():
    import sys
    import threading

    stdout, results, errors = sys.stdout, [], []

    def work(seed):
        try:
            torch.manual_seed(seed)
            cm = fxopt.compile(_Net(), (torch.randn(1, 3, 8, 8),), pipeline="prune50")
            results.append(cm(torch.randn(2, 3, 8, 8)).shape)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [(2, 5)] * 4
    assert sys.stdout is stdout


def test_leaf_modules_are_costed_and_passes_say_they_did_not_look_inside():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + x

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block()).eval()
    x = torch.randn(1, 3, 8, 8)
    whole = fxopt.AnalysisManager(fxopt.trace(model, (x,))).get(fxopt.analyses.Cost)
    leaves = fxopt.AnalysisManager(fxopt.trace(model, (x,), leaf_modules=(Block,))).get(fxopt.analyses.Cost)
    assert leaves.macs == whole.macs == (3 * 9 * 8 + 2 * 8 * 9 * 8) * 64
    cm = fxopt.compile(model, (x,), pipeline="canonicalize,prune-channels{ratio=0.5},fake-quant",
                       leaf_modules=(Block,))
    for record in cm.report.records[1:]:
        assert any("did not look inside 2 leaf modules (1, 2)" in n for n in record.notes), record


def test_split_stages_fixes_the_sizes_and_says_so():
    model = _net()
    cm = fxopt.compile(model, (torch.randn(2, 3, 8, 8),), pipeline="split-stages{num-stages=2}", verify=True)
    assert any("sizes fixed to the example's" in n for n in cm.report.records[0].notes)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(cm(x), model(x))
    with pytest.raises(fxopt.InputShapeError, match=r"dim 0 is static \(2\) and got 3"):
        cm(torch.randn(3, 3, 8, 8))


def test_a_batch_one_example_whose_export_bounds_the_batch_runs_at_any_batch():
    """torchvision's ViT exported at batch 1 gets a batch range of 1..2 from torch.export; it is
    exported at two rows then, checked at one, and its MACs are still counted at the example."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=10).eval()
    one = torch.randn(1, 3, 32, 32)
    cm = fxopt.compile(model, (one,))
    with torch.no_grad():
        for batch in (1, 3, 8):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
    assert cm.input_shapes[0].shape == (1, 3, 32, 32)
    at_two = fxopt.AnalysisManager(fxopt.trace(model, (torch.randn(2, 3, 32, 32),))).get(fxopt.analyses.Cost)
    assert 2 * fxopt.AnalysisManager(cm.graph_module).get(fxopt.analyses.Cost).macs == at_two.macs
