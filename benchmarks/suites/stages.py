"""Suite `stages`: throughput of a CPU pipeline (split-stages on 2 and 4 processes) vs one process.

Per model, the same global batch and the same weights and inputs (seeded) three ways, each in
fresh processes this suite starts (so the suite's own threads do not interfere):

  1 process    the compiled graph (`fxopt.compile(model, (batch,), pipeline="")`, eager
               backend) on the whole batch, with as many torch threads as this machine has
               cores (os.sched_getaffinity): the reference for throughput and outputs; and
               again on 1 thread (what one pipeline rank gets);
  2, 4 procs   `split-stages{num-stages=P}` compiled on ONE microbatch, run by
               `fxopt.runtime.pipeline` (build_stage, make_schedule, run_inference: GPipe on
               torch.distributed.pipelining) under torchrun on this machine (gloo over loopback),
               the batch split into the model's microbatches; threads per process =
               max(1, cores // P), so the total equals the core count where it can. With 2 cores,
               4 processes of 1 thread are 2x oversubscribed: reported, not hidden.

Timing is steady state inside the workers (`python -m benchmarks.suites.stages --worker ...`):
process start-up, compile and `warmup` untimed steps are excluded; then `steps` steps are timed
between two barriers on every rank (throughput = steps x batch / that time), and each step's
wall time is taken on the last rank (where the output lands; median and spread). Each rank also
sums the wall time its stage's forward runs ("busy"): the rest of a step is waiting for
activations, gloo sends / receives and the schedule (time descheduled mid-forward counts as busy). Rank 0 writes JSON to a temporary file the suite reads.
Every pipeline's output is checked against the 1-process output (max |diff| <= 1e-5); the
compiled graph against the eager nn.Module. Per split: report.stages (cost = MACs, parameters,
bytes each stage sends across its cut, per microbatch) and the process wall time (start-up and
compile included) for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..harness import (bench_each, choose_models, closing_lines, environment, markdown_table, render_results,
                       save_results)

NAME = "stages"
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
PROCESSES = (2, 4)          # the pipelines
SCHEDULE = "gpipe"
# name -> how to build it, the global batch and the microbatches (same for the 2- and 4-process runs)
MODELS = {
    "transformer-24": {"kind": "transformer", "layers": 24, "d_model": 256, "heads": 4, "seq": 128,
                       "batch": 8, "microbatches": 4,
                       "about": "nn.TransformerEncoder, 24 layers, d_model 256, 4 heads, ff 2048, seq 128"},
    "mlp-wide": {"kind": "mlp", "layers": 16, "width": 2048, "batch": 512, "microbatches": 4,
                 "about": "16 x (Linear 2048->2048, GELU)"},
    "transformer-tiny": {"kind": "transformer", "layers": 4, "d_model": 64, "heads": 4, "seq": 16,
                         "batch": 8, "microbatches": 4,
                         "about": "nn.TransformerEncoder, 4 layers, d_model 64, 4 heads, ff 2048, seq 16"},
}
DEFAULT_MODELS = ("transformer-24", "mlp-wide")
QUICK_MODELS = ("transformer-tiny",)
TIMEOUT_S = 1200       # one worker launch (torchrun included)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for(processes: int, n_cores: int) -> int:
    return max(1, n_cores // processes)


def configurations(n_cores: int) -> list[tuple[int, int]]:
    """(processes, threads each): 1 process on every core (the reference), 1 process on 1 thread
    (what one pipeline rank gets), then the pipelines."""
    single = [(1, n_cores)] + ([(1, 1)] if n_cores > 1 else [])
    return single + [(p, threads_for(p, n_cores)) for p in PROCESSES]


# ---- the worker (runs in the processes the suite starts) ------------------------------------

def build(name: str, seed: int = 0):
    """(model in eval mode, the whole batch) for MODELS[name]; the same in every process."""
    spec = MODELS[name]
    if spec["kind"] == "transformer":
        from ..models import transformer_encoder
        model, _ = transformer_encoder(spec["layers"], spec["d_model"], spec["heads"], spec["seq"])
        shape = (spec["batch"], spec["seq"], spec["d_model"])
    else:
        torch.manual_seed(0)
        layers = []
        for _ in range(spec["layers"]):
            layers += [torch.nn.Linear(spec["width"], spec["width"]), torch.nn.GELU()]
        model, shape = torch.nn.Sequential(*layers).eval(), (spec["batch"], spec["width"])
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _busy_timer(module, busy: list):
    """Accumulate the wall time of module's forwards into busy[0]."""
    started = []
    module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

    def done(*_):
        busy[0] += time.perf_counter() - started.pop()
    module.register_forward_hook(done)


def worker(argv=None) -> int:
    import torch.distributed as dist

    import fxopt
    from fxopt.runtime.pipeline import build_stage, make_schedule, run_inference

    p = argparse.ArgumentParser(prog="python -m benchmarks.suites.stages --worker")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", help="1 process: write the output here; pipeline: compare with it")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model, x = build(args.model, args.seed)
    micro = MODELS[args.model]["microbatches"] if world > 1 else 1
    example = (x[:len(x) // micro].clone(),)
    text = f"split-stages{{num-stages={world}}}" if world > 1 else ""
    start = time.perf_counter()
    cm = fxopt.compile(model, example, pipeline=text, instruments=(), dynamic_shapes="static")
    compile_s = time.perf_counter() - start
    busy = [0.0]
    if world == 1:
        _busy_timer(cm, busy)
        step = lambda: cm(x)  # noqa: E731
        barrier = lambda: None  # noqa: E731
    else:
        dist.init_process_group("gloo")
        stage = build_stage(cm.graph_module, rank, world, torch.device("cpu"), example)
        _busy_timer(stage.submod, busy)
        schedule = make_schedule(stage, SCHEDULE, micro)
        step = lambda: run_inference(schedule, stage, (x,))  # noqa: E731
        barrier = dist.barrier
    try:
        with torch.no_grad():
            for _ in range(args.warmup):
                out = step()
            barrier()
            busy[0], ends = 0.0, []
            start = time.perf_counter()
            for _ in range(args.steps):
                out = step()
                ends.append(time.perf_counter())
            barrier()
            total = time.perf_counter() - start
            mine = {"rank": rank, "busy_s": busy[0], "step_s": [b - a for a, b in zip([start] + ends, ends)],
                    "total_s": total, "max_abs_diff": None}
            if world == 1:
                mine["max_abs_diff_vs_eager"] = float((model(x) - out).abs().max())
            if rank == world - 1 and Path(args.reference).exists():
                reference = torch.load(args.reference)
                if reference.shape != out.shape:
                    raise RuntimeError(f"output shape {tuple(out.shape)}, 1 process {tuple(reference.shape)}")
                mine["max_abs_diff"] = float((reference - out).abs().max())
            elif rank == world - 1:     # the first run (1 process, every core) is the reference
                torch.save(out, args.reference)
        gathered = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if rank == 0:
            last = gathered[-1]
            summary = {"processes": world, "threads": args.threads, "microbatches": micro, "batch": len(x),
                       "steps": args.steps, "warmup": args.warmup, "compile_s": compile_s,
                       "total_s": max(g["total_s"] for g in gathered), "step_s": last["step_s"],
                       "busy_s": [g["busy_s"] for g in gathered], "max_abs_diff": last["max_abs_diff"],
                       "max_abs_diff_vs_eager": last.get("max_abs_diff_vs_eager"),
                       "stages": cm.report.stages.to_dict() if world > 1 else None}
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ---- the suite ---------------------------------------------------------------------------------

def _launch(name: str, processes: int, threads: int, steps: int, warmup: int, tmp: Path) -> dict:
    from fxopt.runtime.launch import torchrun_command

    out = tmp / f"p{processes}t{threads}.json"
    args = ["-m", "benchmarks.suites.stages", "--worker", "--model", name, "--threads", str(threads),
            "--steps", str(steps), "--warmup", str(warmup), "--reference", str(tmp / "reference.pt"),
            "--json", str(out)]
    command = [sys.executable, *args] if processes == 1 else torchrun_command(processes, args)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{processes} process(es) exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    return {**json.loads(out.read_text()), "process_wall_s": wall}


def _row(r: dict, n_cores: int) -> dict:
    steps = r["step_s"]
    median = statistics.median(steps)
    stages = r["stages"]
    return {**r, "total_threads": r["processes"] * r["threads"],
            "oversubscription": r["processes"] * r["threads"] / n_cores,
            "samples_per_s": r["steps"] * r["batch"] / r["total_s"], "step_median_s": median,
            "step_spread": (max(steps) - min(steps)) / median if median else 0.0,
            "busy_share": [b / r["total_s"] for b in r["busy_s"]],
            "stage_macs": [s["macs"] for s in stages["stages"]] if stages else None,
            "sends_bytes_per_cut": [s["sends"] for s in stages["stages"][:-1]] if stages else None,
            "outputs_match": r["max_abs_diff"] is None or r["max_abs_diff"] <= TOLERANCE}


def bench_model(name: str, steps: int, warmup: int, n_cores: int, log) -> dict:
    spec = MODELS[name]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fxopt-stages-") as tmp:
        for processes, threads in configurations(n_cores):
            try:
                row = _row(_launch(name, processes, threads, steps, warmup, Path(tmp)), n_cores)
            except Exception as exc:  # noqa: BLE001 — a failing configuration is a result
                if not runs:
                    raise
                row = {"processes": processes, "threads": threads, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                log(f"  {processes} processes: FAILED {row['error'][:300]}")
                runs.append(row)
                continue
            runs.append(row)
            log(f"  {processes} process(es) x {threads} thread(s): {row['samples_per_s']:.3g} samples/s, "
                f"step {row['step_median_s']:.3f} s, max |diff| {row['max_abs_diff']}")
    single = runs[0]["samples_per_s"]
    for row in runs:
        if "error" not in row:
            row["ratio"] = row["samples_per_s"] / single
    return {"name": name, "about": spec["about"], "batch": spec["batch"], "microbatches": spec["microbatches"],
            "input": list(build(name)[1].shape), "runs": runs}


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print) -> dict:
    """Run the suite; writes stages.json and stages.md into `out_dir` (default results/).
    `repeats`: timed steps per configuration (default 10, quick 3)."""
    start = time.perf_counter()
    names = choose_models(models, quick, DEFAULT_MODELS, QUICK_MODELS, tuple(MODELS))
    steps, warmup, n_cores = repeats or (3 if quick else 10), 1 if quick else 2, cores()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    records = bench_each(names, lambda name: bench_model(name, steps, warmup, n_cores, log), log)
    result = {"suite": NAME, "environment": {**environment(), "load_avg_1m_start": load_start},
              "config": {"models": list(names), "cores": n_cores, "processes": list(PROCESSES),
                         "configurations": configurations(n_cores),
                         "schedule": SCHEDULE, "steps": steps, "warmup": warmup, "backend": "gloo",
                         "tolerance": TOLERANCE, "quick": quick},
              "models": records, "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)


# ---- Markdown -------------------------------------------------------------------------------

def _bytes(n: int) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _table(r: dict) -> str:
    heads = ["processes", "threads each (total)", "samples/s", "vs 1 process", "step median (spread)",
             "busy per rank", "stage MACs (per microbatch)", "sent per cut (per microbatch)", "max |diff|",
             "startup+compile+run s"]
    rows = []
    for x in r["runs"]:
        if "error" in x:
            rows.append([x["processes"], x["threads"], "failed: " + x["error"][:120]] + [""] * 7)
            continue
        over = f", {x['oversubscription']:.0f}x oversubscribed" if x["oversubscription"] > 1 else ""
        diff = (f"{x['max_abs_diff_vs_eager']:.2g} (vs eager)" if x["max_abs_diff"] is None else
                f"{x['max_abs_diff']:.2g}" + ("" if x["outputs_match"] else " **MISMATCH**"))
        rows.append([x["processes"], f"{x['threads']} ({x['total_threads']}{over})", f"{x['samples_per_s']:.3g}",
                     f"**{x['ratio']:.2f}x**", f"{x['step_median_s']:.3f} s ({x['step_spread']:.0%})",
                     " / ".join(f"{b:.0%}" for b in x["busy_share"]),
                     " / ".join(f"{m / 1e9:.3g}G" for m in x["stage_macs"]) if x["stage_macs"] else "-",
                     " / ".join(_bytes(b) for b in x["sends_bytes_per_cut"]) if x["sends_bytes_per_cut"] else "-",
                     diff, f"{x['process_wall_s']:.1f}"])
    return markdown_table(heads, rows, "rlrrrlllll")


def findings(records: list[dict], cfg: dict) -> list[str]:
    out = []
    for r in records:
        ok = [x for x in r["runs"] if "error" not in x and x["processes"] > 1]
        one = [x for x in r["runs"][1:] if "error" not in x and x["processes"] == 1]
        if one:
            out.append(f"- {r['name']}: 1 process on 1 thread runs at {one[0]['ratio']:.2f}x the 1-process "
                       f"{cfg['cores']}-thread throughput (what thread parallelism alone buys: "
                       f"{1 / one[0]['ratio']:.2f}x)."
                       + (" 1 thread beating every core means the multi-threaded run was starved: other "
                          "work on the cores (see the load average) deschedules OpenMP threads at each "
                          "parallel op's barrier." if one[0]["ratio"] > 1.2 else ""))
        if one and ok:
            out.append(f"- {r['name']}: against one 1-thread process (the same thread per rank), " + "; ".join(
                f"{x['processes']} processes run {x['ratio'] / one[0]['ratio']:.2f}x (ideal "
                f"{min(x['processes'], cfg['cores'])}x)" for x in ok) + ".")
        if ok:
            out.append(f"- {r['name']}: " + "; ".join(
                f"{x['processes']} processes {x['ratio']:.2f}x the 1-process throughput" for x in ok)
                + ("." if any(x["ratio"] > 1.05 for x in ok) else
                   ": no speed-up on this machine; one process already uses every core."))
        bad = [x["processes"] for x in ok if not x["outputs_match"]]
        if bad:
            out.append(f"- {r['name']}: pipeline outputs differ from 1 process beyond {cfg['tolerance']:g} "
                       f"with {bad} processes.")
    if cfg["cores"] < max(cfg["processes"]):
        out.append(f"- Only {cfg['cores']} cores: processes beyond {cfg['cores']} time-share them (1 thread each), "
                   "so the 4-process pipeline cannot beat the core count; it measures the pipeline's overheads "
                   "(bubble, gloo copies, scheduling) under oversubscription, not a 4-core speed-up.")
    return out


def to_markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ok = [r for r in result["models"] if "error" not in r]
    threads = ", ".join(f"{p} process(es) x {t} thread(s)" for p, t in cfg["configurations"])
    lines = [f"# Suite `{NAME}`: CPU pipeline (split-stages, 2 and 4 processes) vs 1 process", "",
             f"{env['date']} · torch {env['torch']} · Python {env['python']} · fxopt {env['fxopt']} · "
             f"{env['cpu_model']} · **{cfg['cores']} cores** · load avg at start {env.get('load_avg_1m_start')} · "
             f"wall {result['wall_s']:.0f} s", "",
             f"Configurations: {threads} (torch threads and OMP_NUM_THREADS; the pipelines' total = cores "
             "where it can). \"vs 1 process\" is against the first row (1 process, every core). "
             f"Pipelines: `split-stages{{num-stages=P}}` compiled on one microbatch, `fxopt.runtime.pipeline` "
             f"({cfg['schedule']}) under torchrun, gloo over loopback. 1 process: the compiled graph (eager "
             f"backend) on the whole batch. Steady state: {cfg['steps']} timed steps after {cfg['warmup']} "
             "warm-up, between barriers, inside the workers (start-up and compile excluded; the last column "
             "includes them). Step = one forward of the global batch. Busy = share of the timed span each rank "
             "spends in its stage's forward (the rest: waiting, gloo, schedule; wall time, so an oversubscribed "
             "rank descheduled mid-forward still counts as busy). Max |diff|: pipeline output vs "
             f"the 1-process output (must be <= {cfg['tolerance']:g}).", ""]
    for r in ok:
        lines += [f"## {r['name']}", "", f"{r['about']}; input {r['input']} (global batch {r['batch']}), "
                  f"{r['microbatches']} microbatches of {r['batch'] // r['microbatches']} in the pipelines.", "",
                  _table(r), ""]
    return "\n".join(lines + closing_lines(NAME, findings(ok, cfg), result["models"]))


def render(out_dir=None) -> Path:
    """Rewrite the .md from the .json already in `out_dir`."""
    return render_results(NAME, to_markdown, out_dir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit("usage: python -m benchmarks.suites.stages --worker ... (the suite runs via python -m benchmarks)")
