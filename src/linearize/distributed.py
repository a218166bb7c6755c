"""Many processes, as torchrun starts them: who this process is, and waiting for the others.

    torchrun --nproc-per-node 8 -m linearize run ...                 # one node
    torchrun --nnodes 3 --nproc-per-node 8 --rdzv-backend c10d \
             --rdzv-endpoint HOST:29500 -m linearize run ...         # several nodes

`init` joins the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...):
NCCL on CUDA, gloo on a CPU. Without torchrun there is one process (rank 0 of 1) and every call here is
trivial. The gradient exchange itself is PyTorch's (DDP, FSDP2), never ours; what is here is bookkeeping:
which share of the work is this rank's, a barrier, the mean of a logged number.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from linearize.errors import LinearizeError

# a rank may wait at a barrier while rank 0 evaluates a large model: far longer than torch's 30-minute default
TIMEOUT = timedelta(hours=int(os.environ.get("LINEARIZE_DIST_TIMEOUT_HOURS", "6")))


def launched() -> bool:
    """True when torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (once); a no-op for one process."""
    if not launched() or dist.is_initialized():
        return
    if not dist.is_available():
        raise LinearizeError("this PyTorch build has no torch.distributed: run one process, or install a build with it")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise LinearizeError("several processes on a CPU need torch.distributed's gloo backend, which this PyTorch "
                             "build lacks: run one process (no torchrun), or install a build with gloo")
    dist.init_process_group(backend, timeout=TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def mine(items: list, owner=None) -> list:
    """This rank's share of `items`: round-robin by position, or where `owner(item) == rank()`."""
    if owner is None:
        return items[rank() :: world()]
    return [item for item in items if owner(item) == rank()]


def mean(value: float) -> float:
    """The mean of a number over the ranks (a logged loss, not a gradient)."""
    if world() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world()


def device_of_rank(device: torch.device) -> torch.device:
    """`cuda` means this rank's own GPU (LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device
