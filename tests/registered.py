"""Test passes that are registered only while the tests of their module run.

The pass registry is global: a pass registered when its test module is imported
would be listed by `fxopt.list_passes()` (and drawn by the pipeline property tests)
in every test that runs after it. A module turns its passes on with

    _registered = while_testing({"test-name": ThePass})

and conftest's `pass_registry` fixture puts the registry back after each test.
"""
import pytest

import fxopt


def while_testing(passes: dict[str, type]):
    """An autouse fixture registering `passes` (pipeline name -> Pass class) for each test."""

    @pytest.fixture(autouse=True)
    def registered(pass_registry):
        for name, cls in passes.items():
            fxopt.register_pass(name)(cls)
        yield

    return registered
