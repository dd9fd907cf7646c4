"""A user's pass and backend in their own package, found through entry points; the README's
pass is a whole pass in at most 20 lines; `fxopt run file.py:ATTR` imports what sits beside it.

The plugin is installed the way pip leaves one: a module plus a `*.dist-info` folder whose
entry_points.txt lists it, on PYTHONPATH of a fresh process (entry points are read there).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

BACKEND = '''
from dataclasses import dataclass
from typing import ClassVar

import fxopt
from fxopt.backends import BackendOptions


@dataclass(frozen=True)
class TracingOptions(BackendOptions):
    """prefix: what each call prints first."""

    prefix: str = "called"
    owner_name: ClassVar[str] = "backend 'tracing'"


class TracingBackend:
    name, Options = "tracing", TracingOptions

    def lower(self, gm, example_inputs, **options):
        prefix = TracingOptions.from_kwargs(options).prefix
        return lambda *args: (print(prefix, flush=True), gm(*args))[1]

    def available(self):
        return None


fxopt.register_backend(TracingBackend())
'''


def readme_pass() -> str:
    """The first Python block of the README's "Writing a pass" section."""
    text = open(README).read()
    section = text[text.index("## Writing a pass"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the plugin package, as on a PYTHONPATH."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "capped.py").write_text(readme_pass())
    (folder / "tracing_backend.py").write_text(BACKEND)
    info = folder / "capped_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capped-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fxopt.passes]\ncap-relu = capped\n\n"
                                           "[fxopt.backends]\ntracing = tracing_backend\n")
    return folder


def _run(site, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_readme_pass_is_at_most_20_lines_of_code():
    code = [line for line in readme_pass().splitlines()
            if line.strip() and not line.strip().startswith(("#", "from ", "import "))]
    assert len(code) <= 20, "\n".join(code)
    assert "Range(" in readme_pass() and "raise" not in readme_pass()   # checked from the declaration only


def test_fxopt_passes_and_backends_find_the_plugin(site):
    passes = _run(site, "-m", "fxopt.api.cli", "passes", "cap-relu")
    assert passes.returncode == 0, passes.stderr
    assert "cap=6.0  (float in (0, inf))\n        the largest value a ReLU may output." in passes.stdout
    backends = _run(site, "-m", "fxopt.api.cli", "backends")
    assert "tracing      available\n    prefix='called'  (str)\n        what each call prints first." in backends.stdout


def test_pipeline_text_runs_the_plugin_and_checks_its_options(site, tmp_path):
    (tmp_path / "layers.py").write_text("import torch\nclass Block(torch.nn.Sequential):\n"
                                        "    def __init__(self):\n"
                                        "        super().__init__(torch.nn.Linear(4, 8), torch.nn.ReLU())\n")
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import torch
        from layers import Block          # a module beside this file

        def build():
            return torch.nn.Sequential(Block(), torch.nn.Linear(8, 2))
    """))
    done = _run(site, "-m", "fxopt.api.cli", "run", str(tmp_path / "model.py") + ":build",
                "-p", "canonicalize,cap-relu{cap=0.5}", "--input-shape", "3x4", cwd=os.path.dirname(README))
    assert done.returncode == 0, done.stderr
    assert re.search(r"cap-relu\{cap=0.5\}\s.*capped 1 ReLUs", done.stdout), done.stdout

    code = ("import torch, fxopt\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()\n"
            "x = torch.randn(16, 4) * 10\n"
            "cm = fxopt.compile(m, (x,), pipeline='canonicalize,cap-relu{cap=0.5}', backend='tracing', "
            "prefix='hello')\n"
            "y = cm(x)\n"
            "assert float(y.max()) == 0.5 and float(y.min()) == 0.0, y\n"
            "fxopt.parse_pipeline('cap-relu{cap=0}')\n")
    checked = _run(site, "-c", code)
    assert checked.stdout.strip() == "hello"
    assert "cap-relu: option 'cap' takes a finite number in (0, inf), got 0.0" in checked.stderr
    assert "column 1 of: cap-relu{cap=0}" in checked.stderr


def test_an_unknown_pass_still_says_what_is_known(site):
    done = _run(site, "-c", "import fxopt; fxopt.parse_pipeline('cap-relus')")
    assert "did you mean 'cap-relu'" in done.stderr
