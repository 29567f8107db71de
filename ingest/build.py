"""`ingest build-shards`: raw SAGE downloads -> WebDataset shards + one committed catalog part per run.

Order of work (DESIGN.md): lock the dataset; remove what a killed run left; scan RAW; join metadata; plan
frames; write them into shards in (VSN, ts_ns) order with worker processes (ingest/share.py); rename the
shards into place; commit the run's catalog part by rename; compact the catalog. Every raw file ends with
exactly one decision.

Under ``mpiexec -n R`` (on a filesystem every rank sees) rank 0 does all of that except the frames: it sends
each rank a consecutive share of them, balanced by bytes; every rank writes its share into shards of its own
with its own workers; rank 0 gathers what they wrote, names the shards in rank order and commits one catalog
part. Every decision that changes what a rank does next is rank 0's and reaches all ranks at the same step
(ingest/collective.py): a rank that fails fails the run with nothing committed and every rank exiting non-zero,
and a rank that dies is ended with the others by the launcher; the next run, with any R, removes what was left
and does the work.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.location import load_nodes_csv, node_periods, splits
from catalog.maintain import location_table, set_nodes_locked, write_snapshot
from catalog.query import Catalog
from catalog.runinfo import dump_config, provenance
from catalog.schema import FILES, LOCATION_COLUMNS, NODES, RUNS, SAMPLES, SHARDS
from catalog.store import DatasetLayout, dataset_lock, write_parts
from ingest.collective import BuildError, Ranks, describe
from ingest.config import IngestConfig
from ingest.frames import FileDecision, FrameTask, RawFile, metadata_file_kind, plan_frames
from ingest.metadata import UPLOAD_COLUMNS, MetadataError, UploadRecord, read_metadata_frame, read_upload_records
from ingest.naming import ROLE_OTHER, ROLE_RGB, ROLE_THERMAL, classify_name, is_sky_position, parse_raw_path
from ingest.process import FrameResult
from ingest.share import ShareOutcome, ShareStopped, split_by_bytes, write_share
from shards.layout import IR_MEMBERS, JSON_MEMBER, RGB_MEMBER, shard_index, shard_name
from shards.writer import ShardRecord, fsync_dir

__all__ = ["BuildSummary", "BuildError", "build_shards", "scan_raw"]

# Rejects decided by decoding; an unchanged file keeps its decision without being decoded again.
_DECODE_REASONS = {"corrupt_jpeg", "bad_csv_header", "bad_csv_shape", "non_numeric", "out_of_range", "too_many_nan"}


_COMPACT_AFTER_RUNS = 4


@dataclass
class BuildSummary:
    run_id: str
    files_seen: int = 0
    files_new: int = 0
    samples_added: int = 0
    frames_decoded: int = 0
    shards_added: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    reason_counts: dict[str, int] = field(default_factory=dict)
    samples_per_node: dict[str, int] = field(default_factory=dict)
    unlocated_vsns: list[str] = field(default_factory=list)
    removed_uncommitted: list[str] = field(default_factory=list)
    plan_seconds: float = 0.0  # lock, clean-up, catalog state, scan, metadata join, plan: before any decoding
    decode_seconds: float = 0.0  # every rank's share decoded into shards, placed in shards/
    commit_seconds: float = 0.0  # catalog tables built and committed (the rest of the run)
    share_seconds: list[float] = field(default_factory=list)  # per rank: its share's frames to assembled shards
    workers: list[int] = field(default_factory=list)  # per rank
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames_decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


def scan_raw(raw_dir: Path) -> list[RawFile]:
    """Every regular file under RAW (hidden files included: they must be accounted for too), sorted.

    Directory symlinks are not followed; file symlinks count with their target's size. (os.scandir and plain
    strings: a year of uploads is millions of files, and pathlib costs several times more per file.)
    """
    files = []
    pending = [(str(raw_dir), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, prefix + entry.name + "/"))
                elif entry.is_file():
                    files.append(RawFile(prefix + entry.name, entry.stat().st_size))
            except OSError:
                continue
    files.sort(key=lambda f: f.path)
    return files


def _frame_pair_name(filename: str) -> bool:
    """Planning looks up the records of optical JPEGs and celsius CSVs only."""
    return classify_name(filename).role in (ROLE_RGB, ROLE_THERMAL)


def _load_uploads(raw_dir: Path, files: list[RawFile], to_plan: list[RawFile]) -> tuple[dict, dict]:
    """Upload records of the frames in ``to_plan`` (from every metadata file in ``files``), and each metadata
    file's status."""
    timestamps = None  # every record: the run plans every file
    if len(to_plan) < len(files):
        stamps = {p.ts_ns for f in to_plan if (p := parse_raw_path(f.path)) is not None}
        timestamps = np.array(sorted(t for t in stamps if t < 2**63), np.int64)  # records hold int64 ns
    uploads: dict[tuple[str, int, str], UploadRecord] = {}
    status: dict[str, tuple[str, str | None, str | None]] = {}
    for raw in files:
        if metadata_file_kind(raw.path) != "metadata":
            continue
        try:
            frame = read_metadata_frame(raw_dir / raw.path, UPLOAD_COLUMNS)
            records, count = read_upload_records(frame, raw.path, timestamps, keep_name=_frame_pair_name)
        except MetadataError as exc:
            status[raw.path] = ("rejected", "unreadable", str(exc))
            continue
        for record in records:
            uploads.setdefault((record.vsn, record.ts_ns, record.filename), record)
        status[raw.path] = ("ignored", "metadata", f"{count} upload records")
    return uploads, status


@dataclass(frozen=True)
class _State:
    files: pa.Table  # the catalog's latest row per raw file (FILES): columns, not a dict per file
    sample_keys: set[str]
    shard_names: set[str]
    next_shard: int
    nodes: pa.Table
    has_samples: bool
    samples_per_node: Counter[str]


def _current_state(layout: DatasetLayout) -> _State:
    if not layout.exists():
        return _State(FILES.empty_table(), set(), set(), 0, NODES.empty_table(), False, Counter())
    with Catalog(layout.root) as catalog:
        files = catalog.query("SELECT * FROM files")
        keys = set(catalog.query("SELECT key FROM samples").column("key").to_pylist())
        per_node = catalog.query("SELECT vsn, count(*) AS n FROM samples GROUP BY vsn").to_pylist()
        shards = catalog.query("SELECT name FROM shards").column("name").to_pylist()
        nodes = catalog.nodes()
    numbers = [shard_index(name) for name in shards]
    next_shard = max((n for n in numbers if n is not None), default=-1) + 1
    return _State(files, keys, set(shards), next_shard, nodes, bool(keys),
                  Counter({row["vsn"]: row["n"] for row in per_node}))


@dataclass(frozen=True)
class _Settled:
    """Raw files whose recorded decision stands without planning them again: samples, and files ignored for their
    name alone (a frame's siblings, files outside the layout) that still have the recorded size. An incremental
    run over a RAW of millions of files handles only the rest in Python."""

    to_plan: list[RawFile]  # the scanned files that are not settled, in scan order
    count: int
    status_counts: Counter[str]
    new: int  # scanned files the catalog has never seen
    previous: dict[str, dict]  # the recorded rows of the files to plan (those the catalog has seen)


def _settle(files: list[RawFile], recorded: pa.Table) -> _Settled:
    if recorded.num_rows == 0 or not files:
        return _Settled(list(files), 0, Counter(), len(files), {})
    # Columns aligned with the scan (Arrow's hash lookup, not a Python dict of every recorded file).
    where = pc.index_in(pa.array([f.path for f in files], pa.string()),
                        value_set=recorded.column("path").cast(pa.string()).combine_chunks())
    seen = pc.is_valid(where)
    rows = pc.fill_null(where, 0)
    status = recorded.column("status").take(rows)
    by_name = pc.and_(
        pc.and_(pc.equal(status, "ignored"), pc.equal(recorded.column("role").take(rows), ROLE_OTHER)),
        pc.equal(recorded.column("bytes").take(rows), pa.array([f.bytes for f in files], pa.int64())),
    )
    settled = pc.fill_null(pc.and_(seen, pc.or_(pc.equal(status, "sample"), by_name)), False)
    to_plan = [f for f, done in zip(files, settled.to_numpy(zero_copy_only=False)) if not done]
    seen_to_plan = pc.filter(where, pc.and_(seen, pc.invert(settled)))
    return _Settled(
        to_plan=to_plan,
        count=len(files) - len(to_plan),
        status_counts=Counter(pc.filter(status, settled).to_pylist()),
        new=len(files) - pc.sum(seen.cast(pa.int64())).as_py(),
        previous={row["path"]: row for row in recorded.take(seen_to_plan).select(FILES.names).to_pylist()},
    )


def _same_nodes(a: pa.Table, b: pa.Table) -> bool:
    cols = ["vsn", "node_id", "lat", "lon", "valid_from", "valid_to"]
    rows = lambda t: sorted(map(tuple, (r.values() for r in t.select(cols).to_pylist())), key=repr)  # noqa: E731
    return rows(a) == rows(b)


def _files_table(decisions: list[FileDecision], run_id: str) -> pa.Table:
    """The catalog's ``files`` rows of ``decisions``, column by column: a dict a row would add to rank 0's peak
    memory for every raw file of a first build."""
    columns = {name: [getattr(d, name) for d in decisions] for name in FILES.names if name != "ingest_run"}
    return pa.table({**columns, "ingest_run": [run_id] * len(decisions)}, schema=FILES)


def _decision_from_row(row: dict) -> FileDecision:
    """A file's decision as the catalog recorded it (carried into this run unchanged)."""
    return FileDecision(**{k: v for k, v in row.items() if k in FileDecision.__dataclass_fields__})


def _carry_over_rejects(tasks: list[FrameTask], previous: dict[str, dict]) -> tuple[list[FrameTask], list[FileDecision]]:
    """Frames to decode, and the earlier decisions of frames whose decode-stage reject cannot have changed.

    A frame rejected while decoding (corrupt JPEG, bad CSV, ...) whose two files still have the same sizes keeps
    its decision without a second decode; `--recheck-rejects` decodes them anyway (e.g. after a config change).
    """
    to_decode, carried = [], []
    for task in tasks:
        rgb, thermal = previous.get(task.rgb_path), previous.get(task.thermal_path)
        unchanged_reject = (
            rgb is not None and thermal is not None
            and rgb["status"] == thermal["status"] == "rejected"
            and rgb["reason"] in _DECODE_REASONS and rgb["reason"] == thermal["reason"]
            and rgb["bytes"] == task.rgb_bytes and thermal["bytes"] == task.thermal_bytes
        )
        if unchanged_reject:
            carried += [_decision_from_row(rgb), _decision_from_row(thermal)]
        else:
            to_decode.append(task)
    return to_decode, carried


def _changed(decision: FileDecision, previous: dict | None) -> bool:
    if previous is None:
        return True
    return any(getattr(decision, k) != previous.get(k) for k in ("bytes", "status", "reason", "detail", "key", "role"))


@dataclass(frozen=True)
class _Build:
    """What one build was asked to do: build_shards' arguments, with the paths resolved."""

    raw: Path
    root: Path  # DATASET
    config: IngestConfig
    nodes_csv: Path | None  # None: keep the catalog's nodes
    argv: tuple[str, ...] | None
    progress: bool
    recheck_rejects: bool
    log: Callable[[str], None]


@dataclass(frozen=True)
class _SharePlan:
    """What one rank writes."""

    run_id: str
    raw: str
    work_dir: str
    share: list[FrameTask]
    config: IngestConfig


@dataclass(frozen=True)
class _ShareFailed:
    rank: int
    error: str
    stopped: bool = False  # given up because another rank's share failed


@dataclass(frozen=True)
class _Plan:
    """Rank 0's plan of a run: the frames to decode and the decision on every other file it had to decide."""

    files_seen: int
    settled: _Settled
    tasks: list[FrameTask]  # in (VSN, ts_ns) order, with nodes.csv's node ids
    decisions: list[FileDecision]


@dataclass(frozen=True)
class _Decoded:
    """Every rank's shares, placed under ``shards/``: the new samples' rows and the decoded frames' decisions."""

    sample_rows: list[dict]
    shard_records: list[ShardRecord]
    decisions: list[FileDecision]
    share_seconds: list[float]
    workers: list[int]


@dataclass(frozen=True)
class _Run:
    """A run under way, from the moment it holds the lock."""

    build: _Build
    layout: DatasetLayout
    state: _State  # the catalog as the run found it
    run_id: str
    started: datetime
    removed_uncommitted: list[str]  # what an interrupted run had left, removed by this one


@dataclass(frozen=True)
class _Nodes:
    table: pa.Table  # the node locations this run uses
    changed: bool  # they differ from the catalog's: the run's part records them


@dataclass(frozen=True)
class _Commit:
    """What the committed catalog part holds, as the summary reports it."""

    samples: pa.Table
    status_counts: Counter[str]
    reason_counts: dict[str, int]


class _Clock:
    """A run's start (wall clock for the catalog, monotonic for the phases) and the end of its first two phases."""

    def __init__(self) -> None:
        self.started = datetime.now(timezone.utc)
        self.t_start = time.perf_counter()
        self.plan_seconds = self.decode_seconds = 0.0

    def planned(self) -> None:
        self.plan_seconds = time.perf_counter() - self.t_start

    def decoded(self) -> None:
        self.decode_seconds = time.perf_counter() - self.t_start - self.plan_seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.t_start


def _workers(config: IngestConfig, ranks: Ranks) -> int:
    """Worker processes per rank: the configured number; else the cores this rank may run on (a batch system's
    binding, e.g. Slurm's --cpus-per-task), or, when every rank of the node may use every core, its share."""
    if config.workers:
        return config.workers
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if allowed >= (os.cpu_count() or 1):
        allowed //= ranks.local_size
    return max(1, allowed)


def _write_share(ranks: Ranks, plan: _SharePlan, progress: bool) -> ShareOutcome | _ShareFailed:
    """This rank's share written into shards, or why it could not be. A failed share raises the alarm, so the other
    ranks give theirs up; under MPI even an interrupt is reported that way, since this rank must still reach the
    step where the outcomes are collected."""
    alone = ranks.size == 1  # no other rank to stop for; an interrupt goes straight through
    stop_early = {} if alone else {"stop_early": ranks.alarmed}
    try:
        with ranks.watching():
            return write_share(plan.share, Path(plan.raw), plan.config, _workers(plan.config, ranks),
                               Path(plan.work_dir), f"r{ranks.rank:04d}", progress, **stop_early)
    except ShareStopped as exc:
        return _ShareFailed(ranks.rank, str(exc), stopped=True)
    except BaseException as exc:  # noqa: BLE001 - reported by rank 0, which commits nothing
        if alone and not isinstance(exc, Exception):
            raise
        ranks.raise_alarm()
        return _ShareFailed(ranks.rank, describe(exc))


def _checked_outcomes(ranks: Ranks, outcomes: list[ShareOutcome | _ShareFailed]) -> list[ShareOutcome]:
    """Rank 0: every rank's outcome, or one BuildError naming each rank that failed (not those that gave up their
    share because of it) and why."""
    failed = [o for o in outcomes if isinstance(o, _ShareFailed)]
    if failed:
        first = [f for f in failed if not f.stopped] or failed
        where = (lambda f: f"rank {f.rank}: ") if ranks.size > 1 else (lambda f: "")
        raise BuildError("; ".join(where(f) + f.error for f in first) + "; nothing was committed")
    return outcomes


def _follow(ranks: Ranks) -> None:
    """Ranks other than 0: write the share rank 0 hands out, report it, wait for rank 0's commit."""
    plan: _SharePlan = ranks.receive_share()
    ranks.collect(_write_share(ranks, plan, progress=False))
    ranks.receive_verdict()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Rank 0's run without the cyclic garbage collector (see :func:`_collector_for_workers` for the decode).

    Planning and committing make a few small objects for every raw file and keep them all alive (millions in a
    year of uploads), and every full collection walks every one of them again, so the collections grow with the
    RAW. Those objects hold no cycles; what little cyclic garbage a run makes is collected once the collector is
    back.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _collector_for_workers() -> Iterator[None]:
    """The decode, inside :func:`_collector_paused`: the plan's objects frozen (no collection walks them), the
    collector on, so the forked workers start with it on (they catch exceptions, whose tracebacks are cycles) and
    never write to the pages of the parent's objects they share (Python's documented advice for ``gc.freeze``).
    Objects a caller froze before stay frozen: then nothing more is frozen, since unfreezing is all or nothing."""
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        gc.disable()
        if freeze:
            gc.unfreeze()


def build_shards(
    raw_dir: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    config: IngestConfig = IngestConfig(),
    nodes_csv: str | os.PathLike[str] | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    recheck_rejects: bool = False,
    log: Callable[[str], None] = print,
    ranks: Ranks | None = None,
) -> BuildSummary | None:
    """Ingest RAW into DATASET; see the module docstring. Raises BuildError or DatasetLocked before writing.

    Under ``mpiexec -n R`` (R > 1) every rank calls this with the same arguments (and ``ranks``, when the caller
    started them already): rank 0 returns the summary, the others None once rank 0 has committed, and RankStopped
    when it did not (rank 0 raises why).
    """
    build = _Build(
        raw=Path(raw_dir).resolve(), root=Path(dataset).resolve(), config=config,
        nodes_csv=None if nodes_csv is None else Path(nodes_csv), argv=None if argv is None else tuple(argv),
        progress=progress, recheck_rejects=recheck_rejects, log=log,
    )
    ranks = ranks if ranks is not None else Ranks.start()
    return ranks.run(lead=lambda: _lead_with_collector_paused(ranks, build), follow=lambda: _follow(ranks))


def _lead_with_collector_paused(ranks: Ranks, build: _Build) -> BuildSummary:
    with _collector_paused():
        return _lead(ranks, build)


def _lead(ranks: Ranks, build: _Build) -> BuildSummary:
    """Rank 0's build: check the inputs, lock, plan, have every rank decode its share, commit one catalog part."""
    clock = _Clock()
    new_nodes = _checked_inputs(build)
    with dataset_lock(build.root, f"ingest build-shards {build.raw}"):
        run = _begin(build, clock.started)
        nodes = _nodes_of_run(run, new_nodes)
        plan = _plan(run, nodes.table)
        clock.planned()
        decoded = _decode(ranks, run, plan.tasks)
        clock.decoded()
        commit = _commit(run, plan, decoded, nodes)
    return _summary(run, clock, plan, decoded, commit)


def _checked_inputs(build: _Build) -> pa.Table | None:
    """BuildError, before anything is written, for a RAW that is not there, paths that contain each other or a bad
    nodes.csv; else the nodes.csv's table (None without one)."""
    raw, root = build.raw, build.root
    if not raw.is_dir():
        raise BuildError(f"{raw}: RAW directory does not exist")
    if root == raw or root.is_relative_to(raw) or raw.is_relative_to(root):
        raise BuildError(f"DATASET {root} and RAW {raw} must not contain each other")
    if build.nodes_csv is None:
        return None
    try:
        return load_nodes_csv(build.nodes_csv)
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def _begin(build: _Build, started: datetime) -> _Run:
    """Under the lock: the catalog's state, the run's id, and what an interrupted run left removed (and logged)."""
    layout = DatasetLayout(build.root)
    state = _current_state(layout)
    run_id = layout.next_run_id()
    removed = layout.remove_uncommitted(state.shard_names)
    for path in removed:
        build.log(f"removed uncommitted {path} (left by an interrupted run)")
    return _Run(build, layout, state, run_id, started, removed)


def _nodes_of_run(run: _Run, new_nodes: pa.Table | None) -> _Nodes:
    """The node locations this run uses; changed ones are applied to the catalog's samples first (their location
    columns recomputed)."""
    state = run.state
    if new_nodes is None or _same_nodes(new_nodes, state.nodes):
        return _Nodes(state.nodes, changed=False)
    if state.has_samples:
        run.build.log(f"nodes differ from the catalog's: recomputing location columns of {len(state.sample_keys)} "
                      "samples")
        set_nodes_locked(run.layout, new_nodes)
    return _Nodes(new_nodes, changed=True)


def _plan(run: _Run, nodes: pa.Table) -> _Plan:
    """Scan RAW, leave settled files be, join the upload metadata and plan frames; a frame whose decode-stage
    reject cannot have changed keeps its decision unless the build rechecks rejects."""
    raw = run.build.raw
    files = scan_raw(raw)
    settled = _settle(files, run.state.files)
    uploads, metadata_status = _load_uploads(raw, files, settled.to_plan)
    tasks, decisions = plan_frames(settled.to_plan, uploads, run.state.sample_keys, metadata_status)
    if not run.build.recheck_rejects:
        tasks, carried = _carry_over_rejects(tasks, settled.previous)
        decisions += carried
    return _Plan(len(files), settled, _with_node_ids(tasks, nodes), decisions)


def _with_node_ids(tasks: list[FrameTask], nodes: pa.Table) -> list[FrameTask]:
    """nodes.csv's node id for the period wins over the upload metadata's (it is the one users correct)."""
    period = node_periods([t.vsn for t in tasks], [t.ts_ns for t in tasks], nodes)
    node_ids = nodes.column("node_id").to_pylist() + [None]
    return [t if node_ids[p] in (None, t.node_id) else replace(t, node_id=node_ids[p]) for t, p in zip(tasks, period)]


def _decode(ranks: Ranks, run: _Run, tasks: list[FrameTask]) -> _Decoded:
    """Hand every rank a consecutive share of ``tasks``, write rank 0's own, collect every rank's outcome and place
    the shards under ``shards/`` in rank order. The work directory is gone afterwards, whatever happened."""
    build = run.build
    work_dir = run.layout.shards_dir / f"{run.run_id}.tmp"
    shares = split_by_bytes(tasks, ranks.size)
    mine = ranks.hand_out([_SharePlan(run.run_id, str(build.raw), str(work_dir), share, build.config)
                           for share in shares])
    try:
        with _collector_for_workers():
            outcome = _write_share(ranks, mine, build.progress)
        outcomes = _checked_outcomes(ranks, ranks.collect(outcome))
        rows, records, decisions = _place_shards(
            shares, outcomes, run.layout, build.config.shard_prefix, run.state.next_shard, run.run_id
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return _Decoded(rows, records, decisions, [o.seconds for o in outcomes], [o.workers for o in outcomes])


def _check_accounting(decisions: list[FileDecision], settled: _Settled) -> None:
    """A bug, never bad input: refuse to commit a catalog that loses or doubles a file."""
    to_plan = settled.to_plan
    if len(decisions) != len(to_plan) or {d.path for d in decisions} != {f.path for f in to_plan}:
        raise RuntimeError(f"accounting failed: {len(decisions)} decisions for {len(to_plan)} raw files to decide "
                           f"({settled.count} more keep their recorded decision)")


def _commit(run: _Run, plan: _Plan, decoded: _Decoded, nodes: _Nodes) -> _Commit:
    """Write the run's catalog part (the commit), then compact the catalog once enough parts have piled up."""
    decisions = plan.decisions + decoded.decisions
    _check_accounting(decisions, plan.settled)
    commit = _Commit(
        samples=_samples_table(decoded.sample_rows, nodes.table, run.build.config),
        status_counts=Counter(d.status for d in decisions) + plan.settled.status_counts,
        reason_counts=dict(sorted(Counter(d.reason for d in decisions if d.status == "rejected").items())),
    )
    changed = [d for d in decisions if _changed(d, plan.settled.previous.get(d.path))]
    config_text, run_row = _run_row(run, plan, decoded, commit)
    tables = {
        "samples": commit.samples,
        "files": _files_table(changed, run.run_id),
        "shards": pa.Table.from_pylist([{**vars(r), "ingest_run": run.run_id} for r in decoded.shard_records],
                                       schema=SHARDS),
        "runs": pa.Table.from_pylist([run_row], schema=RUNS),
    }
    if nodes.changed:
        tables["nodes"] = nodes.table
    write_parts(run.layout.runs_dir / run.run_id, tables, texts={"config.toml": config_text})
    # Compaction is an optimisation (readers union a snapshot with the runs it does not cover), so it runs
    # once a few parts have piled up rather than after every run.
    if len(run.layout.uncovered_runs(run.layout.latest_snapshot())) >= _COMPACT_AFTER_RUNS:
        write_snapshot(run.layout)
    return commit


def _run_row(run: _Run, plan: _Plan, decoded: _Decoded, commit: _Commit) -> tuple[str, dict]:
    """The run's resolved configuration (with its provenance), and its ``runs`` row."""
    build = run.build
    prov = provenance(None if build.argv is None else list(build.argv),
                      packages=("pillow", "numpy", "pyarrow", "duckdb", "webdataset"))
    config_text = dump_config(build.config, extra={"run_id": run.run_id, "raw_dir": str(build.raw), **_flat(prov)})
    row = {
        "id": run.run_id, "started": run.started, "finished": datetime.now(timezone.utc),
        "argv": json.dumps(prov["argv"]), "version": prov["versions"]["sagepairs"], "git_sha": prov["git_sha"],
        "raw_dir": str(build.raw), "config": config_text, "files_seen": plan.files_seen,
        "files_new": plan.settled.new, "samples_added": len(decoded.sample_rows),
        "files_rejected": commit.status_counts.get("rejected", 0),
        "files_ignored": commit.status_counts.get("ignored", 0),
        "shards_added": len(decoded.shard_records), "reason_counts": json.dumps(commit.reason_counts),
    }
    return config_text, row


def _summary(run: _Run, clock: _Clock, plan: _Plan, decoded: _Decoded, commit: _Commit) -> BuildSummary:
    """What the run did, from what it read and added (opening the catalog again would cost more)."""
    per_node = run.state.samples_per_node + Counter(r["vsn"] for r in decoded.sample_rows)
    located = commit.samples.select(["vsn", "lat"]).to_pylist()
    seconds = clock.seconds()
    return BuildSummary(
        run_id=run.run_id, files_seen=plan.files_seen, files_new=plan.settled.new,
        samples_added=len(decoded.sample_rows), frames_decoded=len(plan.tasks),
        shards_added=len(decoded.shard_records), status_counts=dict(commit.status_counts),
        reason_counts=commit.reason_counts, samples_per_node=dict(sorted(per_node.items())),
        unlocated_vsns=sorted({r["vsn"] for r in located if r["lat"] is None}),
        removed_uncommitted=run.removed_uncommitted, plan_seconds=clock.plan_seconds,
        decode_seconds=clock.decode_seconds, commit_seconds=seconds - clock.plan_seconds - clock.decode_seconds,
        share_seconds=decoded.share_seconds, workers=decoded.workers, seconds=seconds,
    )


def _place_shards(
    shares: list[list[FrameTask]], outcomes: list[ShareOutcome], layout: DatasetLayout, prefix: str,
    first_index: int, run_id: str,
) -> tuple[list[dict], list[ShardRecord], list[FileDecision]]:
    """Name every rank's assembled shards in rank order and rename them into ``shards/``; the samples' rows
    (with their final shard and offsets) and every frame's two file decisions."""
    rows: list[dict] = []
    records: list[ShardRecord] = []
    decisions: list[FileDecision] = []
    index = first_index
    for share, outcome in zip(shares, outcomes):
        names = []
        for shard in outcome.shards:
            name = shard_name(prefix, index)
            index += 1
            os.rename(shard.path, layout.shards_dir / name)
            records.append(ShardRecord(name, shard.sha256, shard.bytes, len(shard.keys), shard.keys[0], shard.keys[-1]))
            names.append(name)
        for task, result in zip(share, outcome.results, strict=True):
            if result.rejected:
                decisions += _reject_decisions(task, result)
                continue
            shard, offset = outcome.where[task.key]
            rows.append(_sample_row(task, result, names[shard], offset, run_id))
            decisions.append(FileDecision(task.rgb_path, task.rgb_bytes, task.vsn, task.ts_ns, "rgb", "sample", key=task.key))
            decisions.append(
                FileDecision(task.thermal_path, task.thermal_bytes, task.vsn, task.ts_ns, "thermal", "sample", key=task.key)
            )
    fsync_dir(layout.shards_dir)
    return rows, records, decisions


def _flat(prov: dict) -> dict:
    out = {k: v for k, v in prov.items() if k != "versions"}
    out["argv"] = " ".join(prov["argv"])
    out.update({f"version_{k}": v for k, v in prov["versions"].items()})
    return out


def _reject_decisions(task: FrameTask, result: FrameResult) -> list[FileDecision]:
    out = []
    for path, size, role in ((task.rgb_path, task.rgb_bytes, "rgb"), (task.thermal_path, task.thermal_bytes, "thermal")):
        detail = result.detail if path == result.culprit else f"partner {result.culprit} was rejected ({result.reason})"
        out.append(FileDecision(path, size, task.vsn, task.ts_ns, role, "rejected", result.reason, detail, task.key))
    return out


def _sample_row(task: FrameTask, result: FrameResult, shard: str, offset: int, run_id: str) -> dict:
    """The sample's catalog row; ``offset``: its first byte in ``shard`` (members' offsets follow from it)."""
    place = result.placement
    ir_member = next(m for m in IR_MEMBERS if m in place.members)
    ir, js, rgb = place.members[ir_member], place.members[JSON_MEMBER], place.members[RGB_MEMBER]
    return {
        **task.provenance(),
        "is_sky": is_sky_position(task.position),
        "shard": shard,
        "sample_offset": offset,
        "sample_length": place.length,
        "ir_member": ir_member,
        "ir_offset": offset + ir.offset,
        "ir_size": ir.size,
        "json_offset": offset + js.offset,
        "json_size": js.size,
        "rgb_offset": offset + rgb.offset,
        "rgb_size": rgb.size,
        "ingest_run": run_id,
        **(result.stats or {}),
    }


def _samples_table(rows: list[dict], nodes: pa.Table, config: IngestConfig) -> pa.Table:
    if not rows:
        return SAMPLES.empty_table()
    vsn = np.array([r["vsn"] for r in rows], dtype=object)
    ts_ns = np.array([r["ts_ns"] for r in rows], dtype=np.int64)
    location = location_table([r["key"] for r in rows], vsn, ts_ns, nodes)
    split_labels = splits(vsn, ts_ns, (config.split.train, config.split.val, config.split.test))
    # Arrow converts the row dicts column by column (3x a list per column in Python at 50k rows).
    computed = {
        "time_utc": pa.array(ts_ns // 1000, pa.int64()).cast(pa.timestamp("us")).cast(SAMPLES.field("time_utc").type),
        "split": pa.array(split_labels.tolist(), pa.string()),
        **{name: location.column(name) for name in LOCATION_COLUMNS},
    }
    from_rows = pa.Table.from_pylist(rows, schema=pa.schema([f for f in SAMPLES if f.name not in computed]))
    columns = {name: computed[name] if name in computed else from_rows.column(name) for name in SAMPLES.names}
    return pa.table(columns).cast(SAMPLES)
