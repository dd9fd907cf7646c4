"""Suite `fpga`: the integer-only int8 export (backend fpga-int8) on four models.

Models: the digits CNN (benchmarks.digits, trained here on scikit-learn's digits; real
accuracy on the 450 held-out images), a residual MLP (random weights, 32 features),
resnet18 and mobilenet_v2 (torchvision, random weights made numerically realistic by
`benchmarks.models.with_realistic_statistics`, 10 classes, 32x32 inputs). Random
models are scored by agreement with fp32 on fresh random inputs (top-1 and cosine of
the logits), as they have no task.

Per model and variant (rounding single, the default; rounding double; pow2-scales), one run:
- export time: fxopt.compile with `fold-bn,fake-quant{outputs=true}`, calibration
  (2 batches) and the artefact writing (model.json, weights, ONNX, C++);
- artefact sizes in bytes, and the g++ -O2 compile time of model.cpp;
- simulator throughput (samples / s of the numpy simulator, median of 5 after warm-up);
- the three-way check on the evaluation inputs (simulator vs C++ bit-exact; worst layer's
  share within 1 LSB of the fake-quant model on its own inputs; the share of output
  elements within 1 LSB end to end, where early 1-LSB flips have propagated);
- accuracy: fp32, the fake-quant model and the integer model (simulator).

The MiniLM table (benchmarks/fpga_transformer.py, not in --quick): the sentence encoder
exported integer-only (fake-quant{integer=true}), with its sentence-embedding fidelity.

The RTL table (benchmarks/fpga_rtl.py): the export with rtl=True, its Verilator
simulation against the simulator and its synthesis, per model and reuse factor.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torchvision

import fxopt
from fxopt.backends.fpga_int8 import simulate, verify
from fxopt.backends.fpga_int8.cpp import compile_cpp

from .. import digits, fpga_rtl, fpga_transformer
from ..fpga_models import ResidualMLP
from ..harness import choose_models, environment, markdown_table, measure, render_results, save_results
from ..models import with_realistic_statistics

NAME = "fpga"
PIPELINE = "fold-bn,fake-quant{outputs=true}"
VARIANTS = {"int8": {}, "int8 double": {"rounding": "double"}, "int8 pow2": {"pow2_scales": True}}
MODELS = ("digits_cnn", "residual_mlp", "resnet18", "mobilenet_v2")
BATCH = 64


def _random_task(model, shape, batches: int):
    """(model, calibration batches, evaluation inputs, reference labels = fp32 argmax)."""
    x = torch.randn(BATCH * batches, *shape)
    calib = [torch.randn(len(x), *shape) for _ in range(2)]     # the graph is traced at len(x) rows
    with torch.no_grad():
        return model, calib, x, model(x).argmax(1)


def build(name: str, quick: bool):
    """(fp32 model, calibration batches, evaluation inputs, labels)."""
    torch.manual_seed(0)
    if name == "digits_cnn":
        data = digits.load()
        model = digits.train(data, epochs=4 if quick else 10)
        x_train, _, x_test, y_test = data
        n = len(x_test) - len(x_test) % BATCH
        return model, [x_train[:n], x_train[n:2 * n]], x_test[:n], y_test[:n]
    if name == "residual_mlp":
        return _random_task(ResidualMLP().eval(), (32,), 2 if quick else 8)
    model = getattr(torchvision.models, name)(num_classes=10)
    model = with_realistic_statistics(model, [torch.randn(16, 3, 32, 32) for _ in range(2)])
    return _random_task(model, (3, 32, 32), 1 if quick else 4)


def _sizes(export_dir: Path) -> dict:
    sizes = {p.name: p.stat().st_size for p in export_dir.iterdir() if p.is_file()}
    sizes["weights/"] = sum(p.stat().st_size for p in (export_dir / "weights").iterdir())
    return sizes


def bench_variant(model, calib, x, labels, options: dict, workdir: Path) -> dict:
    out = workdir / "export"
    start = time.perf_counter()
    cm = fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=[(c,) for c in calib],
                       export_dir=out, verify=False, instruments=(), **options)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    compile_cpp(out, out_binary=workdir / "model")
    gxx_s = time.perf_counter() - start
    sim = measure(lambda _: simulate(out, x), repeats=5, warmup=1)
    report = verify(out, x, cm)
    logits = torch.as_tensor(sim.last)        # the simulator's outputs from the timed runs
    reference = cm._lowered.reference
    with torch.no_grad():
        fq_logits = reference(x)
        fq_logits = fq_logits[0] if isinstance(fq_logits, (tuple, list)) else fq_logits
        fp32 = model(x)
    return {"export_s": export_s, "gxx_s": gxx_s, "sizes": _sizes(out),
            "sim_samples_per_s": len(x) / sim.median, "sim_spread": sim.spread,
            "cpp_bit_exact": report.cpp_exact, "worst_layer_within_1lsb": report.within_1,
            "output_drift_within_1lsb": report.output_drift_within_1, "verify_ok": report.ok,
            "acc_fp32": float((fp32.argmax(1) == labels).float().mean()),
            "acc_fake_quant": float((fq_logits.argmax(1) == labels).float().mean()),
            "acc_int8": float((logits.argmax(1) == labels).float().mean()),
            "cosine_to_fp32": float(torch.nn.functional.cosine_similarity(logits.flatten(), fp32.flatten(), 0)),
            "pow2_cost": cm.report.fpga.pow2_cost,
            "macs": cm.report.fpga.total_macs, "on_chip_bytes": cm.report.fpga.total_weight_bytes,
            "max_accumulator_bits": cm.report.fpga.max_accumulator_bits}


def run(models=None, repeats: int | None = None, quick: bool = False, out_dir=None, log=print,
        rtl: bool = True) -> dict:
    """Run the suite; writes fpga.json and fpga.md into `out_dir` (default results/)."""
    start = time.perf_counter()
    names = choose_models(models, quick, MODELS, MODELS[:2], MODELS)
    records = []
    for name in names:
        log(f"{name} ...")
        model, calib, x, labels = build(name, quick)
        for variant, options in VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row = bench_variant(model, calib, x, labels, options, Path(tmp))
                except Exception as exc:  # noqa: BLE001 — a failing export is a result
                    row = {"error": f"{type(exc).__name__}: {exc}"}
            records.append({"model": name, "variant": variant, "inputs": len(x), **row})
            log(f"  {variant}: " + (row.get("error") or f"acc {row['acc_int8']:.4f} (fp32 {row['acc_fp32']:.4f}), "
                                    f"export {row['export_s']:.1f} s, verify ok {row['verify_ok']}"))
    result = {"suite": NAME, "environment": environment(),
              "config": {"models": list(names), "pipeline": PIPELINE, "variants": VARIANTS, "quick": quick,
                         "threads": torch.get_num_threads()},
              "models": records, "rtl": fpga_rtl.run(quick, log) if rtl else [],
              "transformer": fpga_transformer.run(log) if not quick else [],
              "wall_s": time.perf_counter() - start}
    return save_results(NAME, result, to_markdown, out_dir)


def to_markdown(result: dict) -> str:
    headers = ["model", "variant", "inputs", "acc fp32", "acc fake-quant", "acc int8 (sim)", "C++ = sim",
               "worst layer ≤1 LSB", "outputs ≤1 LSB end to end", "export s", "g++ s", "sim samples/s", "weights B", "model.cpp+weights.h B",
               "ONNX B", "acc bits"]
    rows = []
    for r in result["models"]:
        if "error" in r:
            rows.append([r["model"], r["variant"], r["inputs"], r["error"][:80]] + [""] * (len(headers) - 4))
            continue
        s = r["sizes"]
        rows.append([r["model"], r["variant"], r["inputs"], f"{r['acc_fp32']:.4f}", f"{r['acc_fake_quant']:.4f}",
                     f"{r['acc_int8']:.4f}", "yes" if r["cpp_bit_exact"] else "NO",
                     f"{r['worst_layer_within_1lsb']:.4%}", f"{r['output_drift_within_1lsb']:.2%}",
                     f"{r['export_s']:.1f}", f"{r['gxx_s']:.1f}",
                     f"{r['sim_samples_per_s']:.0f}", s["weights/"], s["model.cpp"] + s["weights.h"],
                     s["model.onnx"], r["max_accumulator_bits"]])
    env = result["environment"]
    return (f"# Suite fpga\n\n{__doc__.split(chr(10), 1)[1]}\nPipeline `{result['config']['pipeline']}`; "
            f"torch {env.get('torch')}, {env.get('cpu_model')}, {env.get('torch_threads')} threads; "
            f"wall {result['wall_s']:.0f} s. Random models' accuracy = agreement with fp32's top-1.\n\n"
            + markdown_table(headers, rows) + "\n" + fpga_transformer.markdown(result.get("transformer", []))
            + _rtl_markdown(result.get("rtl", [])))


def _rtl_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    return (f"\n## RTL\n\n{fpga_rtl.__doc__.split(chr(10), 1)[1]}\n"
            + markdown_table(fpga_rtl.HEADERS, fpga_rtl.table_rows(rows)) + "\n")


def render(out_dir=None):
    return render_results(NAME, to_markdown, out_dir)

