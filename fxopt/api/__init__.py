"""The top layer: compile, lower, calibrate, save/load, the torch.compile entry and the CLI.

It ties the layers below together (ir, pm, analyses, passes, backends, train); nothing
below imports it.
"""
from .compiler import calibrate, compile, freeze, lower, trace
from .explain import explain
from .saving import load, save

__all__ = ["calibrate", "compile", "explain", "freeze", "load", "lower", "save", "trace"]
