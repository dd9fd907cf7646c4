"""CompiledModel: what a backend's lowering becomes for the user, an nn.Module like the model.

It lives with the backends (it holds a lowered module and can lower its graph again) so
that the layers above them (train, runtime, api) can take one without importing the api.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.inputs import check_inputs, guard_errors, positional, traced_inputs
from ..ir.meta import INPUT_SHAPES
from ..pm import Report
from . import get_backend

__all__ = ["CompiledModel"]


class CompiledModel(torch.nn.Module):
    """A traced, rewritten and lowered model; an nn.Module like the one it came from.

    `graph_module` is the rewritten graph, `report` what each pass did. It is called
    like the model (the same positional and keyword inputs) at any size along the
    dynamic dims it was traced with (by default the batch dim); another size of a
    static dim, or another dtype, raises InputShapeError naming the input and dim.
    """

    def __init__(self, graph_module: fx.GraphModule, lowered, report: Report,
                 backend: tuple = ("eager", {})):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self._lowered = lowered
        self.backend, self.backend_options = backend[0], dict(backend[1])

    def relower(self) -> "CompiledModel":
        """Lower `graph_module` again with the same backend (after its weights were trained),
        so every later call runs the current weights."""
        if self._lowered is not self.graph_module:
            self._lowered = get_backend(self.backend).lower(self.graph_module, traced_inputs(self.graph_module),
                                                            **self.backend_options)
        return self

    @property
    def input_shapes(self) -> tuple:
        return self.graph_module.meta.get(INPUT_SHAPES, ())

    def forward(self, *args, **kwargs):
        check_inputs(self.graph_module, args, kwargs)
        with guard_errors(self.graph_module):
            return self._lowered(*positional(self.graph_module, args, kwargs))
