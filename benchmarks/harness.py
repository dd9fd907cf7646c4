"""Timing helpers and result writers shared by every benchmark suite.

- `measure(fn, repeats=5, warmup=1, setup=None)`: runs `setup()` (untimed) and then
  `fn(state)` (timed with perf_counter) `repeats` times after `warmup` untimed
  runs; returns a `Measurement` with the median, min/max and spread.
- `environment()`: torch / Python version, CPU model, thread count, date — recorded
  in every results file so numbers are never compared across machines blindly.
- `write_json` / `write_text`: write to a temporary name in the same folder, then
  rename, so a killed run never leaves half a results file.
- `markdown_table`, `loglog_slope`: formatting and the linearity fit.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from fxopt.util.files import write_atomically

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """Wall-clock samples of one timed operation, in seconds."""

    samples: list[float] = field(default_factory=list)
    warmup: int = 0
    last: Any = field(default=None, repr=False, compare=False)  # what the last run returned

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the samples lie within 5% of each other."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max,
                "stdev_s": self.stdev, "spread": self.spread, "repeats": self.repeats,
                "warmup": self.warmup, "samples_s": list(self.samples)}


def measure(fn: Callable[[Any], Any], repeats: int = 5, warmup: int = 1,
            setup: Callable[[], Any] | None = None) -> Measurement:
    """Time `fn(state)`; `state = setup()` is made fresh, untimed, before every run.

    The garbage collector runs (untimed) before each sample and stays enabled while
    timing: collections the measured code triggers are part of its cost. What the
    last run returned is kept on `.last`; earlier results are freed untimed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result = Measurement(warmup=warmup)
    total = warmup + repeats
    for i in range(total):
        state = setup() if setup is not None else None
        gc.collect()
        start = time.perf_counter()
        value = fn(state)
        elapsed = time.perf_counter() - start
        if i == total - 1:
            result.last = value
        del state, value
        if i >= warmup:
            result.samples.append(elapsed)
    return result


def interleaved(stages: dict, runs: int, warmup: int) -> dict[str, Measurement]:
    """Time every stage `(fn, setup)` once per round, the order rotating each round.

    On a shared machine the load drifts; round-robin puts every stage under the same
    drift, so ratios between stages stay fair. `setup()` (untimed) makes fn's state.
    """
    names = list(stages)
    out = {n: Measurement(warmup=warmup) for n in names}
    for i in range(warmup + runs):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            fn, setup = stages[n]
            state = setup() if setup is not None else None
            gc.collect()
            start = time.perf_counter()
            fn(state)
            elapsed = time.perf_counter() - start
            del state
            if i >= warmup:
                out[n].samples.append(elapsed)
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's best guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What the numbers were measured on."""
    import torch

    import fxopt

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "fxopt": fxopt.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the box
        "argv": list(sys.argv),
    }


def package_versions(*packages: str) -> dict:
    """{package: __version__ or None when it is not installed}, for a suite's environment."""
    versions = {}
    for package in packages:
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return versions


def choose_models(models, quick: bool, default: tuple, quick_default: tuple, known) -> tuple:
    """The models a suite runs: those asked for, else its (quick) default; a typo fails before any timing."""
    names = tuple(models) if models else (quick_default if quick else default)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown model {unknown[0]!r}; known: {', '.join(known)}")
    return names


def bench_each(names, bench, log) -> list[dict]:
    """`bench(name)` per model, in order; a model that fails is a result (its error), not the end of the run."""
    records = []
    for name in names:
        log(f"{name} ...")
        try:
            records.append(bench(name))
        except Exception as exc:  # noqa: BLE001
            log(f"  FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            records.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    return records


def closing_lines(suite: str, notes: list[str], models: list[dict]) -> list[str]:
    """The end of a suite's Markdown: findings, the models that failed, how to rerun."""
    notes = notes + [f"- {r['name']}: not measured: `{r['error'][:300]}`" for r in models if "error" in r]
    lines = ["## Findings", ""] + notes + [""] if notes else []
    return lines + [f"Method: `python -m benchmarks --suite {suite}`; see benchmarks/suites/{suite}.py."]


def _atomic_write(path: Path, text: str) -> Path:
    return Path(write_atomically(path, text))


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON via a temporary file and a rename."""
    return _atomic_write(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write `text` via a temporary file and a rename."""
    return _atomic_write(path, text if text.endswith("\n") else text + "\n")


def _jsonable(value):
    if isinstance(value, Measurement):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one char per column ('l' or 'r', default 'l')."""
    align = align or "l" * len(headers)
    cells = [[str(c) for c in row] for row in rows]
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 1 is linear, 2 quadratic."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def fmt_seconds(s: float) -> str:
    """Seconds with three significant figures, in s / ms / µs."""
    if s >= 1:
        return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def save_results(name: str, result: dict, to_markdown, out_dir=None) -> dict:
    """Write `<name>.json` and `<name>.md` (atomically) into `out_dir` (default
    results/); records their paths in result["files"] and returns `result`."""
    out = RESULTS_DIR if out_dir is None else Path(out_dir)
    result["files"] = {"json": str(write_json(out / f"{name}.json", result)),
                       "markdown": str(write_text(out / f"{name}.md", to_markdown(result)))}
    return result


def render_results(name: str, to_markdown, out_dir=None) -> Path:
    """Rewrite `<name>.md` from `<name>.json` (after a change to the Markdown layout)."""
    out = RESULTS_DIR if out_dir is None else Path(out_dir)
    result = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    return write_text(out / f"{name}.md", to_markdown(result))
