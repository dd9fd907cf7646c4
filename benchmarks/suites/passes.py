"""Suite `passes`: how long fxopt's front half takes, and how it scales with graph size.

Per model, five stages, each through the public API only:

  trace    fxopt.trace(model, inputs)                       (copy + fake run + export + shapes)
  shapes   AnalysisManager(gm).get(analyses.Shapes)         (a fresh manager: recomputed)
  cost     AnalysisManager(gm).get(analyses.Cost)           (Shapes seeded from the trace, as
                                                             fxopt.compile does: Cost alone)
  fold-bn  PassManager("fold-bn").run(copy of gm, am)       (copy made untimed, every repeat)
  dce      PassManager("dce").run(copy of folded gm, am)    (the graph fold-bn left)

Seconds are medians over the repeats; "per node" divides by the node count of the
graph the stage reads. On the synthetic 1k/10k/50k-node graphs (one op mix at
every size) the suite fits log(time) against log(nodes): a slope near 1 is linear,
near 2 quadratic, and reports the per-node time at the largest size over the smallest.

Known bend (torch 2.14.1): `trace` grows faster than linearly on the synthetic graphs.
fxopt's own steps (copy, fake run, shape records) are linear; the time goes to
torch.export's `ExportedProgram.module()`, whose `_assign_attr`
(torch/export/unflatten.py) regex-matches every child of a parameter's parent
module for each parameter: O(parameters x children), i.e. quadratic for one flat
`nn.Sequential` of thousands of blocks (cf. pytorch/pytorch#177927).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import fxopt
from fxopt.analyses import Cost, Shapes, ShapeTable

from .. import models as zoo
from ..harness import (environment, fmt_seconds, loglog_slope, markdown_table, measure, render_results,
                       save_results)

NAME = "passes"
STAGES = ("trace", "shapes", "cost", "fold-bn", "dce")
DEFAULT_MODELS = ("resnet50", "transformer-24", "synthetic-1k", "synthetic-10k", "synthetic-50k")
QUICK_MODELS = ("synthetic-1k",)
BIG = 20_000            # nodes: at or above this, fewer repeats and no per-stage warm-up


def plan(stage: str, nodes: int, repeats: int | None, quick: bool) -> tuple[int, int]:
    """(repeats, warmup) for one stage on a graph of `nodes` nodes."""
    if quick:
        return repeats or 1, 0
    if stage == "trace":  # seconds to minutes each; the suite-wide warm-up primed export
        default = 3 if nodes < 5_000 else 2 if nodes < BIG else 1
        return (min(repeats, default) if repeats else default), 0
    default = 5 if nodes < BIG else 3
    return repeats or default, (1 if nodes < BIG else 0)


def _seeded(gm):
    """An AnalysisManager holding the shapes the tracer already recorded on `gm`."""
    am = fxopt.AnalysisManager(gm)
    am.put(Shapes, ShapeTable(gm))
    return am


def _copy_with_am(gm):
    g = copy.deepcopy(gm)
    return g, _seeded(g)


def _stage(name: str, m, nodes: int, **extra) -> dict:
    return {"stage": name, "nodes": nodes, **m.to_dict(),
            "s_per_node": m.median / nodes, **extra}


def bench_model(name: str, repeats: int | None = None, quick: bool = False, log=print) -> dict:
    """Time every stage on the zoo model `name`; returns its JSON record."""
    entry = zoo.get(name)
    model, inputs = entry.build()
    size_hint = entry.synthetic_nodes or 1_000

    r, w = plan("trace", size_hint, repeats, quick)
    m = measure(lambda _: fxopt.trace(model, inputs), repeats=r, warmup=w)
    gm, nodes = m.last, len(m.last.graph.nodes)
    stages = {"trace": _stage("trace", m, nodes)}
    log(f"  {name}: {nodes} nodes; trace {fmt_seconds(m.median)} (x{m.repeats})")

    r, w = plan("shapes", nodes, repeats, quick)
    m = measure(lambda _: fxopt.AnalysisManager(gm).get(Shapes), repeats=r, warmup=w)
    stages["shapes"] = _stage("shapes", m, nodes)

    m = measure(lambda am: am.get(Cost), repeats=r, warmup=w, setup=lambda: _seeded(gm))
    stages["cost"] = _stage("cost", m, nodes, macs=m.last.macs, params=m.last.params)

    fold_bn, dce = fxopt.PassManager("fold-bn"), fxopt.PassManager("dce")
    m = measure(lambda s: (s[0], fold_bn.run(*s)), repeats=r, warmup=w,
                setup=lambda: _copy_with_am(gm))
    folded, report = m.last
    stages["fold-bn"] = _stage("fold-bn", m, nodes, changed=report.records[0].changed,
                               notes=list(report.records[0].notes))

    folded_nodes = len(folded.graph.nodes)
    m = measure(lambda s: (s[0], dce.run(*s)), repeats=r, warmup=w,
                setup=lambda: _copy_with_am(folded))
    final, report = m.last
    stages["dce"] = _stage("dce", m, folded_nodes, changed=report.records[0].changed,
                           notes=list(report.records[0].notes))
    log("  " + ", ".join(f"{s} {fmt_seconds(v['median_s'])}" for s, v in stages.items() if s != "trace"))
    return {"name": name, "description": entry.description, "synthetic": entry.synthetic_nodes is not None,
            "nodes": nodes, "nodes_after_fold_bn": folded_nodes, "nodes_after_dce": len(final.graph.nodes),
            "stages": stages}


def linearity(records: list[dict]) -> dict | None:
    """Per-node time and log-log slope of every stage over the synthetic graphs."""
    synth = sorted((r for r in records if r["synthetic"]), key=lambda r: r["nodes"])
    if len(synth) < 2:
        return None
    nodes = [r["nodes"] for r in synth]
    series = {s: [r["stages"][s]["median_s"] for r in synth] for s in STAGES}
    series["pass manager (fold-bn + dce)"] = [a + b for a, b in zip(series["fold-bn"], series["dce"])]
    stages = {}
    for stage, seconds in series.items():
        per_node = [t / n for t, n in zip(seconds, nodes)]
        slope = loglog_slope(nodes, seconds)
        steps = [loglog_slope(nodes[i:i + 2], seconds[i:i + 2]) for i in range(len(nodes) - 1)]
        ratio = per_node[-1] / per_node[0] if per_node[0] > 0 else None
        stages[stage] = {"seconds": seconds, "s_per_node": per_node, "slope": slope,
                         "step_slopes": steps, "per_node_ratio": ratio,
                         "verdict": _verdict(slope, ratio)}
    return {"models": [r["name"] for r in synth], "nodes": nodes,
            "ratio_of": f"{synth[-1]['name']} vs {synth[0]['name']}", "stages": stages}


def _verdict(slope: float | None, ratio: float | None) -> str:
    """'linear' needs both a fitted slope below 1.15 and a per-node time at the largest
    size within 30% of the smallest's (a slope fit can hide a bend at the top)."""
    if slope is None or ratio is None:
        return "n/a"
    if slope < 1.15 and ratio < 1.3:
        return "linear"
    return "near-linear" if slope < 1.3 and ratio < 2.0 else "SUPER-LINEAR"


def to_markdown(result: dict) -> str:
    env, records = result["environment"], result["models"]
    out = [f"# Benchmark suite `{NAME}`", "",
           f"{env['date']} · torch {env['torch']} · Python {env['python']} · fxopt {env['fxopt']} · "
           f"{env['cpu_model']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads) · "
           f"suite wall time {result['wall_s']:.0f} s", "",
           "Median seconds per stage (µs per node of the graph the stage reads in brackets).", ""]
    headers = ["model", "nodes"] + list(STAGES)
    rows = [[r["name"], r["nodes"]] + [
        f"{fmt_seconds(r['stages'][s]['median_s'])} ({r['stages'][s]['s_per_node'] * 1e6:.1f})"
        for s in STAGES] for r in records]
    out += [markdown_table(headers, rows, "lr" + "r" * len(STAGES)), ""]
    lin = result.get("linearity")
    if lin:
        sizes = [f"µs/node @{n}" for n in lin["nodes"]]
        out += [f"Scaling over the synthetic graphs ({', '.join(lin['models'])}): per-node time, "
                f"its ratio {lin['ratio_of']}, and the slope of log(time) vs log(nodes) "
                "(1 = linear, 2 = quadratic).", ""]
        rows = [[stage] + [f"{v * 1e6:.1f}" for v in s["s_per_node"]]
                + [f"{s['per_node_ratio']:.2f}", f"{s['slope']:.2f}",
                   " / ".join(f"{v:.2f}" for v in s["step_slopes"]), s["verdict"]]
                for stage, s in lin["stages"].items()]
        steps = " / ".join(f"{a}→{b}" for a, b in zip(lin["nodes"], lin["nodes"][1:]))
        out += [markdown_table(["stage"] + sizes + ["per-node ratio", "slope (fit)",
                                                    f"slope per step ({steps})", "verdict"], rows,
                               "l" + "r" * (len(sizes) + 3) + "l"), ""]
        bent = [stage for stage, s in lin["stages"].items() if s["verdict"] != "linear"]
        out += [f"Not linear: {', '.join(bent)} (see the docstring of benchmarks/suites/passes.py)."
                if bent else "Every stage scales linearly with the node count.", ""]
    out += ["Samples: median, min-max and repeats per stage.", ""]
    rows = [[r["name"], s, v["nodes"], v["repeats"], fmt_seconds(v["median_s"]),
             f"{fmt_seconds(v['min_s'])} - {fmt_seconds(v['max_s'])}", f"{100 * v['spread']:.0f}%",
             "; ".join(v.get("notes", []))]
            for r in records for s, v in r["stages"].items()]
    out += [markdown_table(["model", "stage", "nodes in", "repeats", "median", "min - max", "spread", "notes"],
                           rows, "llrrrrrl"), ""]
    out += ["Method: `python -m benchmarks --suite passes`. Warm-up: one untimed pass over every stage "
            "on a small synthetic graph, then one untimed run per stage below 20k nodes. The copy each "
            "pass gets (deepcopy of the traced graph) is made outside the timed region. `cost` gets the "
            "shapes the tracer recorded, so it times Cost alone; `shapes` times a full fresh "
            "propagation on fake tensors."]
    return "\n".join(out)


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes passes.json and passes.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = tuple(models) if models else (QUICK_MODELS if quick else DEFAULT_MODELS)
    for n in names:
        zoo.get(n)  # fail before any timing on a typo
    if not quick:
        log("warm-up: every stage once on a 100-node synthetic graph")
        model, inputs = zoo.synthetic(100)
        gm = fxopt.trace(model, inputs)
        fxopt.AnalysisManager(gm).get(Cost)
        fxopt.PassManager("fold-bn,dce").run(gm)
    records = []
    for name in names:
        log(f"{name} ...")
        records.append(bench_model(name, repeats, quick, log))
    result = {"suite": NAME, "environment": environment(),
              "config": {"models": list(names), "repeats": repeats, "quick": quick},
              "models": records, "linearity": linearity(records),
              "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)
