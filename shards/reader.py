"""Read a Selection straight from shard byte ranges (DESIGN.md "Selection and reading").

``read_selection(selection)`` yields the same sample dicts stock ``webdataset.WebDataset`` yields
(``__key__``, ``__url__``, ``__local_path__``, ``ir.npy``, ``json``, ``rgb.jpg`` as bytes), but reads only the
selected samples: one ``pread`` per sample, grouped by shard in offset order, or one sequential read of the
whole shard when most of it is selected. Every member is checked against its USTAR header and the shard's
size against the catalog, so a truncated or rewritten shard fails loudly, naming the shard and the sample.

Work is split across ranks and DataLoader workers so that every reader gets exactly the same number of
samples (``remainder="pad"`` repeats samples from the start of the order to fill; ``"drop"`` leaves the
remainder out; ``"uneven"`` gives every sample exactly once with counts differing by at most one).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.compat import FluidWrapper
from webdataset.utils import pytorch_worker_info

from shards.layout import BLOCK, MEMBERS
from shards.verify import check_member_header

__all__ = ["ShardReadError", "SelectionReader", "read_selection", "load_selection", "partition", "epoch_order"]

_REQUIRED = ("key", "shard", "shard_bytes", "sample_offset", "sample_length", "ir_offset", "ir_size",
             "json_offset", "json_size", "rgb_offset", "rgb_size")
_PREFIX = {member: member.split(".")[0] for member in MEMBERS}  # "ir.npy" -> "ir" (column prefix)


class ShardReadError(IOError):
    """A shard does not hold what the catalog says; the message names the shard and the sample."""


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
    return table, Path(dataset)


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
    dataset: Path
    rank: int | None = None
    world_size: int | None = None
    remainder: str = "pad"
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    scan_fraction: float = 0.5  # read a shard whole when at least this fraction of its bytes is wanted
    # The table's columns as numpy, made once per process (a DataLoader worker converts them once, not per batch).
    _column_cache: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

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
        return self._column_cache

    def iter_rows(self, rows: np.ndarray) -> Iterator[dict]:
        """The samples at these row indices of the Selection, in exactly this order (a training batch, say)."""
        if len(rows) == 0:
            return
        columns = self._columns()
        shards_dir = self.dataset / "shards"
        # Consecutive runs of rows in the same shard share one open file (and maybe one whole-shard read).
        start = 0
        while start < len(rows):
            shard = columns["shard"][rows[start]]
            end = start
            while end < len(rows) and columns["shard"][rows[end]] == shard:
                end += 1
            yield from self._read_run(shards_dir / shard, rows[start:end], columns)
            start = end

    def _read_run(self, path: Path, rows: np.ndarray, columns: dict[str, np.ndarray]) -> Iterator[dict]:
        name = path.name
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
            # Most of the shard wanted: map it once and slice, rather than one read per sample.
            whole = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size and wanted >= self.scan_fraction * size else None
            url = str(path)
            for row in rows:
                key = columns["key"][row]
                offset, length = int(columns["sample_offset"][row]), int(columns["sample_length"][row])
                span = whole[offset : offset + length] if whole is not None else os.pread(fd, length, offset)
                if len(span) != length:
                    raise ShardReadError(f"{name} {key}: wanted {length} bytes at {offset}, shard ends first")
                view = memoryview(span)
                sample = {"__key__": key, "__url__": url, "__local_path__": url}
                for member, prefix in _PREFIX.items():
                    data_at = int(columns[f"{prefix}_offset"][row]) - offset
                    data_size = int(columns[f"{prefix}_size"][row])
                    header = span[data_at - BLOCK : data_at]
                    member_name = f"{key}.{member}"
                    if not _header_matches(header, member_name.encode(), data_size):
                        problem = check_member_header(header, member_name, data_size) or "tar header does not match"
                        raise ShardReadError(f"{name} {key}: {problem}")
                    if data_at + data_size > length:
                        raise ShardReadError(f"{name} {key}: {member} runs past the sample's recorded length")
                    sample[member] = view[data_at : data_at + data_size].tobytes()
                yield sample
            if whole is not None:
                whole.close()
        finally:
            os.close(fd)


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
) -> FluidWrapper:
    """A webdataset pipeline over a Selection; ``decode`` (e.g. ``"rgb8"``) adds ``wds.decode(decode)``.

    It has webdataset's fluid interface, so it composes like ``wds.WebDataset``:
    ``read_selection(sel).decode("rgb8").to_tuple("rgb.jpg", "ir.npy").batched(16)``.
    Rank and world size default to what webdataset detects (torch.distributed or RANK/WORLD_SIZE); DataLoader
    workers are detected inside each worker.
    """
    table, root = load_selection(selection, dataset)
    pipeline = FluidWrapper(SelectionReader(table, root, rank, world_size, remainder, shuffle, seed, epoch))
    return pipeline.decode(decode) if decode else pipeline
