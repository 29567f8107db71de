"""One rank's share of an ingest: frames -> samples in segment files -> complete, fsynced, hashed shards.

Worker processes take the frames a piece at a time (:func:`ingest.process.process_piece`) and append each kept
sample's tar bytes to the piece's segment file. This process reads the pieces' results in frame order, decides
where each shard ends from the samples' lengths alone (:class:`shards.writer.ShardCuts`), and hands every
closed shard back to the workers to assemble (copy the byte ranges, hash, fsync). What stays here per frame is
bookkeeping, so the share scales with the workers; the shards' bytes depend only on the share's frames, never
on the number of workers. Segments are deleted once the shards that use them are assembled, so the temporary
space is a few pieces and shards, not a second copy of the output.

The assembled shards stay in the run's work directory under provisional names; the build renames them into
``shards/`` (in rank order) just before it commits the catalog part that lists them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ingest.config import IngestConfig
from ingest.frames import FrameTask
from ingest.process import FrameResult, Piece, process_piece
from shards.writer import ShardCuts, assemble_shard

__all__ = [
    "AssembledShard", "ShareOutcome", "WorkerDied", "ShareStopped", "split_by_bytes", "plan_pieces", "write_share",
]

_MOST_FRAMES_PER_PIECE = 32
_PIECES_PER_WORKER = 4  # a piece is at most 1/(this x workers) of the frames left
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class AssembledShard:
    path: str  # complete and fsynced in the work directory, not yet under its final name
    sha256: str
    bytes: int
    keys: tuple[str, ...]


@dataclass
class ShareOutcome:
    results: list[FrameResult]  # one per frame of the share, in order (kept ones with their placement)
    shards: list[AssembledShard]
    where: dict[str, tuple[int, int]]  # key -> (index into shards, offset of the sample's first byte there)
    seconds: float = 0.0  # from the first piece handed out to the last shard assembled
    workers: int = 1


def split_by_bytes(tasks: list[FrameTask], parts: int) -> list[list[FrameTask]]:
    """``parts`` consecutive shares of the (ordered) tasks with about equal raw bytes each: decode time follows
    the JPEG's size, and consecutive frames keep each share's shards in (VSN, ts_ns) order."""
    sizes = [t.rgb_bytes + t.thermal_bytes for t in tasks]
    total = sum(sizes) or 1
    shares: list[list[FrameTask]] = [[] for _ in range(parts)]
    running = 0
    for task, size in zip(tasks, sizes):
        # The share whose byte range holds this task's middle byte.
        share = min(parts - 1, int((running + size / 2) * parts / total))
        shares[share].append(task)
        running += size
    return shares


def plan_pieces(tasks: list[FrameTask], workers: int, work_dir: Path, tag: str) -> list[Piece]:
    """Consecutive pieces that shrink as the share runs out (guided self-scheduling): each takes 1/(4 x workers)
    of the frames left, at most 32, so the first pieces keep the queue cheap and the last ones, a frame or two,
    let every worker finish within about one frame of the others."""
    pieces, start = [], 0
    while start < len(tasks):
        size = max(1, min(_MOST_FRAMES_PER_PIECE, (len(tasks) - start) // (_PIECES_PER_WORKER * max(1, workers))))
        pieces.append(Piece(tuple(tasks[start : start + size]), str(work_dir / f"{tag}-p{len(pieces):06d}.seg")))
        start += size
    return pieces


class _Done:
    """Work done inline, with the two methods of concurrent.futures.Future used here."""

    def __init__(self, value) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its work (killed, e.g. by the kernel's OOM killer)."""


class ShareStopped(RuntimeError):
    """The share was given up before its end because ``stop_early`` said so (another rank's share failed)."""


def _start_worker(parent: int) -> None:
    """A worker's first step: have the kernel kill it when ``parent`` (its rank) dies (Linux's PR_SET_PDEATHSIG), let
    a Ctrl-C end it without a traceback (its rank reports the interrupt), and leave the launcher's word that a rank
    died (SIGUSR1) to its rank's watch, whose wake-up pipe it inherited.

    A worker that outlived a killed rank would wait for ever for work, and keep the launcher's output pipes of
    that rank open: mpiexec would then wait for ever for the rank to end instead of ending the others.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


@contextmanager
def _executor(workers: int, inline: bool) -> Iterator[Callable]:
    """``submit(fn, *args)`` returning a future: a process pool, or inline for tiny runs.

    concurrent.futures rather than multiprocessing.Pool: when a worker dies, its pool breaks and every pending
    result raises, so the run fails (committing nothing) instead of waiting for ever for a lost piece.
    """
    if inline:
        yield lambda fn, *args: _Done(fn(*args))
        return
    # fork: workers start in milliseconds with everything imported; spawn would re-import the whole command
    # (pandas, duckdb, pyarrow: about 2 s per worker), which is most of a small incremental run.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)) as pool:
        try:
            yield pool.submit
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed, or out of memory?) before finishing its frames") from None
        except BaseException:
            # Pieces not started are dropped; the ones running are waited for (shutdown(wait=False) here would also
            # keep the pool's own exit from waiting), so no worker writes into the work directory after this.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def write_share(
    tasks: list[FrameTask], raw_dir: Path, config: IngestConfig, workers: int, work_dir: Path, tag: str,
    progress: bool = True, stop_early: Callable[[], bool] = lambda: False,
) -> ShareOutcome:
    """Turn ``tasks`` into samples and shards in ``work_dir`` (see the module docstring); names start with ``tag``.
    ``stop_early`` is asked after every piece of frames: True gives up the share (ShareStopped)."""
    pieces = plan_pieces(tasks, workers, work_dir, tag)
    outcome = ShareOutcome([], [], {}, workers=workers)
    started = time.perf_counter()
    cuts = ShardCuts(int(config.shard_target_mb * 1024 * 1024))
    open_ranges: list[tuple[str, int, int]] = []
    open_keys: list[str] = []
    assembling: deque = deque()  # (path, keys, segments, async result), in shard order
    uses: Counter[str] = Counter()  # segment -> shards being assembled from it
    consumed: set[str] = set()  # segments whose every sample is placed in a shard

    def close_shard() -> None:
        path = work_dir / f"{tag}-{len(outcome.shards) + len(assembling):06d}.tar"
        segments = {segment for segment, _, _ in open_ranges}
        uses.update(segments)
        assembling.append((path, tuple(open_keys), segments, submit(assemble_shard, str(path), list(open_ranges))))
        open_ranges.clear()
        open_keys.clear()

    def reap(wait: bool) -> None:
        while assembling and (wait or assembling[0][3].done()):
            path, keys, segments, job = assembling.popleft()
            sha256, size = job.result()
            outcome.shards.append(AssembledShard(str(path), sha256, size, keys))
            uses.subtract(segments)
        in_open_shard = {segment for segment, _, _ in open_ranges}
        for segment in [s for s in consumed if uses[s] <= 0 and s not in in_open_shard]:
            os.unlink(segment)
            consumed.discard(segment)

    work_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(tasks), unit="frame", desc="ingest", disable=not progress or not tasks, smoothing=0.1)
    with bar, _executor(workers, inline=workers <= 1 and len(tasks) < 8) as submit:
        # A bounded window of pieces in flight, so shard assembly interleaves with decoding and segments are
        # deleted as the run goes (the pool's queue is first in, first out).
        queued: deque = deque()
        upcoming = iter(pieces)

        def submit_next() -> None:
            piece = next(upcoming, None)
            if piece is not None:
                queued.append((piece, submit(process_piece, piece, str(raw_dir), config)))

        for _ in range(2 * workers + 2):
            submit_next()
        while queued:
            piece, job = queued.popleft()
            results = job.result()
            submit_next()
            for result in results:
                outcome.results.append(result)
                place = result.placement
                if place is None:
                    continue
                if cuts.starts_shard(place.length) and open_keys:
                    close_shard()
                outcome.where[result.key] = (len(outcome.shards) + len(assembling), cuts.shard_bytes - place.length)
                open_ranges.append((place.segment, place.offset, place.length))
                open_keys.append(result.key)
            consumed.add(piece.segment)
            bar.update(len(piece.tasks))
            reap(wait=False)
            if stop_early():
                raise ShareStopped("given up: another rank's share failed")
        if open_keys:
            close_shard()
        reap(wait=True)
    outcome.seconds = time.perf_counter() - started
    return outcome
