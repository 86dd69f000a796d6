"""torchrun support: ranks from the environment (RANK / WORLD_SIZE / LOCAL_RANK), no --local_rank flag.

Outside torchrun every helper is a no-op for a single process.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def setup(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world size); joins the process group when under torchrun (gloo works on CPU and GPU;
    training on GPUs asks for nccl)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(leave)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def leave() -> None:
    """Leave the process group (the command line's exit does it, then skips the interpreter's teardown;
    atexit covers library use)."""
    if active():
        dist.destroy_process_group()


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_dicts(part: dict) -> dict:
    """The union of every rank's dict (each rank gets it)."""
    if not dist.is_initialized():
        return dict(part)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}
