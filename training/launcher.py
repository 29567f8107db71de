"""Whether an MPI launcher started this process. No torch here: analysis.pca asks it in a process that must stay
small (a million-row PCA in a few hundred MB)."""

from __future__ import annotations

import os

__all__ = ["launched_by_mpi"]

# Set by MPI launchers for their ranks: Hydra/MPICH and Slurm's PMI, PMIx, Open MPI, MVAPICH, Cray PALS.
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PALS_RANKID")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)
