"""The MPI ranks of one command: who they are, and a watch that ends them all when one of them dies.

A rank killed by SIGKILL or the out-of-memory killer cannot say so, and MPI tells the others only at their next
collective, which for `analysis embed` or `ingest build-shards` can be the end of the whole run. So each rank
watches the other ranks of its own host (by pid and start time, so a reused pid is not taken for the rank) and,
when one has vanished, prints one line naming it and ends every rank. It looks every WATCH_INTERVAL_S, and at
once when MPICH's Hydra sends its SIGUSR1 (Hydra's word to the survivors that a rank has died; it ends them a
few milliseconds later, so waiting for the next look would lose the line). A rank on another host is the
launcher's to report (Hydra's mpiexec ends the job when a rank dies; the Slurm job scripts pass
--kill-on-bad-exit=1).

It lives below every command (ingest, training and analysis all run under mpiexec), beside `runinfo`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Peer", "this_peer", "gone_peers", "PeerWatch", "WATCH_INTERVAL_S", "died", "reason", "failed_line"]

WATCH_INTERVAL_S = 0.5  # how often a rank looks at the others: the bound on noticing, with MPI Abort's own time


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: its host, pid and the pid's start time (clock ticks since boot, from /proc)."""

    host: str
    pid: int
    started: int


def _start_ticks(pid: int) -> int | None:
    """A process's start time from /proc/PID/stat, or None when it has gone or is a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat, counted after the command name's closing parenthesis


def this_peer() -> Peer:
    return Peer(socket.gethostname(), os.getpid(), _start_ticks(os.getpid()) or 0)


def gone_peers(peers: tuple[Peer, ...], me: int) -> list[int]:
    """The ranks of this host, other than ``me``, whose process has exited."""
    host = socket.gethostname()
    return [rank for rank, peer in enumerate(peers)
            if rank != me and peer.host == host and _start_ticks(peer.pid) != peer.started]


def died(gone: list[int], peers: tuple[Peer, ...]) -> str:
    """"rank 1 (pid N) of 2 died (killed, ...)": the words every command uses for ranks that vanished."""
    names = ", ".join(f"rank {r} (pid {peers[r].pid})" for r in gone)
    return f"{names} of {len(peers)} died (killed, out of memory or crashed)"


def reason(exc: BaseException) -> str:
    """Why a rank failed, in a few words: the exception's type and first line."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"


def failed_line(command: str, rank: int, world_size: int, exc: BaseException) -> str:
    """One line for a rank whose own code failed: which rank, and why."""
    return f"{command}: rank {rank} of {world_size} failed: {reason(exc)}; ending every rank"


class PeerWatch:
    """A daemon thread that, while running, ends every rank with one line when a rank of this host dies.

    Stop it before the ranks' last collective: after that, ranks exit at their own pace, and a rank that has
    finished is not a rank that died.
    """

    def __init__(self, command: str, rank: int, peers: tuple[Peer, ...], end_every_rank: Callable[[int], None],
                 interval_s: float = WATCH_INTERVAL_S) -> None:
        self.command, self.rank, self.peers = command, rank, peers
        self.end_every_rank, self.interval_s = end_every_rank, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) of the signal wake-up pipe
        self._previous: tuple[int, object] | None = None  # the wake-up fd and SIGUSR1 handler we replaced

    def __enter__(self) -> PeerWatch:
        if len(self.peers) > 1:
            self._hear_hydra()
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                os.write(self._wakeup[1], b"\0")  # wake the watch's select now, not at its next look
        if self._thread.is_alive():
            self._thread.join()
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous[0])
            signal.signal(signal.SIGUSR1, self._previous[1])
            self._previous = None
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _hear_hydra(self) -> None:
        """Wake the watch the moment a SIGUSR1 arrives: Python's C-level handler writes it to a pipe at once,
        while a Python-level handler would wait for the main thread (which may be inside a long native call)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals are the main thread's; the periodic look still runs
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        previous_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        self._wakeup, self._previous = (read_end, write_end), (previous_fd, previous_handler)

    def _watch(self) -> None:
        while not self._stopped.is_set():
            heard = self._wait()
            if self._stopped.is_set():
                return
            gone = gone_peers(self.peers, self.rank) if not heard else self._gone_after_signal()
            if gone or heard:
                self._end(gone)
                return

    def _gone_after_signal(self) -> list[int]:
        """The dead ranks of this host once Hydra has said one died: its process can outlive the word by a few
        milliseconds (still exiting), so look again briefly before blaming another host."""
        for _ in range(25):
            gone = gone_peers(self.peers, self.rank)
            if gone:
                return gone
            time.sleep(0.02)
        return []

    def _wait(self) -> bool:
        """Sleep one interval or until a signal; whether Hydra's SIGUSR1 was among the signals."""
        if self._wakeup is None:
            self._stopped.wait(self.interval_s)
            return False
        readable, _, _ = select.select([self._wakeup[0]], [], [], self.interval_s)
        if not readable:
            return False
        try:
            signals = os.read(self._wakeup[0], 512)
        except OSError:
            return False
        return signal.SIGUSR1 in signals

    def _end(self, gone: list[int]) -> None:
        if gone:
            line = f"{self.command}: {died(gone, self.peers)}; rank {self.rank} ends every rank"
        else:
            line = (f"{self.command}: the launcher reports that a rank of {len(self.peers)} died (on another host); "
                    f"rank {self.rank} ends every rank")
        os.write(sys.stderr.fileno(), (line + "\n").encode())  # unbuffered: the launcher may end us any moment
        self.end_every_rank(1)
