"""fxopt.runtime.pipeline, run by `fxopt pipeline-run`: split stages run on
torch.distributed.pipelining in real processes (torchrun, CPU, gloo, loopback) give the
single-process outputs and gradients."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fxopt.api import cli
from fxopt.runtime.launch import torchrun_command

MODELS = textwrap.dedent("""
    import torch.nn as nn

    def cnn():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def features():                      # 4-D output: --train uses the mean of squares
        return cnn()[:8]

    def mlp():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
""")
SHAPES = {"cnn": "8x3x8x8", "mlp": "8x16"}
OUTPUT = re.compile(r"max \|pipeline - single process\| = (\S+)")
GRADS = re.compile(r"max \|grad pipeline - grad single process\| = (\S+)")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny_models.py"
    path.write_text(MODELS)
    return str(path)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, *args: str) -> str:
    """torchrun started here, each process running the CLI (a worker, as WORLD_SIZE is set)."""
    command = torchrun_command(nproc, ["-m", "fxopt.api.cli", "pipeline-run", *args])
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("nproc, model, schedule", [
    (2, "cnn", "gpipe"), (4, "cnn", "1f1b"), (2, "mlp", "1f1b"), (4, "mlp", "gpipe")])
def test_inference_equals_one_process(models, nproc, model, schedule):
    out = _torchrun(nproc, f"{models}:{model}", "--microbatches", "4", "--input-shape", SHAPES[model],
                    "--schedule", schedule)      # default -p fold-bn
    assert float(OUTPUT.search(out).group(1)) <= 1e-5, out


@pytest.mark.parametrize("nproc, model, schedule", [(2, "cnn", "1f1b"), (4, "mlp", "gpipe")])
def test_training_step_gradients_equal_one_process(models, nproc, model, schedule):
    out = _torchrun(nproc, f"{models}:{model}", "-p", "", "--train", "--microbatches", "4",
                    "--input-shape", SHAPES[model], "--schedule", schedule)
    assert float(GRADS.search(out).group(1)) <= 1e-4, out


def test_cli_pipeline_run(models, tmp_path):
    report = tmp_path / "run.json"
    command = [sys.executable, "-m", "fxopt.api.cli", "pipeline-run", f"{models}:cnn", "--num-stages", "2",
               "--microbatches", "2", "--input-shape", "4x3x8x8", "--json", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert float(OUTPUT.search(done.stdout).group(1)) <= 1e-5
    assert '"processes": 2' in report.read_text()


def test_one_process_without_torchrun(models, tmp_path, monkeypatch, capsys):
    """No torchrun: one stage in this process, still compared and written as JSON."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    report = tmp_path / "one.json"
    assert cli.main(["pipeline-run", f"{models}:features", "--nproc-per-node", "1", "--microbatches", "2",
                     "--input-shape", "4x3x8x8", "--train", "-p", "", "--json", str(report)]) == 0
    assert float(GRADS.search(capsys.readouterr().out).group(1)) <= 1e-4
    assert '"max_abs_grad_diff"' in report.read_text()


def test_microbatches_that_do_not_divide_the_batch_are_a_clear_error(models, capsys, monkeypatch):
    args = ["pipeline-run", f"{models}:mlp", "--microbatches", "3", "--input-shape", "8x16"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(args) == 2          # refused before any process starts
    assert "--microbatches 3 does not divide the batch" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(args) == 2          # a worker refuses it too, before joining the group
    assert "--microbatches 3 does not divide the batch" in capsys.readouterr().err


def test_a_stage_count_unlike_the_process_count_is_refused_before_launching(models, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pipeline-run", f"{models}:mlp", "--num-stages", "4", "--nproc-per-node", "2",
                     "--input-shape", "8x16"]) == 2
    assert "--num-stages 4 with 2 processes: one stage per process" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_the_machine_lacks_is_a_clear_error(models, capsys, monkeypatch):
    """The runtime library's refusals are FxoptErrors: the command prints them, exit code 2."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pipeline-run", f"{models}:mlp", "--nproc-per-node", "1", "--device", "cuda",
                     "--input-shape", "8x16"]) == 2
    assert "device 'cuda' was asked for, but CUDA is not available here" in capsys.readouterr().err
