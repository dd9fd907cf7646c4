"""Pipeline text: parsing, formatting (defaults left out), presets, stages(...)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import fxopt
import option_kinds
from fxopt.passes.canonicalize import Canonicalize
from fxopt.passes.dce import DeadCodeElimination
from fxopt.passes.fold_bn import FoldBatchNorm
from fxopt.pm.stages import Stages
from option_kinds import OptionKinds
from registered import while_testing

_registered = while_testing({option_kinds.NAME: OptionKinds})


def test_parse_names_and_options():
    passes = fxopt.parse_pipeline("fold-bn{eps-guard=1e-6},canonicalize{functionalize=false},dce")
    assert passes == [FoldBatchNorm(eps_guard=1e-6), Canonicalize(functionalize=False), DeadCodeElimination()]


def test_kebab_case_keys_map_to_fields_and_values_are_typed():
    (p,) = fxopt.parse_pipeline(
        'test-options{num-stages=4 ratio=0.25 strict=false label="a b" layers=[fc,"conv 1"] '
        'sizes=[] norm=l2 limit=7}')
    assert p == OptionKinds(num_stages=4, ratio=0.25, strict=False, label="a b", layers=("fc", "conv 1"),
                           sizes=(), norm="l2", limit=7)
    assert isinstance(p.num_stages, int) and isinstance(p.ratio, float) and type(p.label) is str
    assert fxopt.parse_pipeline("test-options{limit=none}")[0].limit is None
    assert fxopt.parse_pipeline("test-options{ratio=3}")[0].ratio == 3.0
    # a single value where a list is expected is a one-element list
    assert fxopt.parse_pipeline("test-options{layers=fc}")[0].layers == ("fc",)


def test_whitespace_is_allowed_between_tokens():
    assert fxopt.parse_pipeline("  fold-bn { eps-guard = 0.5 } ,\n dce ") == [
        FoldBatchNorm(eps_guard=0.5), DeadCodeElimination()]


def test_empty_text_is_an_empty_pipeline():
    assert fxopt.parse_pipeline("") == [] == fxopt.parse_pipeline("   ")
    assert fxopt.format_pipeline([]) == ""


def test_format_leaves_defaults_out():
    assert fxopt.format_pipeline([FoldBatchNorm(), Canonicalize(), DeadCodeElimination()]) == \
        "fold-bn,canonicalize,dce"
    assert fxopt.format_pipeline([FoldBatchNorm(eps_guard=0.001)]) == "fold-bn{eps-guard=0.001}"
    assert fxopt.format_pipeline([OptionKinds(num_stages=3, label="a b", layers=("x", "y,z"))]) == \
        'test-options{num-stages=3 label="a b" layers=[x,"y,z"]}'


def test_format_accepts_text_and_round_trips():
    text = 'test-options{ratio=0.1 label="none" sizes=[3] limit=none},stages(dce,fold-bn)'
    assert fxopt.format_pipeline(text) == 'test-options{ratio=0.1 label="none" sizes=[3]},stages(dce,fold-bn)'
    assert fxopt.parse_pipeline(fxopt.format_pipeline(text)) == fxopt.parse_pipeline(text)
    assert fxopt.parse_pipeline(text)[0].label == "none"     # quoted: the string, not None


def test_presets_expand():
    assert fxopt.parse_pipeline("default") == fxopt.parse_pipeline(fxopt.PRESETS["default"])
    assert fxopt.parse_pipeline("cleanup,fold-bn") == fxopt.parse_pipeline(fxopt.PRESETS["cleanup"]) + [FoldBatchNorm()]
    for name, text in fxopt.PRESETS.items():
        assert fxopt.parse_pipeline(text), name        # every preset parses


def test_stages_nests():
    (p,) = fxopt.parse_pipeline("stages(fold-bn{eps-guard=0.5},stages(dce))")
    assert p == Stages((FoldBatchNorm(eps_guard=0.5), Stages((DeadCodeElimination(),))))
    assert fxopt.format_pipeline([p]) == "stages(fold-bn{eps-guard=0.5},stages(dce))"
    assert fxopt.parse_pipeline("stages()") == [Stages(())]
    assert fxopt.format_pipeline([Stages(())]) == "stages()"


def test_a_list_of_passes_passes_through():
    passes = [FoldBatchNorm(), DeadCodeElimination()]
    assert fxopt.parse_pipeline(passes) == passes
    assert fxopt.parse_pipeline(tuple(passes)) == passes


def test_a_list_with_something_else_is_an_option_error():
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline([FoldBatchNorm(), "dce"])
    assert "got str" in str(info.value) and "what to do" in str(info.value)


def test_pass_manager_accepts_text_or_passes():
    assert fxopt.PassManager("fold-bn,dce").passes == fxopt.PassManager([FoldBatchNorm(), DeadCodeElimination()]).passes


def test_option_of_a_pass_with_no_options():
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline("dce{aggressive=true}")
    text = str(info.value)
    assert "pass 'dce' has no option 'aggressive'" in text and "its options are: none" in text


def test_literal_option_rejects_other_choices():
    with pytest.raises(fxopt.PassOptionError) as info:
        fxopt.parse_pipeline("test-options{norm=l3}")
    text = str(info.value)
    assert "takes l1|l2|none, got 'l3'" in text
    assert "column 19" in text
    assert "norm=l1" in text          # what to write instead


def test_list_option_rejects_bad_items():
    with pytest.raises(fxopt.PassOptionError, match=r"takes list\[int\], got \['1', 'x'\]"):
        fxopt.parse_pipeline("test-options{sizes=[1,x]}")


@pytest.mark.parametrize("text, column, fragment", [
    ("fold-bn,,dce", 9, "expected a pass name, found ','"),
    ("fold-bn dce", 9, "unexpected 'd'"),
    ("fold-bn{eps-guard}", 18, "expected '=', found '}'"),
    ("fold-bn{eps-guard=1", 20, "unclosed '{'"),
    ('test-options{label="abc}', 20, "unterminated string"),
    ("test-options{sizes=[1 2]}", 23, "expected ',' or ']' in a list"),
    ("stages(dce", 11, "expected ')', found end of text"),
    ("dce)", 4, "unexpected ')'"),
    (",dce", 1, "expected a pass name, found ','"),
])
def test_syntax_errors_show_the_column(text, column, fragment):
    with pytest.raises(fxopt.PipelineSyntaxError) as info:
        fxopt.parse_pipeline(text)
    err = info.value
    assert err.column == column and err.text == text
    message = str(err)
    assert fragment in message
    assert f"at column {column}" in message
    # the text is shown with a caret under the column
    lines = message.splitlines()
    shown = next(i for i, line in enumerate(lines) if line.strip() == text.strip() and line.endswith(text))
    caret_line = lines[shown + 1]
    assert caret_line.index("^") - lines[shown].index(text) == column - 1
    assert "what to do:" in message


def test_an_option_called_name_is_rejected_at_registration():
    with pytest.raises(fxopt.FxoptError) as info:
        @fxopt.register_pass("test-pipeline-name-clash")
        @dataclass(frozen=True)
        class Clash(fxopt.Pass):
            name: str = "x"

            def run(self, gm, am):
                return fxopt.PassResult.unchanged()
    assert "option field called 'name'" in str(info.value) and "rename" in str(info.value)
    assert "test-pipeline-name-clash" not in fxopt.list_passes()
