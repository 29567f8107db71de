"""Run under `mpiexec -n R`: DINOLoss's centre and loss over a few steps, each rank on its share of every crop.

Every rank draws the same fixed student and teacher outputs per step and keeps its contiguous rows of each crop's
chunk (the rows the training loader would give it). Two passes: the loss as it is, whose centre all-reduces the
teacher rows over the ranks, and a control with ``torch.distributed.all_reduce`` made a no-op, so each rank centres
on its own rows only. Each rank writes its losses and centres to OUT.<rank>; the test compares them with one process
on the whole batch (equal) and checks that the control differs from it.

    mpiexec -n 2 python tests/mpi_dino_centre.py OUT
"""

from __future__ import annotations

import sys
from unittest import mock

import torch
import torch.distributed as dist

from training.dino import DINOLoss
from training.distributed import process_group

BATCH, NCROPS, N_GLOBAL, DIM, STEPS = 8, 4, 2, 16, 3


def outputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student (NCROPS x BATCH rows) and teacher (N_GLOBAL x BATCH rows) outputs of one step, crop-major."""
    generator = torch.Generator().manual_seed(100 + step)
    student = torch.randn(NCROPS * BATCH, DIM, generator=generator) * 3
    teacher = torch.randn(N_GLOBAL * BATCH, DIM, generator=generator) * 3 + torch.arange(DIM) / DIM
    return student, teacher


def rows_of(chunked: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous rows of every BATCH-row chunk, still crop-major."""
    per_rank = BATCH // world_size
    chunks = chunked.split(BATCH)
    return torch.cat([chunk[rank * per_rank : (rank + 1) * per_rank] for chunk in chunks])


def new_loss() -> DINOLoss:
    return DINOLoss(DIM, NCROPS, 0.04, 0.04, 0, STEPS, same_view_positive=True, n_global=N_GLOBAL)


def run(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    """Losses and centres after each of STEPS calls on this rank's rows."""
    loss_fn, losses, centres = new_loss(), [], []
    for step in range(STEPS):
        student, teacher = outputs(step)
        losses.append(loss_fn(rows_of(student, rank, world_size), rows_of(teacher, rank, world_size), step).detach())
        centres.append(loss_fn.center.clone())
    return {"losses": losses, "centres": centres}


def main(out: str) -> int:
    with process_group(timeout_s=60, use_cuda=False) as info:
        reduced = run(info.rank, info.world_size)
        with mock.patch.object(dist, "all_reduce", lambda tensor, *args, **kwargs: None):
            control = run(info.rank, info.world_size)
        torch.save({"reduced": reduced, "control": control, "world_size": info.world_size}, f"{out}.{info.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
