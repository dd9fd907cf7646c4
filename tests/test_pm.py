"""The pass manager: analysis caching and invalidation, PassResult, instruments,
failures that name the passes already run, the registry."""
from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxopt
from fxopt.analyses import Shapes
from fxopt.ir.graph import fetch_attr, set_attr
from fxopt.ir.meta import TENSOR
from fxopt.pm import PrintIR, Reproducer, Timing, Verify
from registered import while_testing


# ----------------------------------------------------------------------------- helpers

class Counting(fxopt.Analysis):
    """Counts how often it is computed; its result is the number of graph nodes."""

    runs = 0

    def run(self, gm, am):
        type(self).runs += 1
        return len(gm.graph.nodes)


class OtherCounting(fxopt.Analysis):
    runs = 0

    def run(self, gm, am):
        type(self).runs += 1
        return "other"


@pytest.fixture(autouse=True)
def _reset_counts():
    Counting.runs = OtherCounting.runs = 0
    SEEN.clear()
    yield


SEEN: list = []


@dataclass(frozen=True)
class UseCounting(fxopt.Pass):
    """Reads Counting (and OtherCounting), changes nothing."""

    def run(self, gm, am):
        SEEN.append((am.get(Counting), am.get(OtherCounting)))
        return fxopt.PassResult.unchanged()


@dataclass(frozen=True)
class ChangePreservingCounting(fxopt.Pass):
    """Says it changed the graph, preserves only Counting."""

    def run(self, gm, am):
        return fxopt.PassResult.changed(preserves=(Counting,))


@dataclass(frozen=True)
class ChangePreservingNothing(fxopt.Pass):
    def run(self, gm, am):
        return fxopt.PassResult.changed()


@dataclass(frozen=True)
class Boom(fxopt.Pass):
    message: str = "kaboom"

    def run(self, gm, am):
        raise RuntimeError(self.message)


@dataclass(frozen=True)
class NotAResult(fxopt.Pass):
    def run(self, gm, am):
        return True


@dataclass(frozen=True)
class DoubleRelu(fxopt.Pass):
    """Rewrites relu(x) -> relu(x) * 1 (a real change, same values)."""

    def run(self, gm, am):
        changed = False
        for node in list(gm.graph.nodes):
            if node.target is torch.ops.aten.relu.default:
                with gm.graph.inserting_after(node):
                    mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.0))
                node.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
                changed = True
        return fxopt.PassResult.changed() if changed else fxopt.PassResult.unchanged()


def _scale_first_weight(gm, factor):
    node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("weight"))
    set_attr(gm, node.target, fetch_attr(gm, node.target) * factor)


@dataclass(frozen=True)
class Perturb(fxopt.Pass):
    """Scales a weight by 1.01: not semantics-preserving, yet claims the default tolerance."""

    def run(self, gm, am):
        _scale_first_weight(gm, 1.01)
        return fxopt.PassResult.changed(preserves=(Shapes,))


@dataclass(frozen=True)
class PerturbLossy(fxopt.Pass):
    """The same rewrite, honestly declared lossy (tolerance None)."""

    tolerance = None

    def run(self, gm, am):
        _scale_first_weight(gm, 1.01)
        return fxopt.PassResult.changed(preserves=(Shapes,))


@dataclass(frozen=True)
class ShrinkLying(fxopt.Pass):
    """Drops half of a linear's output features but claims to preserve Shapes."""

    def run(self, gm, am):
        lin = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        for index in (1, 2):
            attr = lin.args[index]
            value = fetch_attr(gm, attr.target)
            set_attr(gm, attr.target, value[: value.shape[0] // 2])
        return fxopt.PassResult.changed(preserves=(Shapes,))


@dataclass(frozen=True)
class BreakLint(fxopt.Pass):
    """Makes a node use a value defined after it (a malformed graph)."""

    def run(self, gm, am):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        first, last = nodes[0], nodes[-1]
        first.update_arg(0, last)
        return fxopt.PassResult.changed()


_registered = while_testing({
    "test-pm-use": UseCounting,
    "test-pm-preserve": ChangePreservingCounting,
    "test-pm-clobber": ChangePreservingNothing,
    "test-pm-boom": Boom,
    "test-pm-not-a-result": NotAResult,
    "test-pm-double-relu": DoubleRelu,
    "test-pm-perturb": Perturb,
    "test-pm-perturb-lossy": PerturbLossy,
    "test-pm-shrink-lying": ShrinkLying,
    "test-pm-break-lint": BreakLint,
})


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + 1


def _traced():
    x = torch.randn(3, 6)
    return fxopt.trace(Small(), (x,)), (x,)


# ----------------------------------------------------------------------------- analyses

def test_analysis_is_cached_by_type():
    gm, _ = _traced()
    am = fxopt.AnalysisManager(gm)
    assert not am.cached(Counting)
    first = am.get(Counting)
    assert am.get(Counting) == first == len(gm.graph.nodes)
    assert Counting.runs == 1 and am.cached(Counting)
    am.get(OtherCounting)
    assert (Counting.runs, OtherCounting.runs) == (1, 1)


def test_analyses_survive_passes_that_preserve_them_and_no_others():
    gm, _ = _traced()
    am = fxopt.AnalysisManager(gm)
    fxopt.PassManager("test-pm-use,test-pm-use,test-pm-preserve,test-pm-use").run(gm, am)
    assert Counting.runs == 1           # preserved by test-pm-preserve
    assert OtherCounting.runs == 2      # invalidated by it
    fxopt.PassManager("test-pm-clobber,test-pm-use").run(gm, am)
    assert (Counting.runs, OtherCounting.runs) == (2, 3)
    assert len(SEEN) == 4


def test_unchanged_result_keeps_every_analysis():
    gm, _ = _traced()
    am = fxopt.AnalysisManager(gm)
    am.get(Counting)
    am.get(Shapes)
    result = fxopt.PassResult.unchanged(notes=("nothing to do",))
    assert not result.is_changed and result.preserves_all and result.notes == ("nothing to do",)
    am.invalidate(result.preserves, result.preserves_all)
    assert am.cached(Counting) and am.cached(Shapes)
    changed = fxopt.PassResult.changed(preserves=[Shapes])
    am.invalidate(changed.preserves, changed.preserves_all)
    assert am.cached(Shapes) and not am.cached(Counting)


def test_report_records_each_pass():
    gm, _ = _traced()
    report = fxopt.PassManager("test-pm-use,test-pm-clobber").run(gm)
    assert [r.name for r in report.records] == ["test-pm-use", "test-pm-clobber"]
    assert [r.changed for r in report.records] == [False, True]
    assert report.records[0].preserves is None          # unchanged: everything preserved
    assert report.records[1].preserves == ()
    assert report.pipeline == "test-pm-use,test-pm-clobber"
    table = str(report)
    assert "test-pm-use" in table and "test-pm-clobber" in table and "total" in table
    assert report.to_dict()["passes"][1]["changed"] is True


def test_compile_report_has_cost_before_and_after():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    cm = fxopt.compile(model, torch.randn(1, 3, 8, 8), pipeline="fold-bn,dce")
    fold = cm.report.records[0]
    assert fold.metrics["params_before"] == 3 * 4 * 9 + 4 + 8
    assert fold.metrics["params_after"] == 3 * 4 * 9 + 4
    assert fold.metrics["macs_before"] == fold.metrics["macs_after"] == 4 * 6 * 6 * 27
    assert "folded 1 BatchNorm" in str(cm.report)


# ----------------------------------------------------------------------------- instruments

def test_timing_collects_seconds_and_prints_a_summary():
    gm, _ = _traced()
    stream = io.StringIO()
    timing = Timing(print_summary=True, stream=stream)
    fxopt.PassManager("test-pm-use,dce", [timing]).run(gm)
    assert [t for t, _ in timing.seconds] == ["test-pm-use", "dce"]
    assert all(s >= 0 for _, s in timing.seconds)
    out = stream.getvalue()
    assert "pass timing" in out and "test-pm-use" in out and "dce" in out and "total" in out


def test_print_ir_prints_only_the_named_pass_and_only_on_change():
    gm, _ = _traced()
    stream = io.StringIO()
    fxopt.PassManager("test-pm-use,test-pm-double-relu,test-pm-double-relu,dce",
                      [PrintIR(after=["test-pm-double-relu", "test-pm-use"], stream=stream)]).run(gm)
    out = stream.getvalue()
    # test-pm-use never changes the graph; double-relu changes it every time it runs
    assert "IR after test-pm-use" not in out
    assert out.count("IR after test-pm-double-relu") == 2
    assert "dce" not in out
    assert "torch.ops.aten.mul.Tensor" in out


def test_print_ir_before():
    gm, _ = _traced()
    stream = io.StringIO()
    fxopt.PassManager("dce,test-pm-use", [PrintIR(before=["test-pm-use"], stream=stream)]).run(gm)
    out = stream.getvalue()
    assert out.count("IR before") == 1 and "IR before test-pm-use" in out
    assert "def forward" in out


def test_verify_accepts_honest_passes():
    gm, inputs = _traced()
    with torch.no_grad():
        expected = gm(*inputs)
    report = fxopt.PassManager("canonicalize,test-pm-double-relu,dce",
                               [Verify(check_outputs=True)]).run(gm, example_inputs=inputs)
    assert [r.name for r in report.records] == ["canonicalize", "test-pm-double-relu", "dce"]
    assert report.records[1].changed           # a real rewrite, so the outputs were checked
    assert torch.ops.aten.mul.Tensor in [n.target for n in gm.graph.nodes]   # and it was kept
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected)


def test_verify_on_a_training_mode_graph_is_deterministic_and_side_effect_free():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU()).train()
    x = torch.randn(16, 6)
    gm = fxopt.trace(model, (x,))
    buffers = {n: b.clone() for n, b in gm.named_buffers()}
    rng = torch.get_rng_state()
    # dropout draws masks on every run: Verify must compare like with like
    report = fxopt.PassManager("test-pm-double-relu,test-pm-double-relu",
                               [Verify(check_outputs=True)]).run(gm, example_inputs=(x,))
    assert all(r.changed for r in report.records)
    for name, b in gm.named_buffers():      # running stats not moved by the verification runs
        assert torch.equal(b, buffers[name]), name
    assert torch.equal(torch.get_rng_state(), rng)   # nor the user's random stream


def test_verify_lint_failure():
    gm, _ = _traced()
    with pytest.raises(fxopt.VerificationError, match="graph.lint failed after 'test-pm-break-lint'"):
        fxopt.PassManager("test-pm-break-lint", [Verify()]).run(gm)


def test_verify_catches_a_pass_that_lies_about_preserving_shapes():
    gm, inputs = _traced()
    with pytest.raises(fxopt.VerificationError) as info:
        fxopt.PassManager("test-pm-shrink-lying", [Verify()]).run(gm)
    text = str(info.value)
    assert "claims to preserve shapes" in text
    # where (the node) and what (from and to)
    assert "node 'fc_weight' changed from float32[4x6] to float32[2x6]" in text
    assert "what to do" in text


def test_verify_output_check_uses_the_pass_tolerance():
    gm, inputs = _traced()
    with pytest.raises(fxopt.VerificationError, match="'test-pm-perturb' changed output 0"):
        fxopt.PassManager("test-pm-perturb", [Verify(check_outputs=True)]).run(gm, example_inputs=inputs)
    gm, inputs = _traced()
    report = fxopt.PassManager("test-pm-perturb-lossy,dce", [Verify(check_outputs=True)]).run(
        gm, example_inputs=inputs)
    assert report.records[0].changed


def test_verify_compares_with_the_graph_before_each_pass_not_the_model():
    """After a lossy pass (tolerance None) the next exact pass is judged against the
    lossy graph's outputs, so it passes."""
    gm, inputs = _traced()
    fxopt.PassManager("test-pm-perturb-lossy,test-pm-double-relu",
                      [Verify(check_outputs=True)]).run(gm, example_inputs=inputs)
    gm, inputs = _traced()
    with pytest.raises(fxopt.VerificationError):
        fxopt.PassManager("test-pm-perturb-lossy,test-pm-perturb",
                          [Verify(check_outputs=True)]).run(gm, example_inputs=inputs)


def test_verify_with_explicit_example_inputs():
    gm, inputs = _traced()
    with pytest.raises(fxopt.VerificationError):
        fxopt.PassManager("test-pm-perturb", [Verify(check_outputs=True, example_inputs=inputs)]).run(gm)


def test_compile_verify_flag_and_env(monkeypatch):
    model = Small()
    x = torch.randn(3, 6)
    with pytest.raises(fxopt.VerificationError):
        fxopt.compile(model, x, pipeline="test-pm-perturb", verify=True)
    fxopt.compile(model, x, pipeline="test-pm-perturb", verify=False)
    monkeypatch.setenv("FXOPT_VERIFY", "1")
    with pytest.raises(fxopt.VerificationError):
        fxopt.compile(model, x, pipeline="test-pm-perturb")
    monkeypatch.setenv("FXOPT_VERIFY", "0")
    fxopt.compile(model, x, pipeline="test-pm-perturb")


def test_failure_names_the_passes_already_run():
    gm, _ = _traced()
    with pytest.raises(fxopt.PassFailedError) as info:
        fxopt.PassManager("test-pm-use,dce,test-pm-boom,test-pm-use").run(gm)
    text = str(info.value)
    assert "pass 'test-pm-boom' failed: RuntimeError: kaboom" in text
    assert "(#3 of 4)" in text
    assert "passes already run: test-pm-use, dce" in text
    assert "Reproducer" in text                        # what to do
    assert isinstance(info.value.__cause__, RuntimeError)


def test_fxopt_errors_from_a_pass_get_the_context_line_too():
    gm, _ = _traced()
    with pytest.raises(fxopt.VerificationError) as info:
        fxopt.PassManager("dce,test-pm-shrink-lying", [Verify()]).run(gm)
    assert "passes already run: dce" in str(info.value)


def test_a_pass_that_returns_no_pass_result():
    gm, _ = _traced()
    with pytest.raises(fxopt.PassFailedError, match="returned bool, not a PassResult") as info:
        fxopt.PassManager("test-pm-not-a-result").run(gm)
    assert "PassResult.changed" in str(info.value)


def test_reproducer_writes_the_failing_state(tmp_path):
    gm, _ = _traced()
    folder = tmp_path / "repro"
    code_before = None

    class Snapshot(fxopt.instruments.Instrument):
        def before_pass(self, ctx, p, g):
            nonlocal code_before
            code_before = g.code

    with pytest.raises(fxopt.PassFailedError):
        fxopt.PassManager('dce,test-pm-double-relu,test-pm-boom{message="bad thing"},test-pm-use',
                          [Snapshot(), Reproducer(str(folder))]).run(gm)
    files = {p.name: p.read_text() for p in folder.iterdir()}
    assert set(files) == {"graph_before.py", "pipeline.txt", "failing_pass.txt", "passes_run.txt", "error.txt"}
    assert files["graph_before.py"] == code_before           # the graph the failing pass saw
    assert "torch.ops.aten.mul.Tensor" in files["graph_before.py"]
    assert files["pipeline.txt"].strip() == 'dce,test-pm-double-relu,test-pm-boom{message="bad thing"},test-pm-use'
    assert files["failing_pass.txt"].strip() == 'test-pm-boom{message="bad thing"}'
    assert files["passes_run.txt"].split() == ["dce", "test-pm-double-relu"]
    assert "RuntimeError: bad thing" in files["error.txt"]
    # the reproducer's pipeline text parses back to what ran
    assert fxopt.format_pipeline(fxopt.parse_pipeline(files["pipeline.txt"].strip())) == files["pipeline.txt"].strip()
    # no temporary folder left behind
    assert [p.name for p in tmp_path.iterdir()] == ["repro"]


def test_reproducer_on_verification_failure_replaces_an_old_folder(tmp_path):
    folder = tmp_path / "repro"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    gm, _ = _traced()
    with pytest.raises(fxopt.VerificationError):
        fxopt.PassManager("test-pm-shrink-lying", [Verify(), Reproducer(str(folder))]).run(gm)
    names = {p.name for p in folder.iterdir()}
    assert "stale.txt" not in names and "error.txt" in names
    assert "VerificationError" in (folder / "error.txt").read_text()


def test_instrument_hook_order():
    gm, _ = _traced()
    calls = []

    class Recorder(fxopt.instruments.Instrument):
        def before_pipeline(self, ctx, g): calls.append("before_pipeline")
        def after_pipeline(self, ctx, g): calls.append("after_pipeline")
        def before_pass(self, ctx, p, g): calls.append(f"before {p.name}")
        def after_pass(self, ctx, p, g, record): calls.append(f"after {record.text}")
        def after_pass_failed(self, ctx, p, g, exc): calls.append(f"failed {p.name}: {exc}")

    fxopt.PassManager("dce,test-pm-use", [Recorder()]).run(gm)
    assert calls == ["before_pipeline", "before dce", "after dce", "before test-pm-use",
                     "after test-pm-use", "after_pipeline"]
    calls.clear()
    with pytest.raises(fxopt.FxoptError):
        fxopt.PassManager("test-pm-boom", [Recorder()]).run(gm)
    assert calls == ["before_pipeline", "before test-pm-boom", "failed test-pm-boom: kaboom"]


# ----------------------------------------------------------------------------- registry, stages

def test_register_pass_rejects_name_clashes_and_non_passes():
    with pytest.raises(fxopt.FxoptError, match="already registered"):
        @fxopt.register_pass("fold-bn")
        @dataclass(frozen=True)
        class Impostor(fxopt.Pass):
            def run(self, gm, am):
                return fxopt.PassResult.unchanged()
    assert fxopt.list_passes()["fold-bn"].__name__ == "FoldBatchNorm"
    with pytest.raises(TypeError, match="decorates a Pass subclass"):
        fxopt.register_pass("test-pm-not-a-pass")(object)


def test_list_passes_has_the_builtins_and_options_are_typed():
    passes = fxopt.list_passes()
    assert {"fold-bn", "canonicalize", "dce", "stages"} <= set(passes)
    (spec,) = passes["fold-bn"].options()
    assert (spec.key, spec.field, spec.type, spec.default) == ("eps-guard", "eps_guard", float, 0.0)
    assert passes["test-pm-boom"].name == "test-pm-boom"


def test_passes_are_frozen_and_compare_by_options():
    p = fxopt.parse_pipeline("fold-bn{eps-guard=0.5}")[0]
    assert p == fxopt.list_passes()["fold-bn"](eps_guard=0.5)
    assert p != fxopt.list_passes()["fold-bn"]()
    with pytest.raises(Exception):
        p.eps_guard = 1.0


def test_stages_runs_its_pipeline_on_every_stage():
    def staged():
        root = torch.nn.Module()
        for i in range(2):
            gm, _ = _traced()
            with gm.graph.inserting_before(next(iter(gm.graph.find_nodes(op="output")))):
                x = next(iter(gm.graph.find_nodes(op="placeholder")))
                gm.graph.call_function(torch.ops.aten.neg.default, (x,))   # dead
            gm.recompile()
            root.add_module(f"stage_{i}", gm)
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.output(tuple(graph.call_module(f"stage_{i}", (x,)) for i in range(2)))
        return fx.GraphModule(root, graph)

    top = staged()
    x = torch.randn(3, 6)
    before = top(x)
    report = fxopt.PassManager("stages(dce)").run(top)
    torch.testing.assert_close(top(x), before)
    assert report.records[0].changed
    assert report.records[0].notes == ("stage_0: dce", "stage_1: dce")
    for i in range(2):
        stage = getattr(top, f"stage_{i}")
        assert torch.ops.aten.neg.default not in {n.target for n in stage.graph.nodes}


def test_stages_without_stages_says_what_to_do():
    gm, _ = _traced()
    with pytest.raises(fxopt.UnsupportedError) as info:
        fxopt.PassManager("stages(dce)").run(gm)
    assert "no stage_0" in str(info.value) and "split" in str(info.value)


def test_meta_key_of_shapes_is_the_tensor_key():
    assert Shapes.meta_key == TENSOR


def test_compile_builds_its_timing_instrument_per_call(monkeypatch):
    """A default argument instance would be shared: its list held 3, 6, 9 entries after three compiles."""
    import fxopt.api.compiler as compiler

    made = []

    class Counted(fxopt.pm.Timing):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(compiler, "Timing", Counted)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    for _ in range(3):
        fxopt.compile(model, (torch.randn(2, 4),), pipeline="canonicalize,fold-bn,dce")
    assert len(made) == 3 and len({id(t) for t in made}) == 3
    assert [len(t.seconds) for t in made] == [3, 3, 3]
