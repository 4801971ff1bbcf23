"""The cross-process reductions of an RL step, for the stages that need them.

A stage takes a ``Collective`` (``accelerate.Accelerator`` is one) and reduces only what its math needs from the
global batch; with one process every helper returns its input unchanged, without a collective call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Collective(Protocol):
    """The process group as the stages see it."""

    num_processes: int
    process_index: int
    device: torch.device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor: ...


def sum_over_processes(dist: Collective, values: list[float]) -> list[float]:
    """Each value summed over processes (sent as float32, the same on every process)."""
    if dist.num_processes == 1:
        return values
    total = dist.reduce(torch.tensor(values, device=dist.device), reduction="sum").cpu()
    return [float(v) for v in total]


def gather_rows(dist: Collective, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``tensor``, in process order, on the CPU."""
    return dist.gather(tensor.to(dist.device)).cpu()


def gather_columns_padded(dist: Collective, tensor: torch.Tensor) -> torch.Tensor:
    """``gather_rows`` of a [rows, columns] tensor whose column count differs between processes: each is first
    zero-padded to the widest."""
    widest = int(dist.gather(torch.tensor([tensor.shape[1]], device=dist.device)).max())
    return gather_rows(dist, F.pad(tensor, (0, widest - tensor.shape[1])))


def own_rows(dist: Collective, n: int) -> slice:
    """This process's ``n`` rows within a ``gather_rows`` result (every process holds ``n``)."""
    return slice(dist.process_index * n, (dist.process_index + 1) * n)
