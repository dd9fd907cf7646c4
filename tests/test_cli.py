"""The `fxopt` command: passes, backends, run, and its errors."""
import json
import subprocess
import sys
import textwrap

import pytest

from fxopt.api.cli import main


def test_passes_lists_every_pass_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("fold-bn", "canonicalize", "dce"):
        assert f"\n{name}\n" in "\n" + out
    assert "    eps-guard=0.0  (float in [0, inf))\n        added to the variance's eps" in out
    assert "    functionalize=true  (bool)\n" in out


def test_backends_lists_every_backend_with_its_documented_options(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "eager        available\n    The eager backend takes no options." in out
    assert "    rounding='single'  (single|double)\n        single (one 64-bit multiply" in out
    assert "    reuse_factor=1  (int in [1, inf))\n" in out


def test_every_built_in_option_is_documented_once_in_its_class_docstring():
    """The docs `fxopt passes` / `fxopt backends` show come from the `field: text` lines."""
    import fxopt

    undocumented = [f"{name}.{spec.field}" for name, cls in fxopt.list_passes().items()
                    if cls.__module__.startswith("fxopt.") for spec in cls.options() if not spec.doc]
    undocumented += [f"{name}.{spec.field}" for name, backend in fxopt.list_backends().items()
                     for spec in backend.Options.options() if not spec.doc]
    assert undocumented == []


def test_passes_unknown_name_is_an_error(capsys):
    assert main(["passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_backends_lists_eager(capsys):
    assert main(["backends"]) == 0
    assert "eager" in capsys.readouterr().out


def test_run_torchvision_model_with_json_and_ir(tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    code = main(["run", "torchvision:resnet18", "-p", "default", "--input-shape", "1x3x64x64",
                 "--print-ir-after", "fold-bn", "--verify-each", "--json", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "IR after fold-bn" in out and "torch.ops.aten.conv2d" in out
    assert "folded 20 BatchNorm" in out
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["report"]["passes"]] == ["canonicalize", "fold-bn", "dce"]
    assert data["max_abs_diff"] < 1e-4
    assert data["cost"]["macs"] > 100e6
    assert not list(report.parent.glob(".tmp-*"))  # written atomically, nothing left behind


def test_run_model_from_a_file_with_a_factory(tmp_path, capsys):
    source = tmp_path / "mymodel.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    """))
    assert main(["run", f"{source}:build", "--input-shape", "2x8"]) == 0
    assert "folded 1 BatchNorm" in capsys.readouterr().out


def test_run_saves_what_it_built(tmp_path, capsys):
    import torch

    import fxopt

    assert main(["run", "torchvision:resnet18", "-p", "prune50", "--input-shape", "1x3x32x32",
                 "--save", str(tmp_path / "saved")]) == 0
    assert "saved to" in capsys.readouterr().out
    loaded = fxopt.load(tmp_path / "saved")
    assert loaded(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["run", "torchvision:resnet18", "--input-shape", "1x3x32x32",
                 "--save", str(tmp_path / "mine")]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_run_int8_calibrates_and_prints_the_quant_and_int8_sections(tmp_path, capsys):
    source = tmp_path / "cnn.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 6 * 6, 4))
    """))
    args = ["run", f"{source}:build", "-p", "fold-bn,fake-quant", "--backend", "int8",
            "--input-shape", "4x3x8x8"]
    assert main(args) == 2                       # observers never saw data: not frozen
    assert "not frozen" in capsys.readouterr().err
    assert main(args + ["--calibration-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "[quant]" in out and "quantized  linear" in out
    assert "[int8]" in out and "QConv2d x1" in out
    assert "ops without a cost model" not in out   # FakeQuantize modules are costed


def test_run_bad_pipeline_reports_column(capsys):
    assert main(["run", "torchvision:resnet18", "-p", "fold-bn{eps-guard=1e-6", "--input-shape",
                 "1x3x32x32"]) == 2
    err = capsys.readouterr().err
    assert "column" in err and "unclosed '{'" in err


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "cannot read model spec"),
    ("torchvision:not_a_model", "unknown torchvision model"),
    ("missing/file.py:build", "no such file"),
    ("os:getcwd", "not an nn.Module"),
    ("json:dumps", "zero-argument factory"),
])
def test_run_bad_model_spec(spec, message, capsys):
    assert main(["run", spec, "--input-shape", "1x3"]) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fxopt.api.cli", "passes", "dce"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dce")


def test_compress_a_model_spec_on_saved_batches(tmp_path, capsys):
    """`fxopt compress FILE:ATTR --data batches.pt`: the report, its JSON and plot, and a saved
    model that loads and runs; the batches are read with weights_only (tensors only)."""
    import json

    import torch

    import fxopt

    source = tmp_path / "net.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 4))
    """))
    torch.save([torch.randn(16, 8) for _ in range(5)], tmp_path / "batches.pt")
    code = main(["compress", f"{source}:build", "--input-shape", "16x8", "--data", str(tmp_path / "batches.pt"),
                 "--target", "macs=0.5", "--max-drop", "1", "--backend", "eager", "--steps", "5",
                 "--out", str(tmp_path / "out"), "--save", str(tmp_path / "saved")])
    assert code == 0
    assert "compress: target macs 0.5" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert report["chosen"] is not None and report["candidates"][report["chosen"]]["macs"] <= 0.51
    assert (tmp_path / "out" / "compress-front.png").is_file()
    assert fxopt.load(tmp_path / "saved")(torch.randn(3, 8)).shape == (3, 4)


def test_compress_refuses_a_bad_target_and_missing_data(capsys):
    assert main(["compress", "torchvision:resnet18", "--target", "fast=2"]) == 2
    assert "cannot read --target 'fast=2'" in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--input-shape", "1x3x32x32"]) == 2
    assert "needs --input-shape and --data" in capsys.readouterr().err
