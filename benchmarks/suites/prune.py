"""Suite `prune`: fxopt's prune-channels next to Torch-Pruning, same models, same ratio, one run.

Per model (torchvision, weights=None, eval; pruned on one 3x224x224 image, run at
batch 8), three things:

  time     fxopt: `fxopt.trace` and `PassManager("prune-channels{ratio=0.5}")` on it,
           timed apart (what fxopt.compile does, less its Cost-tracking instrument and
           the eager lowering); the pass time includes the ChannelGroups analysis.
           Torch-Pruning: `tp.pruner.MetaPruner(...)` construction (it builds the
           DependencyGraph: its analysis) and `pruner.step()` (the rewrite), each on a
           fresh deep copy made untimed (Torch-Pruning mutates the model it is given;
           fxopt.trace makes its own copy-on-write copy of the model, in its time).
           Both see a batch of one: Torch-Pruning runs the model forward and backward to
           build its graph (a batch of 8 would charge it for arithmetic), fxopt traces on
           fake tensors. Each tool first prunes once, untimed (that result is the one
           counted and run); then the four stages are timed round-robin.
  cost     MACs per image and parameters of the unpruned model and of both pruned ones,
           all by one counter: fxopt's Cost analysis on an `fxopt.trace` of each model,
           so the tools are never compared through two counting conventions.
  latency  CPU forward time at batch 8 with 2 torch threads of the unpruned model, its
           traced graph, and both pruned models, round-robin too. fxopt's graph is
           traced at batch 1 and runs at batch 8 (its batch dim is dynamic).
  memory   peak resident memory of fxopt.compile (`default` and the prune pipeline) and of
           Torch-Pruning, each in a fresh process, next to the model's weight bytes
           (benchmarks/suites/prune_memory.py); model `llama-1.1b` gets this row only.

Round-robin (the order rotating each round) because the machine may be shared: load
drifts, and every stage then sees the same drift, so the ratios stay fair.

Torch-Pruning runs the standard way: `MagnitudeImportance(p=1)`, `pruning_ratio=0.5`,
local scope, the final classifier in `ignored_layers`. For torchvision's ViT it follows
Torch-Pruning's own torchvision example: `round_to=num_heads` and `model.hidden_dim`
set to the pruned width afterwards (torchvision reshapes by that attribute). Passing
`num_heads={mha: mha.num_heads}` instead (the recipe for timm's attention) makes
Torch-Pruning 1.6 drop the residual-stream group on torchvision's
nn.MultiheadAttention: only the MLPs shrink, so that recipe is not the one measured.
fxopt gets no ignore list: a model's outputs are never pruned, the classifier's
inputs may be, as with Torch-Pruning's ignored classifier.

Both tools run at the same `ratio`, which is not the same as equal MACs: where the
MACs ratios differ the Markdown says so, and prints both, so latency can be judged.
A tool that fails on a model is recorded with its error; the suite goes on.

Sparsity rows (models `digits-cnn`, `minilm`): `prune-weights` unstructured at 50/80/90%
(per layer) and 2:4, no finetuning. digits-cnn: the digits CNN trained here
(benchmarks/digits.py), `fold-bn` first, fidelity = test accuracy on the 450 held-out
images. minilm: all-MiniLM-L6-v2 with its real weights, linears only (`skip=[pooler]`),
batches of 16 sentences at 32 tokens, fidelity = mean cosine of the sentence embeddings to
the fp32 model's (as suite `lowrank`). Sizes from report.sparsity: the pruned weights
dense, as int64 CSR, as bitmask + values, as 2:4 (values + 2-bit positions), and the
whole state dict with each pruned weight in its smallest format. The CPU latency of the
dense and pruned graphs is measured side by side: no sparse kernel runs on CPU, so it
is not expected to change.
"""
from __future__ import annotations

import copy
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fxopt
from fxopt.analyses import Cost

from ..harness import (bench_each, choose_models, environment, fmt_seconds, interleaved, markdown_table,
                       render_results, save_results)
from .prune_memory import LLAMA, bench_memory, memory_lines
from .prune_sparsity import SPARSITY_ROWS, bench_sparsity, infer, sparsity_lines, traced_with_am

NAME = "prune"
RATIO = 0.5
PIPELINE = f"prune-channels{{ratio={RATIO}}}"
PRUNE_BATCH = 1      # the example input both tools prune with
BATCH = 8            # the latency runs' batch
THREADS = 2
TOOLS = ("fxopt", "torch-pruning")
SAME_MACS = 0.01     # MACs ratios within 1% of each other count as equal MACs
NOT_INSTALLED = "not installed"
NOISY = 2.0          # a variant whose slowest latency run is over 2x its fastest: a busy machine
SPARSITY_MODELS = ("digits-cnn", "minilm")     # prune-weights rows (fidelity on real weights)
MEMORY_MODELS = (LLAMA,)                        # peak memory only (a 1.1B-parameter Llama)
DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "vit_b_16", "convnext_tiny", "efficientnet_b0") \
    + SPARSITY_MODELS + MEMORY_MODELS
QUICK_MODELS = ("resnet18",)
MODELS = DEFAULT_MODELS + QUICK_MODELS   # torchvision.models names, the sparsity and memory models
SIZE = 224           # input height = width
QUICK_SIZE = 64      # --quick: every model at 64x64 (ViT needs 224: its position table is fixed)


@dataclass(frozen=True)
class Plan:
    """Repeats and warm-ups: pruning is timed a few times, latency at least 10 times."""

    repeats: int
    warmup: int
    latency_runs: int
    latency_warmup: int


def plan(repeats: int | None, quick: bool) -> Plan:
    if quick:
        return Plan(repeats or 1, 0, 3, 1)
    return Plan(repeats or 3, 1, 15, 2)


def build(name: str, quick: bool):
    """The torchvision model `name` (random weights), its inputs to prune with and to time."""
    import torchvision

    size = QUICK_SIZE if quick and not name.startswith("vit") else SIZE
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, (torch.randn(PRUNE_BATCH, 3, size, size),), (torch.randn(BATCH, 3, size, size),)


def count(module, inputs) -> dict:
    """MACs and parameters of `module` by fxopt's Cost on a fresh trace (the one counter)."""
    table = fxopt.AnalysisManager(fxopt.trace(module, inputs)).get(Cost)
    return {"macs": table.macs, "params": table.params, "uncounted_ops": list(table.unknown)}


def _fxopt_prune(gm) -> tuple:
    g, am = traced_with_am(gm)
    return g, fxopt.PassManager(PIPELINE).run(g, am)


def fxopt_tool(model, one, eight):
    """fxopt: the pruned graph, the graph to time (the same one: it runs at the latency batch,
    its batch dim being dynamic), the stages to time, what it said."""
    traced = fxopt.trace(model, one)
    pruned, report = _fxopt_prune(traced)
    timed = pruned
    stages = {"trace": (lambda _: fxopt.trace(model, one), None),
              "prune": (lambda s: fxopt.PassManager(PIPELINE).run(*s), lambda: traced_with_am(traced))}
    return pruned, timed, stages, {"notes": list(report.records[0].notes), "pipeline": report.pipeline}


def _tp_options(model) -> dict:
    """Torch-Pruning's keyword arguments for `model`, and what they are, for the record."""
    import torch_pruning as tp
    import torchvision

    names = {m: n for n, m in model.named_modules()}
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    options = {"importance": tp.importance.MagnitudeImportance(p=1), "pruning_ratio": RATIO,
               "ignored_layers": [classifier]}
    shown = {"importance": "MagnitudeImportance(p=1)", "pruning_ratio": RATIO,
             "ignored_layers": [names[classifier]]}
    if isinstance(model, torchvision.models.VisionTransformer):
        options["round_to"] = shown["round_to"] = model.encoder.layers[0].num_heads
    return {"kwargs": options, "shown": shown}


def _tp_pruner(model, inputs):
    """A MetaPruner over `model` (constructing it builds Torch-Pruning's DependencyGraph)."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(model, inputs, **_tp_options(model)["kwargs"])


def tp_tool(model, one, eight):
    """Torch-Pruning on a deep copy (it mutates its model): the pruned module (it runs at any
    batch, so it is also the one timed), the stages to time, its options."""
    pruner = _tp_pruner(copy.deepcopy(model), one)
    pruner.step()
    pruned = pruner.model
    if hasattr(pruned, "hidden_dim") and hasattr(pruned, "conv_proj"):  # torchvision ViT reshapes by it
        pruned.hidden_dim = pruned.conv_proj.out_channels
    stages = {"analysis": (lambda m: _tp_pruner(m, one), lambda: copy.deepcopy(model)),
              "prune": (lambda pr: pr.step(), lambda: _tp_pruner(copy.deepcopy(model), one))}
    return pruned, pruned, stages, {"options": _tp_options(model)["shown"]}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _run_tool(tool: str, model, one, eight):
    """(module to time or None, stages, record): one untimed pruning with its cost, or its error."""
    if tool == "torch-pruning" and not _installed("torch_pruning"):
        return None, {}, {"ok": False, "error": NOT_INSTALLED}
    try:
        pruned, timed, stages, extra = (fxopt_tool if tool == "fxopt" else tp_tool)(model, one, eight)
        return timed, stages, {"ok": True, **count(pruned, one), **extra}
    except Exception as exc:  # noqa: BLE001 — a tool's failure is a result, not a crash
        return None, {}, {"ok": False, "error": _error(exc)}


def bench_model(name: str, p: Plan, quick: bool = False, log=print) -> dict:
    """Prune `name` with both tools, count and time everything; returns its JSON record."""
    model, one, eight = build(name, quick)
    unpruned = count(model, one)
    variants = {"unpruned": model, "unpruned-graph": fxopt.trace(model, eight)}
    tools, stages = {}, {}
    for tool in TOOLS:
        timed, tool_stages, record = _run_tool(tool, model, one, eight)
        if timed is None:
            log(f"  {tool} FAILED: {record['error'][:200]}")
        else:
            variants[tool] = timed
            stages.update({(tool, s): v for s, v in tool_stages.items()})
            record["macs_ratio"] = unpruned["macs"] / record["macs"] if record["macs"] else None
            record["params_ratio"] = unpruned["params"] / record["params"] if record["params"] else None
        tools[tool] = record
    for (tool, stage), m in interleaved(stages, p.repeats, p.warmup).items():
        tools[tool].setdefault("times", {})[stage] = m.to_dict()
    lat = interleaved({n: ((lambda _, m=m: infer(m, eight)), None) for n, m in variants.items()},
                      p.latency_runs, p.latency_warmup)
    lat = {n: m.to_dict() for n, m in lat.items()}
    for tool, record in tools.items():
        if record["ok"]:
            record["times"]["total_s"] = sum(t["median_s"] for t in record["times"].values())
            record["latency"] = lat[tool]
            record["speedup"] = lat["unpruned"]["median_s"] / lat[tool]["median_s"]
            log(f"  {tool}: {fmt_seconds(record['times']['total_s'])}, MACs {unpruned['macs'] / 1e9:.2f}G"
                f" -> {record['macs'] / 1e9:.2f}G, {record['speedup']:.2f}x faster")
    both = all(r["ok"] for r in tools.values())
    fx, tp = tools["fxopt"], tools["torch-pruning"]
    memory = bench_memory(name, PIPELINE, one[0].shape[-1], log)
    return {"name": name, "memory": memory, "input": list(one[0].shape), "latency_input": list(eight[0].shape),
            "unpruned": {**unpruned, "latency": lat["unpruned"]},
            "unpruned_graph": {"latency": lat["unpruned-graph"]}, "tools": tools,
            "latency_ratio": fx["latency"]["median_s"] / tp["latency"]["median_s"] if both else None,
            "latency_ratio_min": fx["latency"]["min_s"] / tp["latency"]["min_s"] if both else None,
            "equal_macs": abs(fx["macs"] / tp["macs"] - 1) <= SAME_MACS if both else None}


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3g}G"


def _m(params: int) -> str:
    return f"{params / 1e6:.3g}M"


def _rows(records, *columns) -> list[list]:
    """One row per model. A column is (fn, tool): fn of that tool's record ("failed" where
    the tool failed), or of the model's record where tool is None."""
    def cell(r, fn, tool):
        t = r if tool is None else r["tools"][tool]
        if tool is None or t["ok"]:
            return fn(t)
        return "not installed" if t["error"] == NOT_INSTALLED else "failed"

    return [[r["name"]] + [cell(r, fn, tool) for fn, tool in columns] for r in records]


def _ratio(key: str):
    return lambda r: f"{r[key]:.2f}" if r.get(key) else "n/a"


def _took(stage: str):
    return lambda t: fmt_seconds(t["times"][stage] if stage == "total_s" else t["times"][stage]["median_s"])


def _tables(records) -> tuple[list, list, list]:
    """Rows of the cost, latency and pruning-time tables."""
    fx, tp = TOOLS
    macs = lambda t: f"{_g(t['macs'])} ({t['macs_ratio']:.2f}x)"  # noqa: E731
    params = lambda t: _m(t["params"])  # noqa: E731
    lat = lambda t: fmt_seconds(t["latency"]["median_s"])  # noqa: E731
    speedup = lambda t: f"{t['speedup']:.2f}x"  # noqa: E731
    equal = {True: "yes", False: "**no**", None: "n/a"}
    cost = _rows(records, (lambda r: _g(r["unpruned"]["macs"]), None), (macs, fx), (macs, tp),
                 (lambda r: params(r["unpruned"]), None), (params, fx), (params, tp),
                 (lambda r: equal[r["equal_macs"]], None))
    latency = _rows(records, (lambda r: lat(r["unpruned"]), None), (lambda r: lat(r["unpruned_graph"]), None),
                    (lat, fx), (lat, tp), (_ratio("latency_ratio"), None), (_ratio("latency_ratio_min"), None),
                    (speedup, fx), (speedup, tp))
    times = _rows(records, *((_took(stage), tool) for tool, stage in (
        (fx, "trace"), (fx, "prune"), (fx, "total_s"), (tp, "analysis"), (tp, "prune"), (tp, "total_s"))))
    return cost, latency, times


def _findings(records) -> list[str]:
    """Sentences for what a reader must not miss: unequal MACs, failures, fxopt notes."""
    out = []
    for r in records:
        fx, tp = r["tools"]["fxopt"], r["tools"]["torch-pruning"]
        if r["equal_macs"] is False:
            out.append(f"- {r['name']}: **not at equal MACs** — fxopt {_g(fx['macs'])} "
                       f"({fx['macs_ratio']:.2f}x fewer), Torch-Pruning {_g(tp['macs'])} "
                       f"({tp['macs_ratio']:.2f}x fewer) per image; its latency ratio compares different "
                       "amounts of pruning.")
        for tool, t in r["tools"].items():
            if not t["ok"] and t["error"] == NOT_INSTALLED:
                out.append(f"- {r['name']}: {tool} is not installed (`pip install {tool}`): its columns are empty.")
            elif not t["ok"]:
                out.append(f"- {r['name']}: {tool} failed: `{t['error'][:300]}`")
        worst = max(v["latency"]["max_s"] / v["latency"]["min_s"]
                    for v in (r["unpruned"], r["unpruned_graph"], *(t for t in (fx, tp) if t["ok"])))
        if worst > NOISY:
            out.append(f"- {r['name']}: noisy latency (slowest run {worst:.1f}x the fastest: other work "
                       "shared the cores); the ratio of minima is the steadier figure.")
        if fx["ok"] and fx["notes"]:
            out.append(f"- {r['name']}: fxopt says: {fx['notes'][0]}")
    return out


def _load(env: dict) -> str:
    """Load average at start -> end: above the CPU count, other work shared the cores."""
    start, end = env.get("load_avg_1m_start"), env.get("load_avg_1m")
    return " -> ".join(f"{v:.1f}" for v in (start, end) if v is not None) or "n/a"


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    sparse = [r for r in result["models"] if r.get("kind") == "sparsity"]
    records = [r for r in result["models"] if "error" not in r and r.get("kind") not in ("sparsity", "memory")]
    with_memory = [r for r in result["models"] if "error" not in r and r.get("memory")]
    broken = [f"- {r['name']}: not measured: `{r['error'][:300]}`" for r in result["models"] if "error" in r]
    shape = "x".join(str(d) for d in records[0]["input"]) if records else "n/a"
    cost, latency, times = _tables(records)
    out = [f"# Benchmark suite `{NAME}`", "",
           f"{env['date']} · torch {env['torch']} · torchvision {env.get('torchvision')} · "
           f"Torch-Pruning {env.get('torch_pruning')} · Python {env['python']} · fxopt {env['fxopt']} · "
           f"{env['cpu_model']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads) · "
           f"load average {_load(env)} · suite wall time {result['wall_s']:.0f} s", ""]
    out += [] if sparse and not records else _channel_lines(cfg, shape, cost, latency, times)
    out += memory_lines(with_memory, PIPELINE, markdown_table)
    out += sparsity_lines(sparse)
    findings = broken + _findings(records)
    if findings:
        out += ["Notes:", ""] + findings + [""]
    out += [f"Method: `python -m benchmarks --suite {NAME}`; sparsity rows: see the docstring of "
            "benchmarks/suites/prune.py." if not records else
            f"Method: `python -m benchmarks --suite {NAME}`. Torch-Pruning prunes a deep copy (it mutates "
            "its model), made outside the timed region; fxopt's trace makes its own copy-on-write copy of "
            "the model (no weight is copied), inside its time. For torchvision's ViT it uses its torchvision example's recipe, "
            "`round_to=num_heads` and `hidden_dim` set afterwards (`num_heads={mha: mha.num_heads}` makes "
            "Torch-Pruning 1.6 leave the residual stream of nn.MultiheadAttention unpruned). The classifier "
            "is Torch-Pruning's ignored layer; fxopt never prunes a model's outputs. Latency runs the "
            "unpruned nn.Module, fxopt's unpruned and pruned GraphModules (traced at batch 1, run at batch "
            f"{cfg['batch']}: the batch dim is dynamic) and Torch-Pruning's pruned "
            "nn.Module under torch.inference_mode, eager, round-robin with a rotating order."]
    return "\n".join(out)


def _channel_lines(cfg: dict, shape: str, cost, latency, times) -> list[str]:
    out = [f"fxopt `{PIPELINE}` and Torch-Pruning `MetaPruner(MagnitudeImportance(p=1), "
           f"pruning_ratio={RATIO})`, local scope, both pruning on input {shape}; random weights.", "",
           "MACs per image and parameters, all counted by fxopt's Cost on a trace of each model "
           "(ratio = unpruned / pruned). Equal MACs: both tools' MACs within "
           f"{SAME_MACS:.0%} of each other.", ""]
    out += [markdown_table(["model", "MACs unpruned", "MACs fxopt", "MACs Torch-Pruning", "params unpruned",
                            "params fxopt", "params Torch-Pruning", "equal MACs"],
                           cost, "lrrrrrrl"), ""]
    out += [f"CPU latency, batch {cfg['batch']}, {cfg['threads']} threads, median of {cfg['latency_runs']} runs "
            f"after {cfg['latency_warmup']} warm-up, all variants interleaved in one run. "
            "\"unpruned graph\" is fxopt's trace before pruning (what fxopt's pruned graph should be "
            "compared with to separate tracing from pruning); ratio = fxopt / Torch-Pruning "
            "(below 1: fxopt faster) of the medians, and of the fastest runs (less sensitive to other "
            "work on the machine); speed-up = unpruned nn.Module / pruned, medians.", ""]
    out += [markdown_table(["model", "unpruned", "unpruned graph", "fxopt", "Torch-Pruning", "ratio fxopt/TP",
                            "ratio of minima", "fxopt speed-up", "TP speed-up"], latency,
                           "lrrrrrrrr"), ""]
    out += [f"Analysis + rewrite time, median of {cfg['repeats']} (fxopt: trace, then the prune-channels "
            "pass with its ChannelGroups analysis; Torch-Pruning: MetaPruner construction with its "
            "DependencyGraph, then step()).", ""]
    out += [markdown_table(["model", "fxopt trace", "fxopt prune pass", "fxopt total", "TP analysis",
                            "TP step", "TP total"], times, "lrrrrrr"), ""]
    return out


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def _environment() -> dict:
    try:
        import torch_pruning
    except ImportError:
        torch_pruning = None
    import torchvision

    return {**environment(), "torchvision": torchvision.__version__,
            "torch_pruning": getattr(torch_pruning, "__version__", "unknown") if torch_pruning else "not installed"}


def _bench(name: str, p: Plan, quick: bool, log) -> dict:
    if name in SPARSITY_MODELS:
        return bench_sparsity(name, p, quick, log)
    if name in MEMORY_MODELS:
        return {"name": name, "kind": "memory", "memory": bench_memory(name, PIPELINE, SIZE, log)}
    return bench_model(name, p, quick, log)


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes prune.json and prune.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, MODELS)
    p = plan(repeats, quick)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the box
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        records = bench_each(names, lambda name: _bench(name, p, quick, log), log)
        env = {**_environment(), "load_avg_1m_start": load_start}
    finally:
        torch.set_num_threads(threads)
    result = {"suite": NAME, "environment": env,
              "config": {"models": list(names), "ratio": RATIO, "pipeline": PIPELINE,
                         "prune_batch": PRUNE_BATCH, "batch": BATCH, "sparsity_rows": list(SPARSITY_ROWS),
                         "threads": THREADS, "repeats": p.repeats, "warmup": p.warmup,
                         "latency_runs": p.latency_runs, "latency_warmup": p.latency_warmup, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)
