"""Generation over many processes (`torchrun --nproc_per_node N -m ctxdiff generate ...`, the zero-shot FID
protocol of `ctxdiff evaluate`): which jobs this process makes.

Job i goes to rank i % world. A job is a batch of one process's images, each with its own prompt, seed and file
name fixed before the split, so N ranks write exactly the files one process writes: an image depends on its
prompt, seed and settings, and in the last float bits (enough to flip a uint8 level now and then) on the other
images of its batch and on the number of CPU threads, so batches are dealt out whole (torchrun sets
OMP_NUM_THREADS=1; one process matches it with the same thread count). The rank and world size come from the process group when one is
initialized (gloo on the CPU, nccl on CUDA: `join`), else from torchrun's RANK and WORLD_SIZE variables, so the
split also works with no process group at all; then nothing waits for the other ranks (`barrier` and
`gather` need the group).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

from ctxdiff.errors import UsageError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"the environment variable {name}={value!r} is not a whole number (torchrun sets it; "
                         "unset it to run in one process)") from None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): the process group's when one is initialized, else $RANK and $WORLD_SIZE (torchrun's),
    else (0, 1). A rank outside 0 .. world - 1 is a UsageError."""
    if "torch" in sys.modules and _group_initialized():  # no torch import just to read the environment
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} with WORLD_SIZE={world}: the rank must lie in 0 .. WORLD_SIZE - 1 (launch with "
                         "torchrun, or unset both to run in one process)")
    return rank, world


def is_main() -> bool:
    """Whether this process is rank 0 (the one that prints tables and summaries)."""
    return rank_and_world()[0] == 0


def share(jobs: Sequence[T]) -> list[T]:
    """This rank's jobs: those with index i % world == rank, in their order (all of them in one process)."""
    rank, world = rank_and_world()
    return list(jobs[rank::world])


def join(device: torch.device) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1 and none is initialized: gloo on the CPU, nccl on
    CUDA, where each rank takes its own GPU (cuda:$LOCAL_RANK when `device` names no index). Returns the device
    this rank works on; in one process, `device` itself."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _env_int("LOCAL_RANK", rank) % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UsageError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with `torchrun --nproc_per_node "
                             f"{world} -m ctxdiff ...`, or unset WORLD_SIZE and RANK to run in one process")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return device


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if _group_initialized():
        import torch.distributed as dist

        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] without a process group."""
    if not _group_initialized():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank (a random seed drawn once); `value` itself without a process group."""
    if not _group_initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_in_job_order(shares: list[list[T]]) -> list[T]:
    """The inverse of `share` over the ranks: shares[r] holds rank r's results in its job order; returns them in
    the order of the jobs of one process."""
    world = len(shares)
    total = sum(len(s) for s in shares)
    return [shares[i % world][i // world] for i in range(total)]


def leave() -> None:
    """Leave the process group (at the end of a command; nothing without one)."""
    if _group_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
