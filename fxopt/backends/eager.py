"""eager: run the rewritten GraphModule as it is, op by op, in PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ..errors import BackendOptionError
from ..pm.options import Options
from . import register_backend


@dataclass(frozen=True)
class EagerOptions(Options):
    """The eager backend takes no options."""

    label: ClassVar[str] = "backend 'eager'"
    error: ClassVar[type] = BackendOptionError


class EagerBackend:
    name = "eager"
    Options = EagerOptions

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        EagerOptions.from_kwargs(options)
        return gm

    def available(self) -> str | None:
        return None


register_backend(EagerBackend())
