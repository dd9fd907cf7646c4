"""Bad input: each error has the right type and says what was wrong, where, and what to do."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fxopt
import nets
from nets import Gate, Gated

HERE = os.path.abspath(__file__)
NETS = os.path.abspath(nets.__file__)


def _what_where_todo(err: fxopt.FxoptError) -> str:
    text = str(err)
    assert err.message and text.startswith(err.message)
    assert err.where, f"no 'where' in: {text}"
    assert "  where: " in text
    assert err.hint and "  what to do: " in text
    return text


def test_every_error_is_an_fxopt_error():
    for cls in (fxopt.TraceError, fxopt.PipelineSyntaxError, fxopt.UnknownPassError,
                fxopt.PassOptionError, fxopt.VerificationError, fxopt.UnsupportedError,
                fxopt.InputShapeError, fxopt.PassFailedError):
        assert issubclass(cls, fxopt.FxoptError)
    # and the natural builtin bases, so generic handlers work too
    assert issubclass(fxopt.UnknownPassError, KeyError)
    assert issubclass(fxopt.PassOptionError, ValueError)
    assert issubclass(fxopt.InputShapeError, ValueError)


# ----------------------------------------------------------------------------- pipeline text

@pytest.mark.parametrize("typo, suggestion", [("fold-bm", "fold-bn"), ("canonicalise", "canonicalize"),
                                              ("dec", "dce"), ("defualt", "default")])
def test_unknown_pass_suggests_the_nearest_names(typo, suggestion):
    with pytest.raises(fxopt.UnknownPassError) as info:
        fxopt.parse_pipeline(f"fold-bn,{typo}")
    text = _what_where_todo(info.value)
    assert f"unknown pass '{typo}'" in text
    assert "at column 9" in text                          # where
    assert f"did you mean '{suggestion}'" in text         # what to do
    assert "fxopt passes" in text
    # KeyError's str() would quote the message; ours stays readable
    assert not text.startswith('"')


def test_unknown_pass_with_nothing_near():
    with pytest.raises(fxopt.UnknownPassError) as info:
        fxopt.parse_pipeline("zzzzzzzzz")
    text = _what_where_todo(info.value)
    assert "did you mean" not in text and "`fxopt passes` lists every pass" in text


def test_unknown_pass_from_compile():
    with pytest.raises(fxopt.UnknownPassError, match="did you mean 'fold-bn'"):
        fxopt.compile(nn.ReLU(), torch.randn(2), pipeline="fold-bm")


def test_unknown_option():
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline("dce,fold-bn{eps-gard=1e-5}")
    text = _what_where_todo(info.value)
    assert "pass 'fold-bn' has no option 'eps-gard'" in text     # what
    assert "column 13" in text                                   # where
    assert "did you mean 'eps-guard'" in text                    # what to do
    assert "eps-guard: float" in text                            # ... and what there is


@pytest.mark.parametrize("text, column, typename, got", [
    ("fold-bn{eps-guard=abc}", 19, "float", "'abc'"),
    ("fold-bn{eps-guard=[1,2]}", 19, "float", "['1', '2']"),
    ("canonicalize{functionalize=yes}", 28, "bool", "'yes'"),
])
def test_option_of_the_wrong_type(text, column, typename, got):
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline(text)
    message = _what_where_todo(info.value)
    key = text.split("{")[1].split("=")[0]
    assert f"option '{key}' of pass '{text.split('{')[0]}' takes {typename}, got {got}" in message
    assert f"column {column}" in message
    assert f"write e.g. {key}=" in message


def test_syntax_error_shows_the_column():
    text = "fold-bn{eps-guard=1e-5,dce"
    with pytest.raises(fxopt.PipelineSyntaxError) as info:
        fxopt.parse_pipeline(text)
    err = info.value
    message = _what_where_todo(err)
    assert err.column == 23
    assert "at column 23" in message
    assert f"    {text}\n    {' ' * 22}^" in message
    assert "expected an option name, found ','" in message or "found ','" in message


@dataclass(frozen=True)
class _Ratio(fxopt.Pass):
    ratio: float = 0.5

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")

    def run(self, gm, am):
        return fxopt.PassResult.unchanged()


def test_a_pass_validating_its_options_gives_an_option_error_with_the_column():
    fxopt.register_pass("test-errors-ratio")(_Ratio)      # until the test ends (conftest)
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline("dce,test-errors-ratio{ratio=1.5}")
    text = str(info.value)
    assert "invalid options for 'test-errors-ratio': ratio must be in [0, 1), got 1.5" in text
    assert "column 5" in text


# ----------------------------------------------------------------------------- tracing

def test_non_module_model():
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(lambda x: x + 1, (torch.randn(2),))
    text = str(info.value)
    assert "expected a torch.nn.Module, got function" in text
    assert "wrap a plain function in an nn.Module" in text
    with pytest.raises(fxopt.TraceError, match="got str"):
        fxopt.compile("resnet18", torch.randn(1, 3, 8, 8))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h)


def test_example_inputs_of_the_wrong_shape():
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(TwoLayers(), (torch.randn(3, 5),))
    text = _what_where_todo(info.value)
    assert "does not run on the example inputs (float32[3x5])" in text       # what
    assert "RuntimeError: " in text                                          # the op's own complaint
    assert HERE in text and "h = self.fc1(x)" in text                        # where: the user's line
    assert "module TwoLayers" in text
    assert "shape and dtype the model's forward expects" in text             # what to do


def test_value_dependent_control_flow(capfd):
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(Gated(), (torch.randn(2, 4),))
    text = _what_where_todo(info.value)
    assert "cannot trace Gated: value-dependent control flow" in text     # what
    assert "module Gate 'gate'" in text                                   # where: the module...
    assert f"{NETS}:" in text and "if x.sum() > 0:" in text               # ... and the source line
    assert "leaf_modules" in text and "concrete_args" in text             # what to do
    # torch.export's partial-graph dump is not sprayed over stderr
    assert "def forward" not in capfd.readouterr().err


def test_value_dependent_control_flow_remedy_works():
    model = Gated()
    x = torch.randn(2, 4)
    gm = fxopt.trace(model, (x,), leaf_modules=(Gate,))
    torch.testing.assert_close(gm(x), model(x))
    gm = fxopt.trace(model, (x,), leaf_modules=("gate",))
    torch.testing.assert_close(gm(-x), model(-x))


def test_value_dependent_control_flow_in_the_root_module():
    class Root(nn.Module):
        def forward(self, x):
            return x * 2 if x.max() > 1 else x

    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(Root(), (torch.randn(3),))
    text = _what_where_todo(info.value)
    assert "module Root" in text and "x.max() > 1" in text


# ----------------------------------------------------------------------------- compiled models

def test_calling_with_other_shapes():
    model = TwoLayers()
    cm = fxopt.compile(model, (torch.randn(3, 8),))
    assert cm(torch.randn(5, 8)).shape[0] == 5   # the batch varies
    with pytest.raises(fxopt.InputShapeError) as info:
        cm(torch.randn(5, 7))
    text = _what_where_todo(info.value)
    assert "called with x: float32[5x7] but compiled for float32[*x8]: dim 1 is static (8) and got 7" in text
    assert "where: input 'x'" in text and "dynamic_shapes=" in text
    with pytest.raises(fxopt.InputShapeError, match="2 inputs given, 1 expected"):
        cm(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(fxopt.InputShapeError, match="int64"):
        cm(torch.ones(3, 8, dtype=torch.int64))
    static = fxopt.compile(model, (torch.randn(3, 8),), dynamic_shapes="static")
    with pytest.raises(fxopt.InputShapeError, match=r"dim 0 is static \(3\) and got 5"):
        static(torch.randn(5, 8))


def test_on_new_shape_is_gone_and_says_what_replaced_it():
    with pytest.raises(fxopt.UnsupportedError, match="on_new_shape was removed") as info:
        fxopt.compile(nn.ReLU(), torch.randn(2), on_new_shape="retrace")
    assert "dynamic_shapes" in str(info.value)


def test_unknown_backend():
    with pytest.raises(fxopt.UnsupportedError) as info:
        fxopt.compile(nn.ReLU(), torch.randn(2), backend="eagr")
    assert "unknown backend 'eagr'" in str(info.value) and "did you mean 'eager'" in str(info.value)


def test_eager_backend_rejects_options():
    with pytest.raises(fxopt.UnsupportedError, match="takes no options"):
        fxopt.compile(nn.ReLU(), torch.randn(2), export_dir="/tmp/x")


def test_training_mode_batchnorm_is_kept_and_the_note_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cm = fxopt.compile(model, torch.randn(2, 3, 6, 6), pipeline="fold-bn")
    assert not cm.report.records[0].changed
    assert any("training mode" in n and "model.eval()" in n for n in cm.report.records[0].notes)
