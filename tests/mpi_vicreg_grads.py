"""Run under `mpiexec -n R`: VICReg loss and gradients of a tiny two-branch model, each rank on its rows.

Every rank builds the same model from the same seed and takes its contiguous share of one fixed batch (the
rows the training loader would give it); the model is wrapped in DDP, so after backward each rank holds the
rank-averaged gradient. Rank 0 writes the loss (mean over ranks, what training logs) and every gradient to
OUT, which the test compares with one process on the whole batch.

    mpiexec -n 2 python tests/mpi_vicreg_grads.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from training.config import ModelConfig
from training.distributed import all_mean, process_group
from training.model import VICReg, vicreg_loss

BATCH = 8
FIRST_HW, SECOND_HW = (32, 48), (16, 24)
MODEL = ModelConfig(rgb_arch="vit_tiny_patch16_224", ir_arch="vit_tiny_patch16_224", rgb_patch=16, ir_patch=8,
                    depth=1, expander=(32, 32, 16))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return (torch.randn(BATCH, 3, *FIRST_HW, generator=generator),
            torch.randn(BATCH, 1, *SECOND_HW, generator=generator))


def model() -> VICReg:
    torch.manual_seed(0)
    return VICReg(MODEL, FIRST_HW, SECOND_HW, (3, 1))


def main(out: str) -> int:
    with process_group(timeout_s=60, use_cuda=False) as info:
        net = model()
        wrapped = DistributedDataParallel(net) if info.world_size > 1 else net
        first, second = inputs()
        per_rank = BATCH // info.world_size
        rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        z_a, z_b, _, _ = wrapped(first[rows], second[rows])
        loss, _ = vicreg_loss(z_a, z_b)
        loss.backward()
        mean_loss = all_mean(loss.detach().reshape(1))
        if info.rank == 0:
            grads = {name: p.grad.detach().clone() for name, p in net.named_parameters() if p.grad is not None}
            torch.save({"loss": mean_loss.item(), "grads": grads, "world_size": info.world_size}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
