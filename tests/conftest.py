"""Shared test set-up: import fxopt from this checkout, seed torch, small hypothesis profile,
the pass registry put back after each test."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest` from the repo root without `pip install -e .`
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("fxopt", deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fxopt"))
except ImportError:  # hypothesis is a dev dependency
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def pass_registry():
    """The global pass registry, put back as it was after each test: a pass a test
    registers (see registered.py) does not leak into the tests after it. The built-in
    passes a test imported stay (their modules are imported once and register once)."""
    from fxopt.pm.pass_base import _REGISTRY

    saved = dict(_REGISTRY)
    yield _REGISTRY
    built_in = {k: v for k, v in _REGISTRY.items() if v.__module__.startswith("fxopt.")}
    _REGISTRY.clear()
    _REGISTRY.update({**saved, **built_in})


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, split once (see digits.py)."""
    pytest.importorskip("sklearn")
    import digits as data

    return data.load()


@pytest.fixture(scope="session")
def trained(digits):
    """The digits CNN, trained once per session; tests must not change it (copy first)."""
    import digits as data

    return data.train(digits)
