"""Starting processes for a multi-process run on this machine, and joining their process group.

`torchrun_command(n, program)` is the command that starts `n` copies of `program` under
torchrun (loopback, a free port); each copy calls `join_process_group(device)`, which joins
the group torchrun's environment describes, or makes a group of one when there is no torchrun
(WORLD_SIZE unset), so the same code runs in one process or many.
"""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

from ..errors import UnsupportedError


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for torchrun's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, program: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine (loopback, a free port) starting `nproc`
    processes of `program` (e.g. ["-m", "fxopt.api.cli", "pipeline-run", ...] or [script, ...])."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *program]


def join_process_group(device: str) -> torch.device:
    """Initialise the default process group and return this process's device: NCCL and the
    LOCAL_RANK-th GPU for "cuda", gloo and the CPU for "cpu". Under torchrun (WORLD_SIZE set)
    the group is torchrun's; without it, a group of one in this process."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError("device 'cuda' was asked for, but CUDA is not available here",
                                   hint="run on the CPU (device 'cpu'), or on a machine with a GPU")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend, dev = "nccl", torch.device("cuda", local)
    else:
        backend, dev = "gloo", torch.device("cpu")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    else:   # one process, no torchrun
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dev
