"""DDP through torchrun: process group setup, rank-0 gating, global sums and gathers.

``torchrun --nproc_per_node N -m cvpipe train`` (or ``cvpipe train --nproc N``)
starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; multi-node
runs use torchrun's own ``--nnodes``/``--rdzv-*`` flags. On CUDA the process group has two
backends, ``cpu:gloo,cuda:nccl`` (:func:`backend_for`): NCCL reduces the gradients (DDP's
buckets live on the GPU) and gloo the CPU tensors: :func:`all_sum`'s float64 metric sums,
``all_gather_object``'s pickles and the barrier. An NCCL-only group cannot reduce a CPU tensor
(the first metric reduction failed). On CPU the group is gloo. Only rank 0 logs, writes
checkpoints, metrics and plots.
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


def backend_for(device_type: str) -> str:
    """The process group's backend string: every tensor this module reduces is on CPU, so the group
    always has gloo for ``cpu``; on CUDA it adds NCCL for ``cuda`` (DDP's gradient all-reduce)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init(device_type: str, backend: str | None = None) -> Dist:
    """Join torchrun's process group (no-op for one process); *backend* overrides :func:`backend_for`."""
    import torch.distributed as dist

    d = from_env()
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend=backend or backend_for(device_type))
    return d


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum plain numbers over every rank (float64 on CPU: exact for counts).

    The tensor stays on CPU on purpose: the group's gloo backend reduces it (see :func:`backend_for`),
    and a host copy of a few numbers costs nothing next to a round trip through the GPU.
    """
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


def broadcast_buffers(module, d: Dist) -> None:
    """Give every rank rank 0's buffers of *module* (BatchNorm running statistics).

    DDP keeps the trained model's buffers in step (it broadcasts them from rank 0 at each forward),
    but a copy updated outside DDP, such as the EMA of the weights, drifts per rank: each rank's EMA
    averages its own rank's buffers. Rank 0's copy is the one checkpointed, so a run resumed
    from it would validate a different EMA on the other ranks than the uninterrupted run did;
    broadcasting before the EMA is validated makes both runs validate rank 0's, bit for bit.
    """
    if not d.enabled:
        return
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def gather_object(obj, d: Dist) -> list:
    """Every rank's ``obj`` as a list (index = rank), on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    box = [None] * d.world_size
    dist.all_gather_object(box, obj)
    return box
