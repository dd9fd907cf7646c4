"""Suite `backends`: compile time and CPU latency of fxopt's eager, inductor and xla backends, one run.

Per model, every backend lowers the same rewritten graph:
`fxopt.compile(model, x, pipeline="fold-bn,canonicalize,dce", backend=B, verify=False)`
(instruments off), 2 torch threads.

  resnet50   torchvision, weights=None, made numerically realistic with
             `benchmarks.models.with_realistic_statistics` (BatchNorm statistics from
             random batches, damped residual branches). Batch 8 at 224x224
             (--quick: batch 2 at 64x64).
  bert       the BERT-like encoder of the backend tests (transformers' BertModel, int64
             ids and an attention mask whose second sequence is padded over its last
             quarter) at BERT-base size: 12 layers, hidden 768, 12 heads, intermediate
             3072, random weights (nothing is downloaded). Batch 8, sequence 128
             (--quick: batch 2, sequence 32). Outputs: last hidden state and pooler.
  bert-tiny  the backend tests' own configuration (2 layers, hidden 64, 4 heads,
             intermediate 128, vocabulary 1000); batch 8, sequence 64 (--quick:
             batch 2, sequence 16). Not in the default run: the smoke test's model.

compile    wall seconds of `fxopt.compile` (trace, passes, lowering) plus the first
           call on the example inputs. Both compiling backends do their work inside
           `fxopt.compile`: inductor wraps the graph in `torch.compile` and runs it
           once there (dynamo capture, AOT autograd, C++ codegen and the C++ compiler;
           `report.inductor.compile_seconds`), xla exports the graph, lowers it to
           StableHLO with torch-mlir and compiles it with XLA (`report.xla.seconds`).
           The first call is timed as well (`first_call_s`), as it can still pay
           one-off costs (a first sdpa / oneDNN call, lazy kernel loading). Every
           compile runs in a fresh, empty TorchInductor cache
           (`torch._inductor.utils.fresh_cache`), so inductor's on-disk FX-graph
           cache of an earlier run or model cannot make it look fast; a cache hit
           compiles several times faster (not measured here). One-off per-process
           costs (importing jax and torch-mlir, inductor's compile workers, the first
           C++ build) are paid beforehand on a tiny conv / linear model, untimed
           for the table and recorded as `process_warmup_s`.
latency    the nn.Module and the three compiled models on the example inputs, round-
           robin with the order rotating each round (a shared machine's drift hits all
           alike), median and spread ((max - min) / median) after warm-up. XLA runs on
           its own CPU thread pool (sized by the cores it sees, not by torch's thread
           count); the environment records the core count and the load average.
           Interleaving does not make a shared machine fair to all: when other work
           takes a core, torch's 2 OpenMP threads (which meet at a barrier after every
           op) slow down several times more than XLA's pool (measured: resnet50 eager
           from 0.3 s to 2.4 s, XLA from 0.34 s to 0.55 s). So the ratio of the fastest
           runs is given next to the ratio of medians, and a gap between the two is
           flagged in the findings.
ratios     eager / backend latency (above 1: faster than the eager backend), of the
           medians (`latency_ratio`) and of the fastest runs (`latency_ratio_min`: on a
           shared machine the run least disturbed by other work), and backend / eager
           compile time (`compile_ratio`: how many times longer it takes to compile).
bf16       one more row, `eager-bf16`: the eager backend after
           `fold-bn,canonicalize,dce,mixed-precision{dtype=bf16}` (softmax, norms and
           reductions stay fp32, see README "Mixed precision"), compiled, timed and
           interleaved like the others; its outputs are judged by the cosine to the
           nn.Module's over all outputs (`cosine`, must be at least 0.999), not by 1e-4.
           It lives under `variants` in the JSON (`rows` keeps the three backends).
outputs    on a fresh batch of the same shape, the largest difference of any output
           element relative to the output's largest magnitude (`benchmarks.zoo.
           relative_difference`), against the nn.Module (`rel_diff`) and against the
           eager backend's graph (`rel_diff_graph`: the lowering alone). Both must be
           below 1e-4 (`ok`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fxopt

from ..harness import (Measurement, bench_each, choose_models, closing_lines, environment, fmt_seconds, interleaved,
                       markdown_table, package_versions, render_results, save_results)
from ..models import with_realistic_statistics
from ..zoo import relative_difference

NAME = "backends"
PIPELINE = "fold-bn,canonicalize,dce"
BACKENDS = ("eager", "inductor", "xla")
VARIANTS = {"eager-bf16": ("eager", PIPELINE + ",mixed-precision{dtype=bf16}")}   # label: (backend, pipeline)
MIN_COSINE = 0.999    # a variant's outputs against the nn.Module's
THREADS = 2
TOL = 1e-4
NOISY = 0.5           # a latency spread above this: other work shared the cores
SKEW = 0.25           # median and fastest-run ratios this far apart: the load changed mid-run
DEFAULT_MODELS = ("resnet50", "bert")
QUICK_MODELS = DEFAULT_MODELS
MODELS = DEFAULT_MODELS + ("bert-tiny",)

# (batch, image size or sequence length), full and --quick
SHAPES = {"resnet50": ((8, 224), (2, 64)), "bert": ((8, 128), (2, 32)), "bert-tiny": ((8, 64), (2, 16))}
BERT_CONFIGS = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
    "bert-tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64),
}


@dataclass(frozen=True)
class Plan:
    """Cold compiles per backend, latency runs and warm-up rounds."""

    repeats: int
    latency_runs: int
    latency_warmup: int


def plan(repeats: int | None, quick: bool) -> Plan:
    if quick:
        return Plan(repeats or 1, 3, 1)
    return Plan(repeats or 1, 12, 2)


@dataclass
class Bench:
    model: torch.nn.Module
    example: tuple        # the compile and latency inputs
    check: tuple          # a fresh batch of the same shape, for the output comparison
    description: str


def _bert_inputs(vocab: int, batch: int, seq: int) -> tuple:
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - seq // 4:] = 0   # the second sequence is padded
    return ids, mask


def build(name: str, quick: bool) -> Bench:
    batch, size = SHAPES[name][1 if quick else 0]
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        model = with_realistic_statistics(model, [torch.randn(batch, 3, size, size) for _ in range(4)])
        return Bench(model, (torch.randn(batch, 3, size, size),), (torch.randn(batch, 3, size, size),),
                     f"torchvision resnet50, {batch}x3x{size}x{size}")
    import transformers

    cfg = BERT_CONFIGS[name]
    model = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
    vocab = cfg["vocab_size"]
    return Bench(model, _bert_inputs(vocab, batch, size), _bert_inputs(vocab, batch, size),
                 f"BertModel ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg['num_attention_heads']} heads), ids and padded mask {batch}x{size}")


class _Warmup(torch.nn.Module):
    """Conv, BatchNorm, linear: enough to start every backend's machinery."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


# ---- measuring ------------------------------------------------------------------------------

def _fresh_inductor_cache(root: str):
    """An empty TorchInductor cache folder under `root` for one compile (kept until the run ends:
    the compiled model's kernels live there)."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # an older torch: the default cache (warm compiles possible)
        return contextlib.nullcontext()
    return fresh_cache(dir=root, delete=False)


def compile_once(b: Bench, backend: str, cache_root: str, pipeline: str = PIPELINE) -> tuple:
    """(compiled model, seconds of fxopt.compile, seconds of the first call)."""
    with _fresh_inductor_cache(cache_root):
        start = time.perf_counter()
        cm = fxopt.compile(b.model, b.example, pipeline=pipeline, backend=backend, instruments=(),
                           verify=False)
        mid = time.perf_counter()
        with torch.no_grad():
            cm(*b.example)
        end = time.perf_counter()
    return cm, mid - start, end - mid


def warm_up_process(cache_root: str, log) -> dict:
    """Compile and run a tiny model with every backend once: the process's one-off costs."""
    torch.manual_seed(0)
    b = Bench(_Warmup().eval(), (torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 8, 8),), "warm-up")
    out = {}
    for backend in BACKENDS:
        start = time.perf_counter()
        try:
            compile_once(b, backend, cache_root)
            out[backend] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 — the model's row will say it again
            out[backend] = None
            log(f"  warm-up {backend} failed: {type(exc).__name__}: {str(exc)[:200]}")
    log("  process warm-up: " + ", ".join(f"{k} {'-' if v is None else fmt_seconds(v)}" for k, v in out.items()))
    return out


def _backend_seconds(cm, backend: str) -> dict | None:
    section = getattr(cm.report, backend, None) if backend != "eager" else None
    if section is None:
        return None
    if backend == "inductor":
        return {"compile": section.compile_seconds}
    return dict(section.seconds)


def _outputs(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def _cosine(expected, actual) -> float:
    """Cosine between all floating-point output leaves, flattened and joined."""
    pairs = [(e, a) for e, a in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(actual))
             if isinstance(e, torch.Tensor) and e.is_floating_point()]
    e, a = (torch.cat([t.double().flatten() for t in ts]) for ts in zip(*pairs))
    return torch.nn.functional.cosine_similarity(e, a, dim=0).item()


def bench_model(name: str, p: Plan, quick: bool, cache_root: str, log) -> dict:
    b = build(name, quick)
    reference = _outputs(b.model, b.check)
    rows, variants, compiled, graph_out = [], [], {}, None
    for label in BACKENDS + tuple(VARIANTS):
        backend, pipeline = VARIANTS.get(label, (label, PIPELINE))
        row = {"backend": label}
        (variants if label in VARIANTS else rows).append(row)
        try:
            totals, splits = Measurement(), []
            for _ in range(p.repeats):
                cm, compile_s, first_s = compile_once(b, backend, cache_root, pipeline)
                totals.samples.append(compile_s + first_s)
                splits.append({"compile_s": compile_s, "first_call_s": first_s})
            out = _outputs(cm, b.check)
        except Exception as exc:  # noqa: BLE001 — a backend failing on a model is a result
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"  {label}: FAILED: {row['error'][:200]}")
            continue
        compiled[label] = cm
        row.update({"compile": totals.to_dict(), "compile_split": splits[-1],
                    "backend_seconds": _backend_seconds(cm, backend),
                    "rel_diff": relative_difference(reference, out),
                    "rel_diff_graph": None if graph_out is None else relative_difference(graph_out, out)})
        if label == "eager":
            graph_out = out
        row["ok"] = row["rel_diff"] < TOL and (row["rel_diff_graph"] is None or row["rel_diff_graph"] < TOL)
        if label in VARIANTS:
            row.update(pipeline=pipeline, cosine=_cosine(reference, out))
            row["ok"] = row["cosine"] >= MIN_COSINE
        log(f"  {label}: compile {fmt_seconds(totals.median)} (first call {fmt_seconds(first_s)}), "
            f"rel diff {row['rel_diff']:.1e}" + (f", cosine {row['cosine']:.6f}" if "cosine" in row else ""))
        del out
    with torch.no_grad():
        runs = {"module": b.model, **compiled}
        lat = interleaved({k: ((lambda _, m=m: m(*b.example)), None) for k, m in runs.items()},
                          p.latency_runs, p.latency_warmup)
    eager_lat = lat["eager"].median if "eager" in lat else None
    eager_compile = rows[0]["compile"]["median_s"] if "compile" in rows[0] else None
    for row in rows + variants:
        if "error" in row:
            continue
        m = lat[row["backend"]]
        row["latency"] = m.to_dict()
        row["latency_ratio"] = eager_lat / m.median if eager_lat else None        # above 1: faster than eager
        row["latency_ratio_min"] = lat["eager"].min / m.min if eager_lat else None
        row["compile_ratio"] = row["compile"]["median_s"] / eager_compile if eager_compile else None
        log(f"  {row['backend']}: latency {fmt_seconds(m.median)} (spread {m.spread:.0%}), eager/backend "
            f"{row['latency_ratio'] or float('nan'):.2f}")
    return {"name": name, "description": b.description, "kind": "vision" if name == "resnet50" else "text",
            "input": [list(t.shape) for t in b.example], "module": {"latency": lat["module"].to_dict()},
            "rows": rows, "variants": variants}


# ---- Markdown -------------------------------------------------------------------------------

def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(r: dict) -> str:
    heads = ["backend", "compile + first call", "of which first call", "backend's own", "compile vs eager",
             "latency (spread)", "eager / backend", "fastest run", "eager / backend, fastest runs",
             "rel diff vs module", "rel diff vs eager graph"]
    mod = r["module"]["latency"]
    rows = [["(nn.Module)", "", "", "", "", f"{fmt_seconds(mod['median_s'])} ({mod['spread']:.0%})", "",
             fmt_seconds(mod["min_s"]), "", "", ""]]
    for x in r["rows"] + r.get("variants", []):
        if "error" in x:
            rows.append([x["backend"], f"failed: `{x['error'].splitlines()[0][:120]}`", *[""] * 9])
            continue
        own = x["backend_seconds"]
        own = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in own.items()) if own else "-"
        lat = x["latency"]
        rows.append([x["backend"], fmt_seconds(x["compile"]["median_s"]),
                     fmt_seconds(x["compile_split"]["first_call_s"]), own, f"{_ratio(x['compile_ratio'])}x",
                     f"{fmt_seconds(lat['median_s'])} ({lat['spread']:.0%})", f"**{_ratio(x['latency_ratio'])}**",
                     fmt_seconds(lat["min_s"]), _ratio(x.get("latency_ratio_min")),
                     f"{x['rel_diff']:.1e}" + (f" (cosine {x['cosine']:.5f})" if "cosine" in x else ""),
                     "-" if x["rel_diff_graph"] is None else f"{x['rel_diff_graph']:.1e}"])
    return markdown_table(heads, rows, "lrrlrrrrrrr")


def findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        ok = [x for x in r["rows"] if "error" not in x]
        timed = [x for x in ok if x.get("latency_ratio") is not None and x["backend"] != "eager"]
        if timed:
            best = max(timed, key=lambda x: x["latency_ratio"])
            out.append(f"- {r['name']}: " + "; ".join(
                f"{x['backend']} {x['latency_ratio']:.2f}x eager's speed, {x['compile_ratio']:.1f}x its compile time"
                for x in timed) + f". Fastest: {best['backend'] if best['latency_ratio'] > 1 else 'eager'}.")
        for x in (v for v in r.get("variants", []) if "error" not in v and v.get("latency_ratio")):
            out.append(f"- {r['name']}: {x['backend']} ({x['pipeline']}) runs at {x['latency_ratio']:.2f}x the fp32 "
                       f"eager backend's speed (fastest runs {_ratio(x.get('latency_ratio_min'))}x); cosine to "
                       f"fp32 {x['cosine']:.5f} ({'at least' if x['ok'] else 'BELOW'} {MIN_COSINE}).")
        bad = [x for x in ok if not x["ok"]]
        if bad:
            out.append(f"- {r['name']}: outputs off by more than {TOL:g}: "
                       + ", ".join(f"{x['backend']} ({x['rel_diff']:.1e})" for x in bad) + ".")
        skewed = [x for x in timed if x.get("latency_ratio_min")
                  and abs(x["latency_ratio"] / x["latency_ratio_min"] - 1) > SKEW]
        if skewed:
            out.append(f"- {r['name']}: the ratio of medians and that of the fastest runs disagree for "
                       + ", ".join(f"{x['backend']} ({x['latency_ratio']:.2f} vs {x['latency_ratio_min']:.2f})"
                                   for x in skewed)
                       + ": the load changed during the run, and other work slows torch's OpenMP threads more "
                       "than XLA's pool; the fastest runs are the better estimate.")
        noisy = [x["backend"] for x in ok if x["latency"]["spread"] > NOISY]
        if r["module"]["latency"]["spread"] > NOISY:
            noisy.insert(0, "nn.Module")
        if noisy:
            out.append(f"- {r['name']}: noisy latency (spread above {NOISY:.0%}) for {', '.join(noisy)}: "
                       "other work shared the cores.")
    return out


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ok = [r for r in result["models"] if "error" not in r]
    load = [env.get("load_avg_1m_start"), env.get("load_avg_1m")]
    warm = ", ".join(f"{k} {'-' if v is None else fmt_seconds(v)}"
                     for k, v in (cfg.get("process_warmup_s") or {}).items())
    lines = [f"# Suite `{NAME}`: eager / inductor / xla, compile time and CPU latency", "",
             f"{env['date']} · torch {env['torch']} · torchvision {env.get('torchvision')} · transformers "
             f"{env.get('transformers')} · jax {env.get('jax')} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} ({env['cpu_count']} CPUs) · {cfg['threads']} torch threads · "
             f"load average {' -> '.join('-' if v is None else f'{v:.2f}' for v in load)} · "
             f"{cfg['latency_runs']} interleaved latency runs (+{cfg['latency_warmup']} warm-up), median · "
             f"{cfg['repeats']} cold compile(s) per backend · wall {result['wall_s']:.0f} s", "",
             f"Every backend lowers the graph of `{cfg['pipeline']}` (verification off). compile = "
             "`fxopt.compile` (trace, passes, lowering: inductor and xla compile inside it) plus the first call, "
             "in a fresh TorchInductor cache; backend's own = the seconds the backend's report gives "
             "(inductor: torch.compile and its first run; xla: torch.export, StableHLO, XLA). "
             f"Per-process one-offs, paid first on a tiny model and not in the table: {warm or '-'}. "
             "eager / backend above 1: the backend runs faster than the eager backend. rel diff = max |out - ref| "
             f"/ max |ref| over all outputs on a fresh batch (must be below {TOL:g}). "
             "Spread = (max - min) / median of the latency runs; the fastest runs (and their ratio) are the "
             "least disturbed by other work on a shared machine." + "".join(
                 f" `{k}`: the {v['backend']} backend after `{v['pipeline']}`, judged by the cosine of all outputs "
                 f"to the nn.Module's (at least {MIN_COSINE})." for k, v in cfg.get("variants", {}).items()), ""]
    for r in ok:
        lines += [f"## {r['name']}", "", f"{r['description']}.", "", _table(r), ""]
    return "\n".join(lines + closing_lines(NAME, findings(ok), result["models"]))


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


def _environment() -> dict:
    versions = package_versions("torchvision", "transformers", "jax", "jaxlib")
    try:
        import torch._inductor.config as inductor_config

        versions["inductor_compile_threads"] = inductor_config.compile_threads
    except ImportError:
        versions["inductor_compile_threads"] = None
    return {**environment(), **versions}


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes backends.json and backends.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, MODELS)
    p = plan(repeats, quick)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    cache_root = tempfile.mkdtemp(prefix="fxopt-bench-inductor-")
    try:
        warmup = warm_up_process(cache_root, log)
        records = bench_each(names, lambda name: bench_model(name, p, quick, cache_root, log), log)
        env = {**_environment(), "load_avg_1m_start": load_start}
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(cache_root, ignore_errors=True)
    result = {"suite": NAME, "environment": env,
              "config": {"models": list(names), "pipeline": PIPELINE, "backends": list(BACKENDS),
                         "variants": {k: {"backend": v[0], "pipeline": v[1]} for k, v in VARIANTS.items()},
                         "threads": THREADS, "shapes": {n: SHAPES[n][1 if quick else 0] for n in names},
                         "tolerance": TOL, "repeats": p.repeats, "latency_runs": p.latency_runs,
                         "latency_warmup": p.latency_warmup, "process_warmup_s": warmup, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)
