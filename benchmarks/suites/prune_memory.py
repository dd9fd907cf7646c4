"""Peak memory of pruning, for suite `prune`: each measurement in a fresh process.

A process's resident memory only grows back slowly after a free (the allocator keeps
pages), so one model after another in one process would charge each with the last
one's leftovers. Each (model, tool, pipeline) runs in its own Python process:
run the tool once on a tiny model of the same kind (its imports and caches are not this
model's cost), build the model, collect garbage, read the resident set size (RSS), then
prune while a thread samples RSS every 5 ms; the peak minus the RSS before is what the tool cost,
stated as a multiple of the model's own weight bytes.

  fxopt default     fxopt.compile(model, example, pipeline="default"): the user's model
                    is kept (compile never mutates it), the graph shares its weights
  fxopt prune       the same with prune-channels{ratio=...}: the pruned graph's new,
                    smaller weights are the only copy
  Torch-Pruning     MetaPruner + step() on the model itself (it mutates its model in
                    place, so nothing is kept of the original: its most frugal use)

Run directly: python -m benchmarks.suites.prune_memory '{"model": ..., "tool": ..., ...}'
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch

LLAMA = "llama-1.1b"   # TinyLlama's shape: 22 layers, hidden 2048, 4.4 GB of fp32 weights


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRss:
    """The highest RSS seen while the block runs (sampled every 5 ms, and at the end)."""

    def __enter__(self):
        self.peak, self._running = rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss())


def _build(name: str, size: int):
    torch.manual_seed(0)
    if name == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                             max_position_embeddings=256, use_cache=False)
        return LlamaForCausalLM(config).eval(), (torch.randint(0, 32000, (1, 16)),)
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval(), (torch.randn(1, 3, size, size),)


def _prune(spec: dict, model, example) -> None:
    if spec["tool"] == "fxopt":
        import fxopt

        fxopt.compile(model, example, pipeline=spec["pipeline"])
        return
    from .prune import _tp_pruner

    _tp_pruner(model, example).step()


def _warm_up(spec: dict) -> None:
    """Run the tool once on a tiny model of the same kind, so what is measured next is what
    pruning this model costs, not the first import of torch.export or Torch-Pruning."""
    if spec["model"] == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, max_position_embeddings=32, use_cache=False)
        tiny, example = LlamaForCausalLM(config).eval(), (torch.randint(0, 100, (1, 8)),)
    else:
        import torchvision

        tiny, example = torchvision.models.resnet18(weights=None, num_classes=10).eval(), (torch.randn(1, 3, 32, 32),)
    _prune(spec, tiny, example)
    del tiny
    gc.collect()


def worker(spec: dict) -> dict:
    """One measurement (runs in the fresh process)."""
    torch.set_num_threads(2)
    _warm_up(spec)   # the tool's own imports and caches are not the model's cost
    model, example = _build(spec["model"], spec["size"])
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    gc.collect()
    before = rss()
    start = time.perf_counter()
    with PeakRss() as peak:
        _prune(spec, model, example)
    return {"weights_bytes": weights, "rss_before": before, "rss_peak": peak.peak,
            "extra_bytes": peak.peak - before, "extra_x_weights": (peak.peak - before) / weights,
            "seconds": time.perf_counter() - start}


def measure(model: str, tool: str, pipeline: str = "", size: int = 224, timeout: float = 1800) -> dict:
    """Run `worker` in a fresh Python process; its record, or {"error": ...}."""
    spec = {"model": model, "tool": tool, "pipeline": pipeline, "size": size}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suites.prune_memory", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1])


RUNS = ("fxopt default", "fxopt prune", "Torch-Pruning")


def bench_memory(name: str, pipeline: str, size: int, log=print) -> dict:
    """Every run of RUNS on model `name`, each in a fresh process (Torch-Pruning: only on
    the torchvision models, whose recipe suite `prune` fixes)."""
    specs = {"fxopt default": ("fxopt", "default"), "fxopt prune": ("fxopt", pipeline)}
    if name != LLAMA:
        specs["Torch-Pruning"] = ("torch-pruning", "")
    out = {}
    for run, (tool, text) in specs.items():
        out[run] = measure(name, tool, text, size)
        if "error" in out[run]:
            log(f"  memory {run}: FAILED {out[run]['error'][-200:]}")
        else:
            log(f"  memory {run}: +{out[run]['extra_bytes'] / 2**20:.0f} MiB "
                f"({out[run]['extra_x_weights']:.2f}x the weights)")
    return out


def memory_lines(records: list[dict], pipeline: str, table) -> list[str]:
    """The Markdown section: one row per model with memory records."""
    rows = []
    for r in records:
        runs = r.get("memory")
        if not runs:
            continue
        weights = next((v["weights_bytes"] for v in runs.values() if "weights_bytes" in v), None)
        cells = [_cell(runs.get(run)) for run in RUNS]
        rows.append([r["name"], f"{weights / 2**20:.0f} MiB" if weights else "n/a", *cells])
    if not rows:
        return []
    return [f"Peak memory while pruning, each run in a fresh process: RSS peak minus RSS before "
            f"(the model built), as MiB and as a multiple of the model's weight bytes. fxopt default = "
            f"`fxopt.compile(model, example)`; fxopt prune = the same with `{pipeline}`; both keep the "
            "user's model as it was. Torch-Pruning prunes the model in place (nothing of the original "
            "is kept). Goal: fxopt's extra memory at most 0.2x the weights for `default`, which holds "
            "where no pass rewrites weights (the graph shares the model's, copy-on-write); `default` "
            "runs fold-bn, whose folded conv weights are new tensors: about the conv weights again on "
            "a CNN with a BatchNorm after every conv (resnet50, efficientnet_b0). The fixed cost of "
            "the tools (imports, caches) is left out: each first prunes a tiny model of the same kind.", "",
            table(["model", "weights", *RUNS], rows, "lrrrr"), ""]


def _cell(run: dict | None) -> str:
    if run is None:
        return "n/a"
    if "error" in run:
        return "failed"
    return f"+{run['extra_bytes'] / 2**20:.0f} MiB ({run['extra_x_weights']:.2f}x)"


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
