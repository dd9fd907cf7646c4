"""The model zoo: every torchvision classification model, and BERT / GPT-2 built
from small transformers configs, must

- trace with `fxopt.trace`, with a shape on every call_function node;
- have a cost: MACs > 0 and no op the cost tables do not know;
- compile with `fold-bn,canonicalize,dce` (Verify on, so every pass is checked
  against the graph before it) at batch 2 to outputs equal to eager within 1e-4,
  at that batch and at batches 1, 3 and 8 (the slow ones: batch 1; text models: also at sequence lengths
  9 and 33, compiled with batch and sequence dynamic);
- leave the user's model as it was (weights and training flag);
- split: `split-stages{num-stages=2}` and `{num-stages=4}` give stages whose
  in-sequence run equals the original outputs within 1e-5;
- prune: `prune-channels{ratio=0.0}` gives the original outputs within 1e-5, and
  `prune-channels{ratio=0.5}` gives a graph with fewer MACs that runs to outputs
  of the original shapes, at every one of those sizes.

Models are built with random weights (weights=None: nothing is downloaded) and
run on small inputs. The heaviest are marked `slow`; they still run in CI.
Run the whole zoo with `pytest tests/test_zoo.py --durations=0`.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxopt
from benchmarks.zoo import build_vision, image_size, vision_models

torchvision = pytest.importorskip("torchvision")

PIPELINE = "fold-bn,canonicalize,dce"
TOL = 1e-4

VISION = vision_models()

# The heaviest (measured with --durations=0: 4-19 s each on 2 cores, the rest 0.5-4 s).
# Marked so a quick run can skip them with -m "not slow"; CI runs them.
SLOW = {
    "regnet_y_128gf", "vit_h_14", "maxvit_t", "efficientnet_v2_l", "densenet161", "swin_v2_b",
    "efficientnet_b7", "swin_v2_s", "densenet201", "vit_l_32", "densenet121", "swin_b",
    "efficientnet_v2_m", "efficientnet_b6", "vit_l_16", "densenet169", "convnext_large",
}


@pytest.fixture(autouse=True)
def _free_the_last_model():
    """Each model's copies (the traced graph, its split and pruned variants) go before the
    next is built: the largest hold gigabytes."""
    yield
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the zoo's time is graph work (export, fake-tensor
    propagation) and small convolutions, and two OpenMP threads on two shared
    cores stall on every op when another job runs (measured: 5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Models whose weights are also compared before/after compile (the others are too big
# to copy cheaply; the check is the same for all of them).
_MUTATION_CHECK_MAX_PARAMS = 30_000_000


def _image_size(name: str) -> int:
    return image_size(name)


def _build_vision(name: str) -> torch.nn.Module:
    """benchmarks.zoo's build: random weights, random BatchNorm statistics and affine
    parameters (a fresh BN is the identity, so folding it would prove nothing; statistics
    measured on activations would make deep random ResNets chaotic, their float32 output
    then differing from float64 by ~1e-4 before any rewrite)."""
    return build_vision(name)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _TraceSpy:
    """Checks the graph `fxopt.trace` gives inside `fxopt.compile`, before the pipeline
    rewrites it, so each model is traced once instead of twice (tracing is the
    zoo's main cost). Falls back to a separate `fxopt.trace` if compile did not
    go through `fxopt.api.compiler.trace`."""

    def __init__(self):
        self.missing_shapes: list[str] | None = None
        self.cost = None
        self.traced = None

    def __call__(self, *args, **kwargs):
        gm = fxopt.trace(*args, **kwargs)
        self.inspect(gm)
        self.traced = copy.deepcopy(gm)  # for the pruning checks, before the pipeline runs
        return gm

    def inspect(self, gm) -> None:
        self.missing_shapes = [n.name for n in gm.graph.nodes
                               if n.op == "call_function" and "fxopt.tensor" not in n.meta]
        self.cost = fxopt.AnalysisManager(gm).get(fxopt.analyses.Cost)


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict, training: bool) -> None:
    assert model.training == training, "compile changed the model's training flag"
    after = model.state_dict()
    assert after.keys() == before.keys(), "compile added or removed weights of the user's model"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"compile changed the user's {key}"


def _assert_same_outputs(expected, actual, tol: float = TOL) -> None:
    """Every output leaf within TOL of eager, relative to the output's scale:
    max |actual - expected| <= TOL * max |expected|. (Folding BN into the weights
    reorders float32 rounding, so an element near zero in an output of scale 1e3
    legitimately moves by more than TOL of itself; and a scale below 1 is not
    rounded up to 1, which would let a small wrong output pass.)"""
    assert type(actual) is type(expected)
    flat_e, flat_a = tree_leaves(expected), tree_leaves(actual)
    assert len(flat_a) == len(flat_e)
    for e, a in zip(flat_e, flat_a):
        scale = (e.abs().max().item() if e.is_floating_point() and e.numel() else 0.0) or 1.0
        torch.testing.assert_close(a, e, atol=tol * scale, rtol=0)


def check_model(model: torch.nn.Module, inputs: tuple, monkeypatch, check_mutation: bool,
                others: tuple = (), dynamic="batch") -> None:
    """Trace + shapes + cost + verified compile == eager, also on the inputs of other
    sizes in `others`; optionally: the model is untouched."""
    assert not model.training
    with torch.no_grad():
        expected = model(*inputs)
        expected_others = [model(*o) for o in others]
    before = _snapshot(model) if check_mutation else None

    spy = _TraceSpy()
    monkeypatch.setattr(fxopt.api.compiler, "trace", spy)
    compiled = fxopt.compile(model, inputs, pipeline=PIPELINE, verify=True, dynamic_shapes=dynamic)
    monkeypatch.undo()
    if spy.cost is None:
        spy.inspect(fxopt.trace(model, inputs))

    assert spy.missing_shapes == [], f"call_function nodes without shapes: {spy.missing_shapes}"
    assert spy.cost.macs > 0
    assert spy.cost.params > 0
    assert spy.cost.unknown == [], f"ops the cost tables do not know: {spy.cost.unknown}"
    assert [r.name for r in compiled.report.records] == PIPELINE.split(",")

    with torch.no_grad():
        actual = compiled(*inputs)
        _assert_same_outputs(expected, actual)
        for other, expected_other in zip(others, expected_others):
            _assert_same_outputs(expected_other, compiled(*other))
    if check_mutation:
        _assert_unchanged(model, before, training=False)
    traced = spy.traced or fxopt.trace(model, inputs, dynamic_shapes=dynamic)
    check_stages(traced, inputs, expected)
    check_pruning(traced, [inputs, *others], [expected, *expected_others], spy.cost.macs)


def check_stages(traced, inputs: tuple, expected) -> None:
    """split-stages at 2 and 4 stages (which fix the sizes to the example's: pipeline stages
    run at a fixed microbatch): the stages, called in sequence, give the original
    outputs within 1e-5 (of their scale). Each split works on a GraphModule sharing the
    traced one's weights (splitting moves them into the stages of the new module only)."""
    for k in (2, 4):
        gm = torch.fx.GraphModule(traced, copy.deepcopy(traced.graph))
        gm.meta.update(traced.meta)
        report = fxopt.PassManager(f"split-stages{{num-stages={k}}}").run(gm, example_inputs=inputs)
        assert len(report.stages.stages) == k
        with torch.no_grad():
            _assert_same_outputs(expected, gm(*inputs), tol=1e-5)


def check_pruning(traced, calls: list, expected_calls: list, macs_before: int) -> None:
    """ratio 0: the original outputs within 1e-5 (of their scale); ratio 0.5: fewer
    MACs, and the pruned graph runs to outputs of the original shapes at every size."""
    inputs, expected = calls[0], expected_calls[0]
    unpruned = copy.deepcopy(traced)
    fxopt.PassManager("prune-channels{ratio=0.0}").run(unpruned, example_inputs=inputs)
    with torch.no_grad():
        _assert_same_outputs(expected, unpruned(*inputs), tol=1e-5)
    report = fxopt.PassManager("prune-channels{ratio=0.5}").run(traced, example_inputs=inputs)
    macs_after = fxopt.AnalysisManager(traced).get(fxopt.analyses.Cost).macs
    assert macs_after < macs_before, report.records[0].notes
    for call, expected_call in zip(calls, expected_calls):
        with torch.no_grad():
            pruned = traced(*call)
        flat_e, flat_p = tree_leaves(expected_call), tree_leaves(pruned)
        assert len(flat_e) == len(flat_p)
        for e, p in zip(flat_e, flat_p):
            assert p.shape == e.shape and (not p.is_floating_point() or torch.isfinite(p).all())


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in VISION])
def test_torchvision(name, monkeypatch):
    model = _build_vision(name)
    size = _image_size(name)
    x = torch.randn(2, 3, size, size)
    batches = (1,) if name in SLOW else (1, 3, 8)   # the heaviest: one other batch, to keep CI short
    others = tuple((torch.randn(b, 3, size, size),) for b in batches)
    check_model(model, (x,), monkeypatch, others=others,
                check_mutation=_params(model) <= _MUTATION_CHECK_MAX_PARAMS)


def test_zoo_lists_every_classification_model():
    assert len(VISION) >= 80
    assert SLOW <= set(VISION), f"unknown names in SLOW: {SLOW - set(VISION)}"


# ----- transformers -----------------------------------------------------------------

VOCAB, BATCH, LENGTH = 1000, 2, 16


def _text_inputs(name: str, batch: int = BATCH, length: int = LENGTH) -> tuple:
    if name == "vit":
        return (torch.randn(batch, 3, 32, 32),)
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 5:] = 0  # the last sequence is padded
    if name in _WITH_MASK:
        return ids, mask                    # forward(input_ids, attention_mask)
    if name.endswith("padded"):
        return ids, None, mask              # forward(input_ids, past_key_values, attention_mask)
    return (ids,)


def _text_spec(inputs: tuple) -> tuple:
    """Batch and sequence length dynamic for every 2-D input (ids, mask); batch only for images."""
    Dim = torch.export.Dim
    return tuple(None if x is None else {0: Dim.AUTO, 1: Dim.AUTO} if x.dim() == 2 else {0: Dim.AUTO}
                 for x in inputs)


def _tiny(config_class: str, **kwargs):
    """A tiny config of a transformers architecture (2 layers, hidden 64, 4 heads)."""
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, config_class)(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128,
                                               max_position_embeddings=64, **kwargs)


def _bert_config(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=64, **kwargs)


def _gpt2_config(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=64, bos_token_id=0, eos_token_id=0,
                                   use_cache=False, **kwargs)


_HF_MODELS = {
    "bert": lambda t: t.BertModel(_bert_config()),
    "bert-eager-attention": lambda t: t.BertModel(_bert_config(attn_implementation="eager")),
    "bert-classifier": lambda t: t.BertForSequenceClassification(_bert_config(num_labels=3)),
    "gpt2": lambda t: t.GPT2Model(_gpt2_config()),
    "gpt2-lm-head": lambda t: t.GPT2LMHeadModel(_gpt2_config()),
    "gpt2-eager-attention": lambda t: t.GPT2LMHeadModel(_gpt2_config(attn_implementation="eager")),
    "gpt2-lm-head-padded": lambda t: t.GPT2LMHeadModel(_gpt2_config()),
    "llama": lambda t: t.LlamaModel(_tiny("LlamaConfig", num_key_value_heads=2, use_cache=False)),
    "qwen2": lambda t: t.Qwen2Model(_tiny("Qwen2Config", num_key_value_heads=2, use_cache=False)),
    "mistral": lambda t: t.MistralModel(_tiny("MistralConfig", num_key_value_heads=2, use_cache=False)),
    "phi3": lambda t: t.Phi3Model(_tiny("Phi3Config", num_key_value_heads=4, use_cache=False,
                                        pad_token_id=0)),
    "gemma": lambda t: t.GemmaModel(_tiny("GemmaConfig", num_key_value_heads=2, head_dim=16,
                                          use_cache=False)),
    "opt": lambda t: t.OPTModel(t.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                                            max_position_embeddings=64, use_cache=False)),
    "gpt-neox": lambda t: t.GPTNeoXModel(_tiny("GPTNeoXConfig", use_cache=False)),
    "roberta": lambda t: t.RobertaModel(_tiny("RobertaConfig")),
    "distilbert": lambda t: t.DistilBertModel(t.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2,
                                                                 n_heads=4, hidden_dim=128,
                                                                 max_position_embeddings=64)),
    "t5-encoder": lambda t: t.T5EncoderModel(t.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                                                        num_layers=2, num_heads=4)),
    "vit": lambda t: t.ViTModel(t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, image_size=32, patch_size=8)),
}
_WITH_MASK = {"bert", "bert-eager-attention", "bert-classifier", "llama", "qwen2", "mistral", "phi3",
              "gemma", "opt", "gpt-neox", "roberta", "distilbert", "t5-encoder"}
# (batch, sequence length) of the calls at other sizes
_TEXT_SIZES = ((1, 9), (3, 33), (8, 16))


@pytest.mark.parametrize("name", sorted(_HF_MODELS))
def test_transformers(name, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _HF_MODELS[name](transformers).eval()
    inputs = _text_inputs(name)
    others = tuple(_text_inputs(name, b, n) for b, n in _TEXT_SIZES)
    check_model(model, inputs, monkeypatch, check_mutation=True, others=others,
                dynamic=_text_spec(inputs))


# ----- MACs against the published figures -------------------------------------------

# torchvision's and the papers' figures (maxvit_t: its attention is written with einsum)
PUBLISHED_GMACS = {"resnet18": 1.82, "resnet50": 4.11, "mobilenet_v2": 0.30, "vit_b_16": 17.6,
                   "maxvit_t": 5.56}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_published_macs(name):
    model = torchvision.models.get_model(name, weights=None).eval()
    gm = fxopt.trace(model, (torch.randn(1, 3, 224, 224),))
    cost = fxopt.AnalysisManager(gm).get(fxopt.analyses.Cost)
    assert cost.unknown == []
    assert cost.macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.02)
    assert cost.params == _params(model)


class _Einsum(torch.nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, *operands):
        return torch.einsum(self.equation, *operands)


@pytest.mark.parametrize("equation, shapes, macs", [
    ("B G H I D, B G H J D -> B G H I J", [(2, 3, 4, 5, 8), (2, 3, 4, 6, 8)], 2 * 3 * 4 * 5 * 6 * 8),
    ("...id,...jd->...ij", [(2, 4, 5, 8), (4, 6, 8)], 2 * 4 * 5 * 6 * 8),      # broadcast batch
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 6)], 2 * 3 * 4 * 5 * 6),             # 2 products per point
    ("ij->ji", [(3, 4)], 0),                                                    # a transpose
])
def test_einsum_macs(equation, shapes, macs):
    gm = fxopt.trace(_Einsum(equation), tuple(torch.randn(s) for s in shapes))
    cost = fxopt.AnalysisManager(gm).get(fxopt.analyses.Cost)
    assert cost.unknown == []
    assert cost.macs == macs


# ----- the user's model is never touched ----------------------------------------------

def test_compile_leaves_a_training_model_alone():
    """A model left in training mode: compile traces a copy, so neither the
    flag nor the BN running statistics of the user's model change."""
    model = torchvision.models.get_model("resnet18", weights=None)
    assert model.training
    before = _snapshot(model)
    fxopt.compile(model, (torch.randn(2, 3, 64, 64),), pipeline=PIPELINE)
    _assert_unchanged(model, before, training=True)
