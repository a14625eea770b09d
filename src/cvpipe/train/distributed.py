"""DDP through torchrun: process group setup, rank-0 gating, global sums and gathers.

``torchrun --nproc_per_node N -m cvpipe train`` (or ``cvpipe train --nproc N``)
starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; multi-node
runs use torchrun's own ``--nnodes``/``--rdzv-*`` flags. The backend is NCCL on
CUDA and gloo on CPU. Only rank 0 logs, writes checkpoints, metrics and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str) -> Dist:
    import torch.distributed as dist

    d = from_env()
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum plain numbers over every rank (float64 on CPU: exact for counts)."""
    if not d.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m cvpipe <argv>``."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "cvpipe", *argv]


def gather_object(obj, d: Dist) -> list:
    """Every rank's ``obj`` as a list (index = rank), on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    box = [None] * d.world_size
    dist.all_gather_object(box, obj)
    return box
