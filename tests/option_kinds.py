"""A pass with one option of every kind the pipeline text supports (it does nothing).

The parser, formatter and their round-trip property tests all use it, registered as
`test-options` while they run (see registered.py).
"""
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import fxopt
from fxopt.pm.options import Range

NAME = "test-options"


@dataclass(frozen=True)
class OptionKinds(fxopt.Pass):
    """Every option kind, with defaults a round trip must leave out."""

    num_stages: int = 2                                      # kebab-case key: num-stages
    ratio: Annotated[float, Range(finite=False)] = 0.5       # inf round-trips too
    strict: bool = True
    label: str = "x"
    maybe: Optional[str] = None
    layers: tuple[str, ...] = ()
    sizes: tuple[int, ...] = (1, 2)
    scales: tuple[Annotated[float, Range(finite=False)], ...] = ()
    norm: Literal["l1", "l2", "none"] = "l1"                 # "none" the string, not None
    either: int | str = 0
    limit: Optional[int] = None

    def run(self, gm, am):
        return fxopt.PassResult.unchanged()
