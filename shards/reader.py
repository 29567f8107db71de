"""Read a Selection straight from shard byte ranges (DESIGN.md "Selection and reading").

``read_selection(selection)`` yields the same sample dicts stock ``webdataset.WebDataset`` yields
(``__key__``, ``__url__``, ``__local_path__``, ``ir.npy.gz`` (``ir.npy`` in datasets built before 2026-12-05:
``shards.layout.ir_celsius`` decodes either), ``json``, ``rgb.jpg`` as bytes), but reads only the
selected samples: one ``pread`` per sample, grouped by shard in offset order, or one sequential read of the
whole shard when most of it is selected. From a published dataset (``s3://``, ``https://``) the same rows come
by byte range, every shard of a window in flight at once (shards/remote.py). Every member is checked against its USTAR header and the shard's
size against the catalog, so a truncated or rewritten shard fails loudly, naming the shard and the sample.

Work is split across ranks and DataLoader workers so that every reader gets exactly the same number of
samples (``remainder="pad"`` repeats samples from the start of the order to fill; ``"drop"`` leaves the
remainder out; ``"uneven"`` gives every sample exactly once with counts differing by at most one).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.compat import FluidWrapper
from webdataset.utils import pytorch_worker_info

from catalog.storage import Storage, dataset_ref, is_remote, storage, submit
from shards.layout import BLOCK, IR_MEMBER, JSON_MEMBER, RGB_MEMBER
from shards.remote import GAP, ShardCache, ShardRead, ShardReadError, fetch_reads
from shards.verify import check_member_header

__all__ = ["ShardReadError", "SelectionReader", "read_selection", "load_selection", "partition", "epoch_order"]

_REQUIRED = ("key", "shard", "shard_bytes", "sample_offset", "sample_length", "ir_offset", "ir_size",
             "json_offset", "json_size", "rgb_offset", "rgb_size")
_PREFIXES = ("ir", "json", "rgb")
_AHEAD_AT_MOST = 4  # fetches prefetch() keeps waiting for their iter_rows  # of the members' offset and size columns, in the members' order


def _header_matches(header: bytes, name: bytes, size: int) -> bool:
    """Fast check of a USTAR header: name, size and magic (a mismatch is then explained by the full parser)."""
    if len(header) != BLOCK or header[257:262] != b"ustar" or header[:100].rstrip(b"\0") != name:
        return False
    digits = header[124:136].strip(b"\0 ")
    return int(digits, 8) == size if digits else size == 0


def load_selection(selection: str | os.PathLike[str] | pa.Table, dataset: str | os.PathLike[str] | None = None):
    """(table, dataset root) of a Selection given as a Parquet path or a table."""
    table = selection if isinstance(selection, pa.Table) else pq.read_table(selection)
    missing = [c for c in _REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"not a Selection: missing column(s) {', '.join(missing)} (make one with `catalog select`)")
    if dataset is None:
        meta = table.schema.metadata or {}
        if b"sagepairs.dataset" not in meta:
            raise ValueError("Selection does not say which dataset it came from; pass dataset=")
        dataset = meta[b"sagepairs.dataset"].decode()
    return table, dataset_ref(dataset)


def partition(n: int, slot: int, slots: int, remainder: str = "pad") -> np.ndarray:
    """Row indices (into an order of ``n`` rows) read by reader ``slot`` of ``slots``.

    Contiguous blocks, so each reader stays within few shards. ``pad`` and ``drop`` give every reader the
    same count; ``pad`` fills with rows from the start of the order, ``uneven`` reads each row exactly once.
    """
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} not in 0..{slots - 1}")
    if remainder == "uneven":
        return np.arange(slot * n // slots, (slot + 1) * n // slots)
    if remainder == "drop":
        per = n // slots
        return np.arange(slot * per, (slot + 1) * per)
    if remainder == "pad":
        per = -(-n // slots) if n else 0
        return np.arange(slot * per, (slot + 1) * per) % max(n, 1) if n else np.arange(0)
    raise ValueError(f"remainder must be pad, drop or uneven, got {remainder!r}")


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from an MPI or Slurm launcher's environment, for a script that runs under `mpiexec`
    or `srun` without torch.distributed (webdataset only looks at torch.distributed and RANK/WORLD_SIZE)."""
    for rank_var, size_var in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` Selection rows in ``epoch``: what every rank and worker agrees on."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class SelectionReader:
    """Iterable over the samples of a Selection; picklable, so it works in DataLoader workers."""

    table: pa.Table
    dataset: Path | str  # a directory, or the URL of a published dataset
    rank: int | None = None
    world_size: int | None = None
    remainder: str = "pad"
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    scan_fraction: float = 0.5  # read a shard whole when at least this fraction of its bytes is wanted
    cache: ShardCache | None = None  # whole shards of a published dataset, kept on local disk
    gap: int = GAP  # remote ranges closer than this are fetched as one
    window_bytes: int = 64 << 20  # a remote epoch is fetched this much at a time, the next window while one is read
    # The table's columns as numpy, made once per process (a DataLoader worker converts them once, not per batch).
    _column_cache: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    # Fetches started by prefetch(rows), by the rows' bytes, for iter_rows(rows) to take (a published dataset).
    _ahead: dict[bytes, Future] = field(default_factory=dict, init=False, repr=False, compare=False)
    _shards_bytes: int | None = field(default=None, init=False, repr=False, compare=False)  # all its shards, once

    def order(self) -> np.ndarray:
        """The global sample order: a function of (seed, epoch, selection) only."""
        n = self.table.num_rows
        return epoch_order(n, self.seed, self.epoch) if self.shuffle else np.arange(n)

    def my_rows(self) -> np.ndarray:
        rank, world, worker, workers = pytorch_worker_info()
        if world == 1:
            rank, world = launcher_rank()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        slot, slots = rank * workers + worker, world * workers
        return self.order()[partition(self.table.num_rows, slot, slots, self.remainder)]

    def __len__(self) -> int:
        return len(self.my_rows())

    def __call__(self) -> Iterator[dict]:
        # webdataset's DataPipeline calls its first stage to get the source iterator.
        return iter(self)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_rows(self.my_rows())

    def _columns(self) -> dict[str, np.ndarray]:
        if self._column_cache is None:
            self._column_cache = {c: self.table.column(c).to_numpy(zero_copy_only=False) for c in _REQUIRED}
            # The IR member's name: a Selection made before 2026-12-05 has no ir_member; its samples hold ir.npy.
            self._column_cache["ir_member"] = (
                self.table.column("ir_member").fill_null(IR_MEMBER).to_numpy(zero_copy_only=False)
                if "ir_member" in self.table.column_names else np.full(self.table.num_rows, IR_MEMBER, dtype=object)
            )
            # The shard's sha256 checks a whole-shard fetch (a Selection made before 2026-12-05 has none).
            self._column_cache["shard_sha256"] = (
                self.table.column("shard_sha256").fill_null("").to_numpy(zero_copy_only=False)
                if "shard_sha256" in self.table.column_names else np.full(self.table.num_rows, "", dtype=object)
            )
        return self._column_cache

    def prefetch(self, rows: np.ndarray) -> None:
        """Start fetching these rows of a published dataset now, so that a later ``iter_rows(rows)`` (the next
        batch) finds them on the way while this one is decoded; nothing to do for a local dataset."""
        if not is_remote(str(self.dataset)) or len(rows) == 0 or len(self._ahead) >= _AHEAD_AT_MOST:
            return
        columns = self._columns()
        first = _windows(_runs(rows, columns["shard"]), columns, self.window_bytes)[0]
        self._ahead[rows.tobytes()] = submit(self._fetch(storage(str(self.dataset)), first, columns))

    def iter_rows(self, rows: np.ndarray) -> Iterator[dict]:
        """The samples at these row indices of the Selection, in exactly this order (a training batch, say)."""
        if len(rows) == 0:
            return
        columns = self._columns()
        runs = _runs(rows, columns["shard"])
        if is_remote(str(self.dataset)):
            yield from self._iter_remote(runs, columns, self._ahead.pop(rows.tobytes(), None))
            return
        shards_dir = Path(self.dataset) / "shards"
        for shard, run_rows in runs:
            yield from self._read_local(shards_dir / shard, run_rows, columns)

    def _read_local(self, path: Path, rows: np.ndarray, columns: dict[str, np.ndarray]) -> Iterator[dict]:
        """One run of rows from a shard on disk: one pread a sample, or one map of the shard when most is wanted."""
        expected_size = int(columns["shard_bytes"][rows[0]])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ShardReadError(f"{path}: cannot open shard: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != expected_size:
                raise ShardReadError(
                    f"{path}: {size} bytes on disk, catalog says {expected_size} (truncated or rewritten; "
                    "run `shards verify`)"
                )
            wanted = int(columns["sample_length"][rows].sum())
            whole = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size and wanted >= self.scan_fraction * size else None
            starts = columns["sample_offset"][rows].astype(np.int64)
            ends = starts + columns["sample_length"][rows].astype(np.int64)
            spans = ((whole[a:b] if whole is not None else os.pread(fd, b - a, a))
                     for a, b in zip(starts.tolist(), ends.tolist()))
            yield from _samples(str(path), path.name, rows, spans, columns)
            if whole is not None:
                whole.close()
        finally:
            os.close(fd)

    def _iter_remote(self, runs: list[tuple[str, np.ndarray]], columns: dict[str, np.ndarray],
                     started: Future | None) -> Iterator[dict]:
        """Runs of rows from a published dataset, a window of them fetched at once while the previous is yielded
        (the first window's fetch may have been ``started`` by prefetch)."""
        store = storage(str(self.dataset))
        windows = _windows(runs, columns, self.window_bytes)
        pending = started if started is not None else submit(self._fetch(store, windows[0], columns))
        for i, window in enumerate(windows):
            spans = pending.result()
            if i + 1 < len(windows):
                pending = submit(self._fetch(store, windows[i + 1], columns))
            for (shard, rows), run_spans in zip(window, spans):
                url = store.object_url(f"shards/{shard}")
                yield from _samples(url, url, rows, run_spans, columns)

    def _fetch(self, store: Storage, window: list[tuple[str, np.ndarray]], columns: dict[str, np.ndarray]):
        reads = []
        for shard, rows in window:
            starts = columns["sample_offset"][rows].astype(np.int64)
            reads.append(ShardRead(shard, int(columns["shard_bytes"][rows[0]]),
                                   columns["shard_sha256"][rows[0]] or None,
                                   starts, starts + columns["sample_length"][rows].astype(np.int64)))
        return fetch_reads(store, reads, scan_fraction=self._remote_scan_fraction(columns), gap=self.gap,
                           cache=self.cache)

    def _remote_scan_fraction(self, columns: dict[str, np.ndarray]) -> float:
        """With a cache that holds every shard of the Selection, each shard is fetched whole once and read from
        disk after (the anchors' download-once, for multi-epoch runs); otherwise only what is wanted comes."""
        if self.cache is None:
            return self.scan_fraction
        if self._shards_bytes is None:  # once per process, not per batch: it looks at the whole Selection
            _, first = np.unique(columns["shard"], return_index=True)
            self._shards_bytes = int(columns["shard_bytes"][first].sum())
        return 0.0 if self._shards_bytes <= self.cache.limit_bytes else self.scan_fraction


def _runs(rows: np.ndarray, shards: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Consecutive rows in the same shard, as (shard, rows): each run is one open file or one gathered fetch."""
    if len(rows) == 0:
        return []
    names = shards[rows]
    cuts = np.flatnonzero(names[1:] != names[:-1]) + 1
    return [(str(names[a]), rows[a:b]) for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)])]


def _windows(runs: list[tuple[str, np.ndarray]], columns: dict[str, np.ndarray],
             window_bytes: int) -> list[list[tuple[str, np.ndarray]]]:
    """Runs grouped so that each group wants about ``window_bytes`` (a run is never split)."""
    windows: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for shard, rows in runs:
        if windows[-1] and size >= window_bytes:
            windows.append([])
            size = 0
        windows[-1].append((shard, rows))
        size += int(columns["sample_length"][rows].sum())
    return windows


def _samples(url: str, name: str, rows: np.ndarray, spans: Iterable, columns: dict[str, np.ndarray]) -> Iterator[dict]:
    """Sample dicts from each row's bytes, every member checked against its USTAR header before it is yielded."""
    for row, span in zip(rows, spans):
        key = columns["key"][row]
        offset, length = int(columns["sample_offset"][row]), int(columns["sample_length"][row])
        if len(span) != length:
            raise ShardReadError(f"{name} {key}: wanted {length} bytes at {offset}, shard ends first")
        view = memoryview(span)
        sample = {"__key__": key, "__url__": url, "__local_path__": url}
        for member, prefix in zip((columns["ir_member"][row], JSON_MEMBER, RGB_MEMBER), _PREFIXES):
            data_at = int(columns[f"{prefix}_offset"][row]) - offset
            data_size = int(columns[f"{prefix}_size"][row])
            header = bytes(view[max(data_at - BLOCK, 0) : max(data_at, 0)])
            member_name = f"{key}.{member}"
            if not _header_matches(header, member_name.encode(), data_size):
                problem = check_member_header(header, member_name, data_size) or "tar header does not match"
                raise ShardReadError(f"{name} {key}: {problem}")
            if data_at + data_size > length:
                raise ShardReadError(f"{name} {key}: {member} runs past the sample's recorded length")
            sample[member] = view[data_at : data_at + data_size].tobytes()
        yield sample


def read_selection(
    selection: str | os.PathLike[str] | pa.Table,
    dataset: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    remainder: str = "pad",
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    decode: str | None = None,
    cache: ShardCache | None = None,
) -> FluidWrapper:
    """A webdataset pipeline over a Selection; ``decode`` (e.g. ``"rgb8"``) adds ``wds.decode(decode)``.

    It has webdataset's fluid interface, so it composes like ``wds.WebDataset``:
    ``read_selection(sel).decode("rgb8").to_tuple("rgb.jpg", "ir.npy.gz;ir.npy").batched(16)`` (samples of datasets
    built before 2026-12-05 hold ``ir.npy``; webdataset takes the first of the ``;``-separated names a sample has).
    Rank and world size default to what webdataset detects (torch.distributed or RANK/WORLD_SIZE); DataLoader
    workers are detected inside each worker.
    """
    table, root = load_selection(selection, dataset)
    pipeline = FluidWrapper(SelectionReader(table, root, rank, world_size, remainder, shuffle, seed, epoch,
                                            cache=cache))
    return pipeline.decode(decode) if decode else pipeline
