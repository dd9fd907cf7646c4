"""The `prune` suite's prune-weights rows: unstructured 50 / 80 / 90% and 2:4 on real weights.

Fidelity is measured on real weights (the digits CNN: test accuracy; MiniLM: embedding
cosine to fp32); sizes are the pruned weights stored dense, as CSR, as a bitmask plus
values and as 2:4; latency is CPU, dense graph / pruned graph, interleaved. No sparse
kernel runs on CPU, so the latency column shows no speed-up, and none is claimed.
"""
from __future__ import annotations

import copy

import torch

import fxopt
from fxopt.analyses import ShapeTable, Shapes

from .. import digits, minilm
from ..harness import fmt_seconds, interleaved, markdown_table

SPARSITY_ROWS = ("sparsity=0.5", "sparsity=0.8", "sparsity=0.9", "sparsity=0.8 scope=global",
                 "sparsity=0.9 scope=global", "pattern=2:4")
NOISY = 2.0          # a variant whose slowest latency run is over 2x its fastest: a busy machine


def traced_with_am(gm):
    """A copy of the traced graph and a manager holding its recorded shapes, as compile seeds it."""
    g = copy.deepcopy(gm)
    am = fxopt.AnalysisManager(g)
    am.put(Shapes, ShapeTable(g))
    return g, am


def infer(module, inputs):
    with torch.inference_mode():
        return module(*inputs)


def _sparsity_bench(name: str, quick: bool):
    """(model, batches to judge and time on, fidelity fn(module) -> float, base pipeline, skip)."""
    if name == "digits-cnn":
        data = digits.load()
        model = digits.train(data)
        return model, [(data[2][:digits.BATCH],)], lambda m: digits.accuracy(m, data), "fold-bn,", ""
    model, tokenizer = minilm.load()
    batches = minilm.batches(tokenizer, minilm.sentences(), 16)[:4 if quick else None]
    embed = lambda m: torch.cat([minilm.embed(minilm.last_hidden(m(*b)), b[1]) for b in batches])  # noqa: E731
    with torch.no_grad():
        ref = embed(model)
    cosine = lambda m: torch.nn.functional.cosine_similarity(ref, embed(m), dim=-1).mean().item()  # noqa: E731
    return model, batches, cosine, "", " targets=[linear] skip=[pooler]"


def bench_sparsity(name: str, p, quick: bool = False, log=print) -> dict:
    """The dense graph and one prune-weights graph per SPARSITY_ROWS: sizes, fidelity, CPU latency."""
    model, batches, fidelity, base, extra = _sparsity_bench(name, quick)
    traced = fxopt.trace(model, batches[0])
    graphs, rows = {}, []
    for label in ("dense",) + SPARSITY_ROWS:
        g, am = traced_with_am(traced)
        pipeline = (base + (f"prune-weights{{{label}{extra}}}" if label != "dense" else "")).rstrip(",")
        report = fxopt.PassManager(pipeline).run(g, am) if pipeline else None
        with torch.no_grad():
            row = {"label": label, "pipeline": pipeline, "fidelity": fidelity(g)}
        sparsity = report.sections.get("sparsity") if report is not None else None
        if sparsity is not None:
            d = sparsity.to_dict()
            row.update({k: d[k] for k in ("numel", "pruned", "nnz", "sparsity", "skipped")},
                       layers=len(d["layers"]), bytes={f: sparsity.bytes(f) for f in ("dense", "csr", "bitmask")}
                       | {"2:4": sparsity.bytes("2:4") if label == "pattern=2:4" else None,
                          "smallest": sparsity.bytes()})
        graphs[label] = g
        rows.append(row)
        log(f"  {label}: fidelity {row['fidelity']:.4f}" + (f", {row['sparsity']:.1%} of {row['numel']} weights "
                                                            f"pruned" if "sparsity" in row else ""))
    lat = interleaved({k: ((lambda _, g=g: infer(g, batches[0])), None) for k, g in graphs.items()},
                      p.latency_runs, p.latency_warmup)
    for row in rows:
        row["latency"] = lat[row["label"]].to_dict()
        row["latency_ratio"] = lat["dense"].median / lat[row["label"]].median
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"name": name, "kind": "sparsity", "fidelity": "test accuracy" if name == "digits-cnn" else
            "embedding cosine vs fp32", "input": [list(t.shape) for t in batches[0]],
            "samples": 450 if name == "digits-cnn" else 16 * len(batches),
            "state_dict_bytes": state, "rows": rows}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 1024:.3g} KiB"


def sparsity_lines(records: list[dict]) -> list[str]:
    if not records:
        return []
    out = ["## Unstructured and 2:4 sparsity (`prune-weights`)", "",
           "Pruned weights as stored dense, as CSR (int64 indices), as a bitmask + values and as 2:4 "
           "(kept half + 2-bit positions); model = the whole state dict with each pruned weight in its "
           "smallest format. Latency: CPU, dense graph / pruned graph (medians, interleaved): the zeros "
           "are still multiplied, no sparse kernel runs on CPU. No finetuning after pruning.", ""]
    for r in records:
        rows = []
        for x in r["rows"]:
            b = x.get("bytes", {})
            state = r["state_dict_bytes"] - b["dense"] + b["smallest"] if b else r["state_dict_bytes"]
            rows.append([f"`{x['pipeline']}`" if x["pipeline"] else "dense (traced graph)",
                         f"{x['sparsity']:.1%} of {x['numel']}" if b else "-",
                         *(_mib(b.get(f)) for f in ("dense", "csr", "bitmask", "2:4")),
                         _mib(state), f"{x['fidelity']:.4f}", fmt_seconds(x["latency"]["median_s"]),
                         f"{x['latency_ratio']:.2f}"])
        out += [f"### {r['name']}", "", f"Input {r['input']}; fidelity: {r['fidelity']} on {r['samples']} "
                f"samples; dense state dict {_mib(r['state_dict_bytes'])}.", "",
                markdown_table(["pipeline", "pruned", "pruned weights dense", "CSR", "bitmask+values", "2:4",
                                "model (smallest)", r["fidelity"], "CPU latency", "dense/pruned"],
                               rows, "lrrrrrrrrr"), ""]
        skipped = {s[0] for x in r["rows"] for s in x.get("skipped", [])}
        if skipped:
            out += [f"Left dense by 2:4 or skip: {', '.join(sorted(skipped))}.", ""]
        worst = max(x["latency"]["max_s"] / x["latency"]["min_s"] for x in r["rows"])
        if worst > NOISY:
            out += [f"Noisy latency (slowest run {worst:.1f}x the fastest: other work shared the cores); "
                    "dense/pruned differences here are noise, not a sparse speed-up.", ""]
    return out


