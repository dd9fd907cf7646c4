"""Data parallelism for `fxopt.finetune`.

`join_world` finds this process's place: the default process group when torch.distributed is
already initialised, else the group torchrun's environment describes (WORLD_SIZE > 1 with
RANK, MASTER_ADDR and MASTER_PORT; initialised here: NCCL when the parameters are on CUDA,
on cuda:LOCAL_RANK, gloo otherwise, and destroyed by `World.leave` when finetune ends: a
process that exits with a gloo group alive can abort in the interpreter's teardown), else
one process on its own.

`Stream` reads the data as ONE sequence of batches, re-iterated by epochs, and deals them
out: global batch i goes to rank i % world. Every rank iterates the same data (the same
batches in the same order: seed any shuffling alike on every rank) and skips the batches
of the others, so a DataLoader loads them all on every rank and must not have a
DistributedSampler of its own. `Stream.position` is what a checkpoint (checkpoint.py) records
of it, with the RNG states at the start of the current epoch, so a resumed run re-creates
the epoch's iterator (a shuffling DataLoader draws the same order) and skips what was taken.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError
from .checkpoint import rng_state, set_rng_state

__all__ = ["Stream", "World", "join_world"]


@dataclass(frozen=True)
class World:
    """This process's rank among `size` data-parallel processes (size 1: no collectives)."""

    rank: int = 0
    size: int = 1
    owns_group: bool = False    # join_world initialised the process group, so leave destroys it

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def wrap(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`net` in DistributedDataParallel (which starts every rank from rank 0's weights)."""
        if not self.parallel:
            return net
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (in place)."""
        if self.parallel:
            dist.all_reduce(tensor)
            tensor /= self.size
        return tensor

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.parallel:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def leave(self) -> None:
        """Destroy the process group if join_world made it (one the caller made stays theirs)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def share_buffers(self, net: torch.nn.Module) -> None:
        """Every rank ends with rank 0's buffers (DDP broadcasts them before a forward, not after)."""
        if self.parallel:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)


def join_world(device: torch.device) -> World:
    """The World of this process; initialises the process group torchrun describes if needed."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing or not dist.is_available():
        raise TrainingError(f"finetune: WORLD_SIZE={size} but {', '.join(missing) or 'torch.distributed'} "
                              f"is missing, so the processes cannot find each other",
                              hint="launch with torchrun --nproc-per-node N, or unset WORLD_SIZE")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index != local:
            raise TrainingError(f"finetune: the model is on {device} but this process has LOCAL_RANK={local}",
                                  hint="put each rank's model (and teacher) on its own GPU: "
                                       "model.to(f'cuda:{LOCAL_RANK}')")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), owns_group=True)


class Stream:
    """The data as one endless sequence of batches; `take(n)` this rank's share of the next n."""

    def __init__(self, data, world: World):
        self.data, self.world = data, world
        self.taken = 0        # global batches taken so far (counted alike on every rank)
        self.epochs = 0       # passes over the data begun
        self.offset = 0       # batches taken from the current pass
        self.epoch_rng: dict | None = None
        self._it = None

    def take(self, count: int) -> list:
        """The next `count` global batches, keeping those with index % world == rank."""
        mine = []
        for _ in range(count):
            batch = self._next()
            if self.taken % self.world.size == self.world.rank:
                mine.append(batch)
            self.taken += 1
        return mine

    def _next(self):
        while True:
            if self._it is not None:
                try:
                    batch = next(self._it)
                except StopIteration:
                    if self.offset == 0:
                        self._empty()
                else:
                    self.offset += 1
                    return batch
            self.epoch_rng = rng_state()
            self._it, self.epochs, self.offset = iter(self.data), self.epochs + 1, 0

    def _empty(self):
        where = "" if self.taken == 0 else f" after {self.taken} batches (a one-shot iterator?)"
        raise TrainingError(f"finetune: data gave no batches{where}",
                              hint="pass a non-empty list of batches or a DataLoader")

    def position(self) -> dict:
        return {"taken": self.taken, "epochs": self.epochs, "offset": self.offset}

    def resume(self, position: dict, epoch_rng: dict | None) -> None:
        """Stand where `position` says: the current pass re-begun with the RNG it began with,
        and the batches already taken from it skipped. The caller restores the RNG of now."""
        self.taken, self.epochs, self.offset = position["taken"], position["epochs"], 0
        if not self.epochs:
            return
        if epoch_rng is not None:
            set_rng_state(epoch_rng)
        self.epoch_rng, self._it = epoch_rng, iter(self.data)
        for _ in range(position["offset"]):
            if next(self._it, _END) is _END:
                raise TrainingError(
                    f"finetune: the checkpoint stands at batch {position['offset']} of pass {self.epochs} "
                    f"over the data, but the data now has fewer batches",
                    hint="resume with the data the checkpoint was made with, or delete the checkpoint")
            self.offset += 1


_END = object()
