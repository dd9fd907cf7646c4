"""The MiniLM row of suite `fpga`: the sentence encoder (real weights) exported integer-only.

all-MiniLM-L6-v2 (benchmarks.minilm, without BERT's unused pooler) through
`fake-quant{integer=true}` and backend fpga-int8: I-BERT's integer softmax, GELU and LayerNorm,
a 16-bit residual stream, int8 embedding tables. Calibration: the first 60 sentences; every
figure below is on the other 200 (never seen by calibration), 32 tokens each.

- export: fxopt.compile with calibration and the artefact writing; g++ -O2 of model.cpp;
- the simulator's throughput (sentences / s) and the files' sizes;
- verify on 20 held-out sentences: simulator = C++ bit for bit, the worst layer's share within
  1 LSB of the integer-aware fake-quant model on its own inputs;
- sentence embeddings (mask-weighted mean, L2-normalised) against fp32: mean and worst cosine,
  and the Spearman correlation of the cosine similarities of all pairs of the 200 sentences;
  the same for the fake-quant model the export implements.
"""
from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import torch

import fxopt
from fxopt.backends.fpga_int8 import verify
from fxopt.backends.fpga_int8.cpp import compile_cpp

from . import minilm
from .harness import markdown_table, measure
from .tasks import spearman

PIPELINE = "fake-quant{integer=true}"
BATCH, CALIBRATION_BATCHES = 20, 3
HEADERS = ["model", "sentences", "export s", "g++ s", "sim sentences/s", "weights B", "model.cpp+weights.h B",
           "C++ = sim", "worst layer ≤1 LSB", "cosine mean (min)", "Spearman", "fake-quant cosine (Spearman)"]


def _embeddings(run, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([minilm.embed(run(ids, mask), mask) for ids, mask in batches])


def _agreement(ours: torch.Tensor, fp32: torch.Tensor) -> dict:
    cosine = (ours * fp32).sum(-1)
    pairs = list(itertools.combinations(range(len(fp32)), 2))
    rank = spearman([float(fp32[i] @ fp32[j]) for i, j in pairs], [float(ours[i] @ ours[j]) for i, j in pairs])
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "spearman": rank}


def run(log=print) -> list[dict]:
    """One row (a list, empty when the weights package is missing)."""
    try:
        model, tokenizer = minilm.load(pooler=False)
    except ImportError as exc:
        log(f"MiniLM skipped: {exc}")
        return []
    batches = minilm.batches(tokenizer, minilm.sentences(), BATCH)
    calibration, held_out = batches[:CALIBRATION_BATCHES], batches[CALIBRATION_BATCHES:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        start = time.perf_counter()
        cm = fxopt.compile(model, batches[0], pipeline=PIPELINE, backend="fpga-int8", calibration=calibration,
                           export_dir=out, verify=False, instruments=())
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        compile_cpp(out, out_binary=Path(tmp) / "model")
        gxx_s = time.perf_counter() - start
        report = verify(out, held_out[0], cm)
        sim = measure(lambda _: cm(*held_out[0]), repeats=3, warmup=1)
        sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        weights_b = sum(p.stat().st_size for p in (out / "weights").iterdir())
    reference = cm._lowered.reference
    fp32 = _embeddings(lambda i, a: minilm.last_hidden(model(i, a)), held_out)
    row = {"model": "all-MiniLM-L6-v2", "sentences": len(fp32), "export_s": export_s, "gxx_s": gxx_s,
           "sim_sentences_per_s": BATCH / sim.median, "weights_b": weights_b,
           "code_b": sizes["model.cpp"] + sizes["weights.h"], "cpp_bit_exact": report.cpp_exact,
           "worst_layer_within_1lsb": report.within_1, "verify_ok": report.ok,
           "integer": _agreement(_embeddings(cm, held_out), fp32),
           "fake_quant": _agreement(_embeddings(lambda i, a: minilm.last_hidden(reference(i, a)), held_out), fp32)}
    log(f"  MiniLM integer-only: cosine {row['integer']['cosine_mean']:.4f}, "
        f"Spearman {row['integer']['spearman']:.4f}, verify ok {row['verify_ok']}")
    return [row]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        i, f = r["integer"], r["fake_quant"]
        out.append([r["model"], r["sentences"], f"{r['export_s']:.1f}", f"{r['gxx_s']:.1f}",
                    f"{r['sim_sentences_per_s']:.1f}", r["weights_b"], r["code_b"],
                    "yes" if r["cpp_bit_exact"] else "NO", f"{r['worst_layer_within_1lsb']:.4%}",
                    f"{i['cosine_mean']:.4f} ({i['cosine_min']:.4f})", f"{i['spearman']:.4f}",
                    f"{f['cosine_mean']:.4f} ({f['spearman']:.4f})"])
    return out


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    return (f"\n## MiniLM, integer-only\n\n{__doc__.split(chr(10), 1)[1]}\n"
            + markdown_table(HEADERS, table_rows(rows)) + "\n")
