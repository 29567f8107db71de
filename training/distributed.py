"""Ranks from MPI, torch.distributed on top: the rendezvous, the device, and the two collectives VICReg needs.

mpi4py gives rank, world size and the node-local rank under any MPI (MPICH, Open MPI, Cray PALS, srun via PMI),
so no launcher-specific environment variables are read. Rank 0 picks a free TCP port and broadcasts its address
over MPI; no port is hard-coded. gloo on CPUs, NCCL on GPUs; the node-local rank picks the GPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from catalog.ranks import Peer, PeerWatch, died, failed_line, gone_peers, reason, this_peer
from catalog.runinfo import launched_by_mpi

ABORT_GRACE_S = 0.3

__all__ = ["Dist", "Peer", "mpi_world", "local_device", "init_distributed", "process_group", "leave_process_group",
           "abort", "failure_line", "FullGatherLayer", "gather_rows", "SyncBatchNorm1d", "all_mean", "is_distributed",
           "AllReduceSum", "launched_by_mpi", "bcast", "any_rank", "mpi_peers", "watch_ranks"]



@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    peers: tuple[Peer, ...] = ()  # every rank's host and pid, in rank order (empty for a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def mpi_world() -> tuple[int, int, int, int]:
    """(rank, world size, node-local rank, ranks on this node) from MPI; (0, 1, 0, 1) for a plain single process.

    A process no MPI launcher started does not initialise MPI at all, so `training run` works where mpi4py's
    MPI library cannot start without a launcher.
    """
    if not launched_by_mpi():
        return 0, 1, 0, 1
    from mpi4py import MPI  # importing it initialises MPI: only under a launcher

    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        return world.Get_rank(), world.Get_size(), local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def bcast(value, root: int = 0):
    """``value`` of rank ``root`` on every rank (MPI; a single process gets its own value)."""
    if not launched_by_mpi():
        return value
    from mpi4py import MPI  # only under a launcher: MPI cannot always start without one (see mpi_world)

    return MPI.COMM_WORLD.bcast(value, root=root)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: one decision all ranks take at the same point (MPI)."""
    if not launched_by_mpi():
        return bool(flag)
    from mpi4py import MPI  # only under a launcher (see mpi_world)

    return bool(MPI.COMM_WORLD.allreduce(bool(flag), op=MPI.LOR))


def abort(code: int = 1) -> None:
    """End every rank now (a failed rank must not leave the others waiting in a collective)."""
    sys.stdout.flush()
    sys.stderr.flush()
    # DataLoader workers ignore SIGTERM (training.loader.make_loader): end them here rather than leave them to the
    # launcher's clean-up.
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
    try:
        if not launched_by_mpi():
            raise RuntimeError("no MPI")
        from mpi4py import MPI  # only under a launcher (see mpi_world)

        if MPI.COMM_WORLD.Get_size() > 1:
            # Hydra forwards a rank's output through its proxy, and MPI_Abort tears the proxies down: a line
            # written just before it can be lost. Give the proxy a moment to pass the reason on.
            time.sleep(ABORT_GRACE_S)
            MPI.COMM_WORLD.Abort(code)
    except Exception:  # noqa: BLE001 - already failing; exiting is all that is left
        pass
    os._exit(code)


def failure_line(command: str, rank: int, world_size: int, exc: BaseException, peers: tuple[Peer, ...] = ()) -> str:
    """One line saying which rank failed and why.

    A rank whose own code failed names itself and the error. A rank whose collective failed because a peer
    vanished (killed, out of memory, crashed: it could not say so itself) names the peers of this host that are
    gone, or says that a rank on another host stopped answering.
    """
    if not (_lost_peer(exc) and peers):
        return failed_line(command, rank, world_size, exc)
    gone = gone_peers(peers, rank)
    if gone:
        return f"{command}: {died(gone, peers)}; rank {rank} lost it in a collective and ends every rank"
    return (f"{command}: rank {rank} of {world_size} lost contact with another rank ({reason(exc)}); a rank on another "
            "host died or hangs; ending every rank")


_LOST_PEER_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
                   "timed out", "timeout")


def _lost_peer(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (dist.DistError, RuntimeError, ConnectionError)) and any(
        marker in text for marker in _LOST_PEER_TEXT)


def _rendezvous_address(rank: int, peers: tuple[Peer, ...]) -> str | None:
    """Rank 0's address as the other ranks can reach it (loopback on one node, else its resolved hostname);
    None on the other ranks, which take it from rank 0's broadcast and need not resolve anything."""
    if rank != 0:
        return None
    if len({peer.host for peer in peers}) == 1:
        return "127.0.0.1"
    return os.environ.get("SAGEPAIRS_MASTER_ADDR") or socket.gethostbyname(socket.getfqdn())


def mpi_peers() -> tuple[Peer, ...]:
    """Every rank's host and pid, in rank order (collective: every rank takes part); () for a single process."""
    if not launched_by_mpi():
        return ()
    from mpi4py import MPI  # only under a launcher (see mpi_world)

    return tuple(MPI.COMM_WORLD.allgather(this_peer()))


def watch_ranks(command: str, rank: int, peers: tuple[Peer, ...]) -> PeerWatch:
    """A `PeerWatch` that ends every rank through MPI Abort when a rank of this host dies."""
    return PeerWatch(command, rank, peers, abort)


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def local_device(local_rank: int, use_cuda: bool | None = None) -> torch.device:
    """This rank's device: the node-local rank picks the GPU (made current), else the CPU."""
    if torch.cuda.is_available() if use_cuda is None else use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(timeout_s: float, use_cuda: bool | None = None) -> Dist:
    """Join all MPI ranks in one torch.distributed process group (none for a single process).

    Pair it with `leave_process_group` (or use `process_group`): a process that exits with its group still up
    can abort at exit ("terminate called without an active exception") when gloo's threads outlive Python.
    """
    rank, world, local_rank, local_size = mpi_world()
    device = local_device(local_rank, use_cuda)
    cuda = device.type == "cuda"
    if world == 1:
        return Dist(0, 1, 0, 1, device, None)
    peers = mpi_peers()
    address = _rendezvous_address(rank, peers)
    address, port = bcast((address, _free_port(address)) if rank == 0 else None)
    backend = "nccl" if cuda else "gloo"
    kwargs = {"device_id": device} if cuda else {}
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank, world, local_rank, local_size, device, backend, peers)


def leave_process_group() -> None:
    """Destroy this rank's process group, then wait until every rank has destroyed its own.

    The wait is an MPI barrier, not a torch one: rank 0 hosts the rendezvous store, and a rank that exits while
    another still tears its group down pulls the store from under it. Only for ranks that all got here; a failed
    rank ends every rank with `abort` instead.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if launched_by_mpi():
        from mpi4py import MPI  # only under a launcher (see mpi_world)

        MPI.COMM_WORLD.Barrier()


@contextlib.contextmanager
def process_group(timeout_s: float, use_cuda: bool | None = None) -> Iterator[Dist]:
    """`init_distributed` for a block: the group is left on the way out, and an error on one rank ends every rank
    with one line saying which and why (a rank left waiting in a collective would otherwise hang)."""
    info = init_distributed(timeout_s, use_cuda)
    try:
        yield info
    except BaseException as exc:
        if info.world_size > 1:
            print(failure_line(Path(sys.argv[0]).name, info.rank, info.world_size, exc, info.peers),
                  file=sys.stderr, flush=True)
            abort(1)
        raise
    leave_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FullGatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (upstream VICReg's).

    A plain all_gather cuts the graph: the variance and covariance terms would then pull only on local rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):  # noqa: ANN205
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x.contiguous())
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order, differentiable; ``x`` itself without a process group."""
    if not is_distributed():
        return x
    return torch.cat(FullGatherLayer.apply(x), dim=0)


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (for logging)."""
    if not is_distributed():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients too (every rank used the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics cover every rank's rows, on CPUs (gloo) as on GPUs.

    torch's SyncBatchNorm refuses CPU tensors; this computes the same thing with one differentiable all_reduce
    of (sum, sum of squares, count), so 2 ranks x 4 rows normalise exactly like 1 process x 8 rows.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        values = x.float()
        channels = values.shape[1]
        count = torch.full((1,), float(values.shape[0]), device=values.device)
        stats = AllReduceSum.apply(torch.cat([values.sum(0), (values * values).sum(0), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=momentum)
        out = (values - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)
