"""`analysis pca`: exact PCA from a streamed covariance, for ``rgb``, ``ir`` and ``joint``, in memory that does not
grow with N.

One pass over the Zarr chunks accumulates n, the sum and the sum of outer products (float64, about a pivot row
mean so that large means do not cancel away the variance); with MPI ranks each rank reads its own chunks and one
``Allreduce`` adds them up. ``eigh`` of the D x D covariance gives the exact principal axes (what
``sklearn.decomposition.PCA`` gives, signs fixed the same way); a second pass writes the projected features,
chunk by chunk, into ``RUN/analysis/<checkpoint>/pca.zarr`` (``<space>/features`` [N, k]), which clustering,
t-SNE and the plots read. Peak memory: a chunk or two plus D x D.

No torch here: a million-row PCA runs in processes without it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from analysis.results import PCAResult, PCASpace, write_result
from analysis.runs import AnalysisError
from analysis.store import SPACES, Embeddings, pyplot, save_figure
from catalog.ranks import PeerWatch, failed_line, this_peer
from catalog.runinfo import launched_by_mpi

__all__ = ["PCAFit", "streamed_pca", "run_pca", "open_pca", "plot_explained_variance"]


@dataclass(frozen=True)
class PCAFit:
    n: int
    mean: np.ndarray  # D
    components: np.ndarray  # k x D, rows are unit principal axes, largest variance first
    explained_variance: np.ndarray  # k (divided by n - 1, as sklearn)
    total_variance: float

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance if self.total_variance > 0 else self.explained_variance * 0

    def transform(self, block: np.ndarray) -> np.ndarray:
        return ((block - self.mean) @ self.components.T).astype(np.float32)


def _mpi():
    """MPI.COMM_WORLD when an MPI launcher started this process with more than one rank, else None."""
    if not launched_by_mpi():
        return None
    # mpi4py.MPI only here and under a communicator: importing it initialises MPI, which a process no MPI launcher
    # started must not do (see training.distributed.mpi_world).
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def streamed_pca(embeddings: Embeddings, space: str, components: int, comm=None) -> PCAFit:
    """Exact PCA of one space from one pass over the chunks (this rank's share when ``comm`` is given)."""
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    dim = embeddings.dim(space)
    starts = list(embeddings.chunk_starts())
    if not starts:
        raise AnalysisError(f"{embeddings.path}: no rows")
    # Shifted sums: the covariance of x - pivot equals that of x, and the pivot (the first chunk's mean, the
    # same on every rank) keeps sum and sum of squares small enough that float64 does not cancel the variance.
    if rank == 0:
        pivot = embeddings.block(space, starts[0], min(starts[0] + embeddings.chunk_rows, embeddings.n)).mean(
            axis=0, dtype=np.float64)
    else:
        pivot = None
    if comm is not None:
        pivot = comm.bcast(pivot, root=0)
    count = np.zeros(1, dtype=np.float64)
    total = np.zeros(dim, dtype=np.float64)
    outer = np.zeros((dim, dim), dtype=np.float64)
    for _, block in embeddings.chunks(space, starts[rank::world]):
        shifted = block.astype(np.float64) - pivot
        count += len(shifted)
        total += shifted.sum(axis=0)
        outer += shifted.T @ shifted
    if comm is not None:
        from mpi4py import MPI  # MPI is running (there is a communicator); see _mpi for why not at the top

        for array in (count, total, outer):
            comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
    n = int(count[0])
    mean_shift = total / n
    covariance = (outer - n * np.outer(mean_shift, mean_shift)) / max(n - 1, 1)
    covariance = (covariance + covariance.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    k = min(components, dim, n)
    values = np.clip(eigenvalues[order][:k], 0, None)
    axes = eigenvectors[:, order][:, :k].T
    # sklearn's sign convention (svd_flip, v-based): the largest |entry| of each axis is positive.
    signs = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1, signs)[:, None]
    return PCAFit(n, pivot + mean_shift, axes, values, float(np.clip(eigenvalues, 0, None).sum()))


def pca_path(results: Path) -> Path:
    return results / "pca.zarr"


def open_pca(results: Path):
    """The complete pca.zarr group of a checkpoint's results (``<space>/features`` etc.)."""
    path = pca_path(results)
    if not path.exists():
        raise AnalysisError(f"{path}: no PCA (run `analysis pca` first)")
    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete"):
        raise AnalysisError(f"{path}: incomplete (a PCA was interrupted); run `analysis pca` again")
    return group


def run_pca(embeddings: Embeddings, results: Path, components: int, spaces: tuple[str, ...] = SPACES,
            progress: bool = True, log=print) -> dict:
    """Fit every space, write pca.zarr (features included), pca.json and pca.png; under MPI every rank calls it."""
    comm = _mpi()
    spaces = tuple(s for s in spaces if s == "joint" or embeddings.has(s))
    fits = _on_every_rank(comm, lambda: _fit_and_project(embeddings, results, components, spaces, comm, progress))
    if comm is not None:
        comm.Barrier()  # every rank's features are written; from here rank 0 alone finishes
    if comm is not None and comm.Get_rank() != 0:
        return {}
    return _summarise(embeddings, results, fits, log)


def _on_every_rank(comm, work):  # noqa: ANN001, ANN202
    """``work()`` on this rank; under MPI a failed or vanished rank ends every rank with one line, not a hang."""
    if comm is None:
        return work()
    rank, world = comm.Get_rank(), comm.Get_size()
    peers = tuple(comm.allgather(this_peer()))
    try:
        with PeerWatch("analysis pca", rank, peers, comm.Abort):
            return work()
    except BaseException as exc:
        print(failed_line("analysis pca", rank, world, exc), file=sys.stderr, flush=True)
        comm.Abort(1)
        raise


def _fit_and_project(embeddings: Embeddings, results: Path, components: int, spaces: tuple[str, ...], comm,
                     progress: bool) -> dict[str, PCAFit]:
    """Fit each space from every rank's chunks, then write each rank's chunks' features into pca.zarr."""
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    path = pca_path(results)
    fits = {space: streamed_pca(embeddings, space, components, comm)
            for space in _progress(spaces, progress and rank == 0, "pca")}
    if rank == 0:
        _create_store(path, results, embeddings, fits)
    if comm is not None:
        comm.Barrier()  # the store exists before any rank writes into it
    group = zarr.open_group(str(path), mode="r+")
    starts = list(embeddings.chunk_starts())[rank::world]
    for space, fit in fits.items():
        features = group[space]["features"]
        for start, block in embeddings.chunks(space, starts):
            features[start : start + len(block)] = fit.transform(block)
    return fits


def _create_store(path: Path, results: Path, embeddings: Embeddings, fits: dict[str, PCAFit]) -> None:
    if path.exists():
        shutil.rmtree(path)
    results.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for space, fit in fits.items():
        sub = group.create_group(space)
        sub.create_array("mean", data=fit.mean.astype(np.float64))
        sub.create_array("components", data=fit.components.astype(np.float64))
        sub.create_array("explained_variance", data=fit.explained_variance.astype(np.float64))
        sub.create_array("features", shape=(embeddings.n, fit.components.shape[0]), dtype="float32",
                         chunks=(embeddings.chunk_rows, fit.components.shape[0]), fill_value=0)
        sub.attrs.update({"n": fit.n, "total_variance": fit.total_variance})
    group.attrs.update({"complete": False, "embeddings": embeddings.identity})


def _summarise(embeddings: Embeddings, results: Path, fits: dict[str, PCAFit], log) -> dict:  # noqa: ANN001
    """Rank 0: pca.json, pca.png, the store marked complete, one line per space."""
    summary = {}
    for space, fit in fits.items():
        ratio = fit.explained_variance_ratio
        cumulative = np.cumsum(ratio)
        summary[space] = {
            "n": fit.n, "dim": int(fit.mean.shape[0]), "components": int(len(ratio)),
            "explained_variance_ratio": [round(float(r), 6) for r in ratio],
            "explained_by_components": float(cumulative[-1]),
            "components_for_90pct": int(np.searchsorted(cumulative, 0.9) + 1) if cumulative[-1] >= 0.9 else None,
        }
    plot_explained_variance(summary, results / "pca.png")
    zarr.open_group(str(pca_path(results)), mode="r+").attrs.update({"complete": True})
    write_result(results / "pca.json", PCAResult(
        embeddings=embeddings.identity, checkpoint=embeddings.checkpoint,
        spaces={space: PCASpace(**item) for space, item in summary.items()}, png="pca.png"))
    for space, item in summary.items():
        log(f"pca {space}: {item['components']} of {item['dim']} dims explain "
            f"{100 * item['explained_by_components']:.1f}% of the variance")
    return summary


def _progress(items, show: bool, desc: str):
    if not show:
        return items
    return tqdm(items, desc=desc, unit="space", dynamic_ncols=True)


def plot_explained_variance(summary: dict, out: Path) -> Path:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for space, item in summary.items():
        ratio = np.asarray(item["explained_variance_ratio"])
        axes[0].plot(np.arange(1, len(ratio) + 1), ratio, marker=".", label=space)
        axes[1].plot(np.arange(1, len(ratio) + 1), np.cumsum(ratio), label=space)
    axes[0].set(xlabel="component", ylabel="explained variance ratio", yscale="log", title="per component")
    axes[1].set(xlabel="components", ylabel="cumulative", ylim=(0, 1.01), title="cumulative")
    axes[1].axhline(0.9, color="grey", lw=0.6, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)
