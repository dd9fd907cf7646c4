"""eager: run the rewritten GraphModule as it is, op by op, in PyTorch."""
from __future__ import annotations

import torch.fx as fx

from ..errors import UnsupportedError
from . import register_backend


class EagerBackend:
    name = "eager"

    def lower(self, gm: fx.GraphModule, example_inputs: tuple, **options):
        if options:
            raise UnsupportedError(f"backend 'eager' takes no options, got {sorted(options)}",
                                   hint="drop the options, or pick a backend that takes them")
        return gm

    def available(self) -> str | None:
        return None


register_backend(EagerBackend())
