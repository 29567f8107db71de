"""The MPI ranks of `ingest build-shards`, and the decisions they take together.

Without an MPI launcher there is one rank and every step below is local. Under ``mpiexec -n R`` every decision
that changes what a rank does next is rank 0's, and reaches every rank in one collective, in this order:

1. ``decide``: a value rank 0 works out before the build (the resolved configuration), or its reason to stop;
2. ``hand_out``: each rank's share of the frames, or rank 0's reason to stop (bad paths, a locked dataset, ...);
3. ``collect``: every rank's outcome on rank 0: its shards, or the error that ended its share;
4. the verdict (``receive_verdict``): committed, or stopped, with rank 0's one line saying which rank failed and why.

During the decode no rank waits, so none can be told anything in a collective. A rank whose share fails raises an
alarm instead (a message to every other rank, apart from the steps); the others look for one between pieces of
frames and stop their shares early, and every alarm is received in step 3. So a failure ends the run within about
a piece of frames, not at the end of the slowest share.

A rank stopped by rank 0 raises :class:`RankStopped` (its command exits with rank 0's exit code and prints nothing:
rank 0 reports). A rank that leaves this sequence any other way (an unexpected error or an interrupt between two
steps) prints one line naming itself and ends every rank with MPI_Abort, since the others would wait for it for
ever. A rank that dies (SIGKILL, the out-of-memory killer) is the launcher's to report: Hydra's mpiexec ends the job
once the rank's process and its output pipes are gone (its decode workers die with it: ingest/share.py), and
Slurm's srun with --kill-on-bad-exit=1, which the job scripts pass; during the decode the ranks of its host also
watch for it, so that one of them can name it first (``watching``).

While a rank waits for the others it sleeps on a nonblocking barrier instead of spinning in a blocking collective:
its core stays free for the workers beside it, and a signal (Ctrl-C) is acted on at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from catalog.ranks import Peer, PeerWatch, this_peer
from catalog.runinfo import ConfigError, launched_by_mpi, launched_world_size
from catalog.store import DatasetLocked

__all__ = ["BuildError", "RankStopped", "Stop", "Ranks", "exit_code", "describe"]

T = TypeVar("T")

COMMAND = "ingest build-shards"
_DECISION, _SHARE, _OUTCOMES, _VERDICT = "decision", "share", "outcomes", "verdict"
_LONGEST_NAP_S = 0.02  # the longest sleep between two looks at a pending barrier
# How often the watch looks at the other ranks during the decode. Ingest runs few ranks a node (each with many
# workers), so looking often costs little, and leaving the watch at the end of every share waits up to this long.
_WATCH_INTERVAL_S = 0.1


class BuildError(RuntimeError):
    """A build that cannot start (bad paths, bad nodes file) or whose decode failed; nothing was committed."""


@dataclass(frozen=True)
class Stop:
    """Rank 0's decision that the run ends without a commit: why, and the exit code every rank returns."""

    reason: str
    exit_code: int


class RankStopped(BuildError):
    """On a rank other than 0: rank 0 stopped the run and reports why (once); exit with ``exit_code``."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(f"stopped by rank 0: {stop.reason}")
        self.exit_code = stop.exit_code


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that failed with ``exc``: 3 for a locked dataset, 2 for a build that could not
    start or finish, 130 for an interrupt (as a shell reports SIGINT), 1 for anything else."""
    if isinstance(exc, RankStopped):
        return exc.exit_code
    if isinstance(exc, DatasetLocked):
        return 3
    if isinstance(exc, (BuildError, ConfigError)):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def describe(exc: BaseException) -> str:
    """An exception as one line: its type and message (an OSError's message names the file)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


class Ranks:
    """This process's place among the ranks of a build, and the collective steps it still owes the others."""

    def __init__(self, comm: Any = None, local_size: int = 1, peers: tuple[Peer, ...] = ()) -> None:
        self.comm = comm  # None: a single process
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_size = local_size  # ranks on this node, for the default number of workers
        self.peers = peers  # every rank's host and process, for the watch during the decode
        self._owed: list[str] = []  # the steps of the run the other ranks still expect of this one
        # Alarms travel apart from the steps' collectives, on a communicator of their own.
        self._alarms = comm.Dup() if comm is not None else None
        self._sent: list[Any] = []  # this rank's alarms, one request per other rank

    @classmethod
    def start(cls) -> Ranks:
        """The ranks the MPI launcher started (one process without a launcher). Every rank calls this first."""
        if not launched_by_mpi():
            return cls()
        # Imported only under a launcher: initialising MPI in a process no launcher started can fail or hang.
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        launched = launched_world_size()
        if world.Get_size() < launched:
            # Every rank sees a world of its own here, so each says so itself: there is nobody to tell.
            raise BuildError(
                f"the launcher started {launched} ranks but MPI sees {world.Get_size()}: mpi4py loaded another MPI "
                f"library ({MPI.Get_library_version().splitlines()[0].strip()}) than the launcher's; point "
                "MPI4PY_LIBMPI at the launcher's libmpi.so (README: Ingest at scale). Nothing was touched."
            )
        if world.Get_size() == 1:
            return cls()
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        try:
            return cls(world, local.Get_size(), tuple(world.allgather(this_peer())))
        finally:
            local.Free()

    # -- step 1 -------------------------------------------------------------------------------------------------

    def decide(self, work_out: Callable[[], T]) -> T:
        """``work_out()`` as rank 0 computed it, on every rank (no other rank calls it): rank 0's exception is
        raised on rank 0 and stops the other ranks."""
        if self.comm is None:
            return work_out()
        self._owed = [_DECISION]
        with self._owing():
            if self.rank != 0:
                message = self._together(lambda: self.comm.bcast(None, root=0))
                self._owed.remove(_DECISION)
                return self._receive(message)
            try:
                value = work_out()
            except BaseException as exc:
                self._settle(Stop(describe(exc), exit_code(exc)))
                raise
            self._together(lambda: self.comm.bcast(value, root=0))
            self._owed.remove(_DECISION)
            return value

    # -- steps 2 to 4 -------------------------------------------------------------------------------------------

    def run(self, lead: Callable[[], T], follow: Callable[[], None]) -> T | None:
        """Rank 0 runs ``lead`` (which hands out the shares and collects the outcomes), the others ``follow``;
        rank 0's result, None elsewhere. Whatever ``lead`` raises, the other ranks get rank 0's decision."""
        if self.comm is None:
            return lead()
        self._owed = [_SHARE, _OUTCOMES, _VERDICT]
        with self._owing():
            if self.rank != 0:
                follow()
                return None
            try:
                result = lead()
                if _SHARE in self._owed:
                    raise RuntimeError("rank 0 finished the build without handing out the shares")
            except BaseException as exc:
                self._settle(Stop(describe(exc), exit_code(exc)))
                raise
            self._settle(None)
            return result

    def hand_out(self, shares: list[T]) -> T:
        """Rank 0: send rank r ``shares[r]``; returns rank 0's own. (A scatter, not a broadcast: each rank needs
        only its own share, and all of them together are large.)"""
        if self.comm is None:
            return shares[0]
        mine = self._together(lambda: self.comm.scatter(shares, root=0))
        self._owed.remove(_SHARE)
        return mine

    def receive_share(self) -> Any:
        """Ranks other than 0: the share rank 0 handed out to this rank; RankStopped when rank 0 stopped instead."""
        message = self._together(lambda: self.comm.scatter(None, root=0))
        self._owed.remove(_SHARE)
        return self._receive(message)

    def collect(self, mine: T) -> list[T]:
        """Every rank's ``mine``, in rank order, on rank 0 (an empty list elsewhere). Every alarm raised during the
        decode is received here, by every rank."""
        if self.comm is None:
            return [mine]

        def gather() -> list[T]:
            self._take_alarms()
            return self.comm.gather(mine, root=0)

        gathered = self._together(gather)
        self._owed.remove(_OUTCOMES)
        return gathered if self.rank == 0 else []

    def receive_verdict(self) -> None:
        """Ranks other than 0: wait for the end of the run; RankStopped when rank 0 did not commit."""
        message = self._together(lambda: self.comm.bcast(None, root=0))
        self._owed.remove(_VERDICT)
        self._receive(message)

    # -- during the decode ----------------------------------------------------------------------------------------

    def raise_alarm(self) -> None:
        """This rank's share failed: tell every other rank at once, so that each stops its own share (see
        ``alarmed``) instead of decoding to its end before the run stops anyway."""
        if self.comm is not None and not self._sent:
            self._sent = [self._alarms.isend(self.rank, dest=r) for r in range(self.size) if r != self.rank]

    def watching(self) -> AbstractContextManager:
        """The decode, watched: a rank of this host that dies meanwhile (SIGKILL, the out-of-memory killer) is named
        in one line by the rank that notices, which ends every rank (catalog.ranks.PeerWatch). Only the decode: no
        rank ends normally during it, while a rank stopped at a step may end before the others have left theirs."""
        if self.comm is None:
            return nullcontext()
        return PeerWatch(COMMAND, self.rank, self.peers, self.comm.Abort, interval_s=_WATCH_INTERVAL_S)

    def alarmed(self) -> bool:
        """Whether another rank raised the alarm (a probe: it waits for nothing; looked at between pieces)."""
        return self.comm is not None and bool(self._alarms.iprobe())  # from any rank

    def _take_alarms(self) -> None:
        """Every rank: receive the alarm of each rank that raised one and see its own through, so that no message
        is left behind (collective: every rank learns who raised one)."""
        alarmed_by = self.comm.allgather(bool(self._sent))
        for rank, alarmed in enumerate(alarmed_by):
            if alarmed and rank != self.rank:
                self._alarms.recv(source=rank)
        for request in self._sent:
            request.wait()
        self._sent = []

    # -- the rules ------------------------------------------------------------------------------------------------

    def _settle(self, stop: Stop | None) -> None:
        """Rank 0: take part in every step the other ranks still wait for, carrying ``stop`` (None: committed)."""
        if _DECISION in self._owed:
            self._together(lambda: self.comm.bcast(stop, root=0))
            self._owed = []
        if _SHARE in self._owed:
            self._together(lambda: self.comm.scatter([stop] * self.size, root=0))
            self._owed = []  # a stopped rank waits for nothing more
        if _OUTCOMES in self._owed:
            self.collect(None)
        if _VERDICT in self._owed:
            self._together(lambda: self.comm.bcast(stop, root=0))
            self._owed.remove(_VERDICT)

    def _receive(self, message: Any) -> Any:
        if isinstance(message, Stop):
            self._owed = []
            raise RankStopped(message)
        return message

    def _together(self, collective: Callable[[], T]) -> T:
        """Sleep until every rank has reached this step (a nonblocking barrier, looked at with growing naps), then
        run ``collective``, which completes at once with every rank in it. An exception in between (Ctrl-C)
        leaves the others inside the step: it ends every rank."""
        try:
            request = self.comm.Ibarrier()
            nap = 0.0005
            while not request.Test():
                time.sleep(nap)
                nap = min(2 * nap, _LONGEST_NAP_S)
            return collective()
        except BaseException as exc:
            self.abort(exc)
            raise

    @contextmanager
    def _owing(self) -> Iterator[None]:
        """A block after which this rank owes the others no step: an exception that leaves it owing one ends every
        rank, since the ranks waiting for that step would wait for ever."""
        try:
            yield
        except BaseException as exc:
            if self._owed:
                self.abort(exc)
            raise

    def abort(self, exc: BaseException) -> None:
        """End every rank now (MPI_Abort), with one line saying which rank and why."""
        code = exit_code(exc)
        try:
            print(f"{COMMAND}: rank {self.rank} of {self.size} failed: {describe(exc)}; ending every rank",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            self.comm.Abort(code)
        finally:
            os._exit(code)
