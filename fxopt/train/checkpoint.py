"""Checkpoints of `fxopt.finetune`, and the RNG states they hold.

A checkpoint is one `torch.save` dict written to a temp file and renamed over the target
(fxopt.util.files.write_atomically), so a kill leaves the previous checkpoint or the new
one, never half of one; it loads with `weights_only=True`. It records every rank's RNG
states (torch, CUDA, Python, numpy) in types that load back that way, so a resumed run
continues with the random numbers the uninterrupted run would have had.
"""
from __future__ import annotations

import io
import os
import random
import sys

import torch

from ..errors import TrainingError
from ..util.files import write_atomically

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state() -> dict:
    """torch's (CPU and initialised CUDA), Python's and numpy's global RNG states, in types
    `torch.load(weights_only=True)` reads back."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state and "numpy" in sys.modules:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _tuples(value):
    """random.setstate wants tuples all the way down."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path, state: dict) -> None:
    """`state` through torch.save into `path`, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a checkpoint: say which, and what to do
        raise TrainingError(f"finetune: cannot read the checkpoint {os.fspath(path)!r}: {exc}",
                              hint="give another checkpoint path, or delete the file to start afresh") from exc
