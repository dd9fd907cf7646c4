"""eager: run the rewritten GraphModule as it is, op by op, in PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from . import BackendOptions, register_backend


@dataclass(frozen=True)
class EagerOptions(BackendOptions):
    """The eager backend takes no options."""

    owner_name: ClassVar[str] = "backend 'eager'"


class EagerBackend:
    name = "eager"
    Options = EagerOptions

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        EagerOptions.from_kwargs(options)
        return gm

    def available(self) -> str | None:
        return None


register_backend(EagerBackend())
