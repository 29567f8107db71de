"""`analysis embed`: both branches' embeddings of a catalog selection into Zarr, from one rank or many.

Preprocessing is training's evaluation view (``training.loader.EVAL_AUGMENT``: the whole frame, no flip, no
jitter, no IR noise) through the same ``BatchViews`` training uses, so analysis sees what the model was trained
on. Rows are in catalog order; chunk ``c`` belongs to rank ``c mod R``; a rank writes a chunk's rows, then its
``done`` flag, so an interrupted embed resumes at the first unfinished chunk of each rank, with any number of
ranks. Rank 0 marks the store complete after a barrier.

With ``embed.thumbnails`` the same pass makes each sample's thumbnails (:mod:`analysis.thumbnails`) into the run's
thumbnail store (:mod:`analysis.thumbstore`), chunk by chunk like the embeddings; the store does not depend on the
weights, so the first embed of a run writes it and every other checkpoint's embed finds it complete. Embeddings that
are current beside a missing or unfinished thumbnail store get a decode-only pass that makes the thumbnails alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

import catalog
from analysis.config import EmbedConfig
from analysis.runs import AnalysisError, Checkpoint, RunDir
from analysis.store import create_embedding_store
from analysis.thumbnails import EmbedPrepare
from analysis.thumbstore import (create_thumbnail_store, layout_of, thumb_layout, thumbnail_identity,
                                 thumbnail_path, write_thumbnail_chunk)
from catalog.runinfo import config_to_dict, provenance
from shards.reader import SelectionReader
from training.config import parse_direction
from training.distributed import abort, bcast, failure_line, local_device, mpi_peers, mpi_world, watch_ranks
from training.loader import BatchViews, DevicePrefetcher, RowBatches, make_loader, selection_fingerprint, shard_cache

__all__ = ["embed", "EmbedResult", "selection_for", "embedding_identity", "IDENTITY_VERSION", "NOT_IN_IDENTITY"]

# Bumped whenever what goes into embedding_identity changes shape, so every store made before is embedded anew.
# 2: every data.* field but NOT_IN_IDENTITY (was a hand-written list) and every model.* field (was the mode).
IDENTITY_VERSION = 2
# data.* fields that cannot change the embedded arrays, left out of the identity. Every other field, including one
# added to training.config.DataConfig later, is in it by default: a field forgotten here costs a re-embed, never a
# stale store. The training augmentations (crop_*, hflip, the jitters, ir_noise_c) do not reach the evaluation view
# (EVAL_AUGMENT) today but stay in: changing them in a run's config.toml is rare, and a re-embed is cheap next to
# arrays that silently no longer match.
NOT_IN_IDENTITY = frozenset({
    # Where the run's dataset was (embed may read it from --dataset instead): the rows are named by the selection's
    # keys, whose fingerprint is in the identity.
    "dataset",
    # The run's training selection: embed selects by its own --where, which is in the identity.
    "where",
    # How many processes load batches and how far ahead: the same batches either way.
    "workers",
    "prefetch",
    # Where whole shards of a published dataset are kept on local disk: the same bytes either way.
    "cache",
    "cache_limit",
    # The run's training decode: embed replaces it by its own embed.decode.
    "decode",
})


@dataclass(frozen=True)
class EmbedResult:
    path: Path
    rows: int
    computed_rows: int
    seconds: float
    skipped: bool  # already complete and current
    # From the end of each rank's first batch on (the loader's start-up and the first forward's one-off set-up left
    # out): this rank's rate, and on rank 0 the sum over ranks (they run at the same time).
    steady_pairs_per_s: float | None = None
    thumbnails: Path | None = None  # the run's thumbnail store (None with embed.thumbnails = false)


def selection_for(run: RunDir, where: str, dataset: str | None = None, *, allow_empty: bool = False):
    """(catalog Selection, dataset path, training config) of ``where`` over the run's dataset; an empty selection
    is an error unless ``allow_empty``."""
    config = run.training_config()
    root = dataset or config.data.dataset
    if not root or not catalog.dataset_exists(root):
        raise AnalysisError(f"{run.root / 'config.toml'}: data.dataset {root!r} does not exist here (pass --dataset)")
    try:
        with catalog.open(root) as cat:
            selection = cat.select(where)
    except catalog.CatalogError as exc:
        if exc.where is None:  # the catalog itself (not a dataset, unreadable), not the filter
            raise AnalysisError(exc.reason) from None
        raise AnalysisError(f"--where {where!r} is not valid SQL over `samples`: {exc.reason}") from None
    if selection.num_rows == 0 and not allow_empty:
        raise AnalysisError(f"--where {where!r} selects no samples in {root}")
    return selection, catalog.dataset_ref(root), config


def embedding_identity(checkpoint: Checkpoint, where: str, selection_sha: str, config, projections: bool) -> str:
    """What the arrays depend on: the weights, the samples, the preprocessing. Equal identity = nothing to do.

    The preprocessing is every field of the run's ``data`` config but ``NOT_IN_IDENTITY``, and its ``model`` config
    (the mode picks the views; the rest is fixed by the weights, and costs nothing to include), read from the
    dataclasses themselves, so a field added to either is part of the identity without anyone listing it here.
    """
    data = {name: value for name, value in dataclasses.asdict(config.data).items() if name not in NOT_IN_IDENTITY}
    what = {"checkpoint": checkpoint.sha256, "where": where, "selection": selection_sha, "data": data,
            "model": dataclasses.asdict(config.model), "projections": projections, "version": IDENTITY_VERSION}
    # Tuples become JSON lists; a field of a type JSON cannot hold is a TypeError here, not a silent omission.
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def embed(run_dir: str | Path, checkpoint_name: str = "last", where: str | None = None, config: EmbedConfig | None = None,
          dataset: str | None = None, progress: bool = True, log=print) -> EmbedResult:
    """Embed under any number of MPI ranks (each process calls this); returns on every rank."""
    cfg = config or EmbedConfig()
    where = (where if where is not None else cfg.where).strip() or "TRUE"
    rank, world, local_rank, local_size = mpi_world()
    run = RunDir.open(run_dir) if rank == 0 else RunDir(Path(run_dir))
    verdict: dict = {}
    prepared = None  # rank 0's checkpoint, selection and model, not made twice
    if rank == 0:
        try:
            verdict, prepared = _prepare(run, checkpoint_name, where, cfg, dataset)
        except AnalysisError as exc:
            verdict = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, not wait forever
            verdict = {"error": f"{type(exc).__name__}: {exc}"}
    if world > 1:
        verdict = bcast(verdict)
    if "error" in verdict:
        raise AnalysisError(verdict["error"])
    path = Path(verdict["path"])
    thumbs = Path(verdict["thumbs"]) if verdict["thumbs"] else None
    if verdict["skip"]:
        if rank == 0:
            log(f"{path}: up to date ({verdict['n']} samples)")
        return EmbedResult(path, verdict["n"], 0, 0.0, True, thumbnails=thumbs)
    if rank == 0 and verdict["embedded"]:
        log(f"{path}: up to date ({verdict['n']} samples); {thumbs}: thumbnails missing, making them (decode only)")
    peers = mpi_peers()
    try:
        with watch_ranks("analysis embed", rank, peers):
            computed, seconds, steady = _embed_my_chunks(run, verdict, cfg, rank, world, local_rank, local_size,
                                                         progress, prepared)
    except BaseException as exc:
        if world > 1:
            print(failure_line("analysis embed", rank, world, exc, peers), file=sys.stderr, flush=True)
            abort(1)
        raise
    computed, steady = _totals(computed, steady, world)
    # Rank 0 looks, every rank hears: all fail alike when a chunk is missing.
    missing = bcast([_chunks_missing(p) if p is not None else 0 for p in (path, thumbs)] if rank == 0 else None)
    for where_missing, count in zip((path, thumbs), missing):
        if count:
            raise AnalysisError(f"{where_missing}: {count} chunk(s) were not written; run `analysis embed` again")
    if rank == 0:
        for store in (path, thumbs) if thumbs is not None else (path,):
            group = zarr.open_group(str(store), mode="r+")
            if not group.attrs.get("complete"):
                group.attrs.update({"complete": True, "world_size": world, "seconds": seconds})
        if computed:
            rate = computed / seconds if seconds > 0 else float("nan")
            after_first = f"; {steady:.0f} pairs/s after each rank's first batch" if steady else ""
            log(f"{path}: {verdict['n']} samples ({computed} embedded now, {rate:.0f} pairs/s on {world} rank(s)"
                f"{after_first})")
        if thumbs is not None and not verdict["thumbs_done"]:
            log(f"{thumbs}: thumbnails of {zarr.open_group(str(thumbs), mode='r').attrs['thumbnailed']} samples")
    return EmbedResult(path, verdict["n"], computed, seconds, False, steady, thumbs)


def _totals(computed: int, steady: float | None, world: int) -> tuple[int, float | None]:
    """Rows embedded by all ranks, and their summed steady rate (collective under MPI)."""
    if world == 1:
        return computed, steady
    # mpi4py.MPI here only: importing it initialises MPI, which a process no MPI launcher started must not do
    # (see training.distributed.mpi_world).
    from mpi4py import MPI

    rates = MPI.COMM_WORLD.allgather(steady)
    return MPI.COMM_WORLD.allreduce(computed), sum(r for r in rates if r) or None  # a rank with <2 batches has none


def _chunks_missing(path: Path) -> int:
    group = zarr.open_group(str(path), mode="r")
    n_chunks = int(group.attrs["n_chunks"])
    return n_chunks - int(group["done"][:n_chunks].sum())


def _prepare(run: RunDir, checkpoint_name: str, where: str, cfg: EmbedConfig, dataset: str | None):
    """Rank 0: resolve everything, create or reuse the store. Returns (what every rank needs to start, what rank 0
    made on the way: checkpoint, selection, model, config)."""
    checkpoint = run.checkpoint(checkpoint_name)
    selection, root, _ = selection_for(run, where, dataset)
    model, config, spec = run.load_model(checkpoint)  # checks the architecture before anything is written
    # A DINO run's embeddings are its teachers' backbones (DINOModel.rgb_backbone, ir_backbone); its projections the
    # teacher heads' bottlenecks, with the prototypes and centres that score them (analysis.knn.dino_retrieval_rows).
    projections = cfg.projections
    selection_sha = selection_fingerprint(selection)
    identity = embedding_identity(checkpoint, where, selection_sha, config, projections)
    path = run.embeddings(checkpoint.name)
    n = selection.num_rows
    skip = False
    existing = _attrs_or_none(path)
    if existing is not None and existing.get("identity") == identity and existing.get("chunk_rows") == min(cfg.chunk_rows, n):
        embedded = skip = bool(existing.get("complete"))
    else:
        embedded = False
        dims = {"rgb": (model.rgb_backbone.num_features, "float32"), "ir": (model.ir_backbone.num_features, "float32")}
        whole = {}
        if projections and config.model.objective == "dino":
            dims.update(rgb_z=(config.dino.bottleneck_dim, "float32"), ir_z=(config.dino.bottleneck_dim, "float32"))
            whole = dino_scoring_arrays(model)
        elif projections:
            dims.update(rgb_z=(config.model.expander[-1], "float16"), ir_z=(config.model.expander[-1], "float16"))
        attrs = {
            "identity": identity, "checkpoint": checkpoint.name, "checkpoint_sha256": checkpoint.sha256,
            "checkpoint_epoch": checkpoint.epoch, "checkpoint_step": checkpoint.step, "where": where,
            "selection_sha256": selection_sha, "dataset": str(root), "model_spec": spec,
            "training_config": json.loads(json.dumps(config_to_dict(config))),
            "preprocessing": "training.loader.EVAL_AUGMENT: whole frame, no flip, no jitter, no IR noise; BatchViews",
            "provenance": json.loads(json.dumps(provenance(packages=("torch", "timm", "zarr")), default=str)),
        }
        if whole:
            attrs["dino_scoring"] = {"teacher_temp": float(config.dino.teacher_temp),
                                     "student_temp": float(config.dino.student_temp),
                                     "directions": list(config.dino.directions)}
        create_embedding_store(path, selection.column("key").to_pylist(), dims, cfg.chunk_rows, attrs, whole)
    thumbs = _prepare_thumbnails(run, cfg, selection, selection_sha, config, where, root) if cfg.thumbnails else None
    thumbs_done = thumbs is None or bool(zarr.open_group(str(thumbs), mode="r").attrs.get("complete"))
    verdict = {"path": str(path), "skip": skip and thumbs_done, "embedded": embedded, "thumbs_done": thumbs_done,
               "n": n,
               "checkpoint": checkpoint.name, "where": where, "dataset": str(root),
               "checkpoint_sha256": checkpoint.sha256, "thumbs": str(thumbs) if thumbs is not None else None}
    return verdict, (checkpoint, selection, model, config)


def _attrs_or_none(path: Path) -> dict | None:
    """The attributes of the Zarr store at ``path``; None when there is none or it is unreadable (made anew)."""
    if not path.exists():
        return None
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001 - unreadable: the caller makes it anew
        return None


def _prepare_thumbnails(run: RunDir, cfg: EmbedConfig, selection, selection_sha: str, config, where: str,
                        root) -> Path:
    """Rank 0: the run's thumbnail store for this selection, reused when its identity is this one's, else made
    anew (empty, incomplete)."""
    n = selection.num_rows
    chunk_rows = max(min(cfg.chunk_rows, n), 1)
    data = config.data
    identity = thumbnail_identity(selection_sha, chunk_rows, cfg.thumb_size, cfg.max_thumbs, data.rgb_size,
                                  data.ir_size, data.ir_mean)
    path = thumbnail_path(run.root, selection_sha)
    existing = _attrs_or_none(path)
    if existing is None or existing.get("identity") != identity:
        attrs = {"identity": identity, "where": where, "selection_sha256": selection_sha, "dataset": str(root),
                 "max_thumbs": cfg.max_thumbs, "rgb_size": list(data.rgb_size), "ir_size": list(data.ir_size),
                 "preprocessing": "the evaluation view (training.loader.EVAL_AUGMENT) before normalisation, "
                                  "downscaled with an antialiased bilinear filter"}
        create_thumbnail_store(path, selection.column("key").to_pylist(), thumb_layout(n, chunk_rows, cfg.max_thumbs),
                               cfg.thumb_size, attrs)
    return path


def _embed_my_chunks(run: RunDir, verdict: dict, cfg: EmbedConfig, rank: int, world: int, local_rank: int,
                     local_size: int, progress: bool, prepared=None) -> tuple[int, float, float | None]:
    path = Path(verdict["path"])
    group = zarr.open_group(str(path), mode="r+")
    n, chunk_rows, n_chunks = int(group.attrs["n"]), int(group.attrs["chunk_rows"]), int(group.attrs["n_chunks"])
    done = group["done"][:]
    embed_mine = {c for c in range(rank, n_chunks, world) if not done[c]}
    thumbs = zarr.open_group(verdict["thumbs"], mode="r+") if verdict["thumbs"] else None
    thumbs_done = thumbs["done"][:] if thumbs is not None else None
    thumb_mine = {c for c in range(rank, n_chunks, world) if thumbs is not None and not thumbs_done[c]}
    mine = sorted(embed_mine | thumb_mine)
    if not mine:
        return 0, 0.0, None
    device = local_device(local_rank)
    decode = cfg.decode if cfg.decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if decode == "gpu" and device.type != "cuda":
        raise AnalysisError("embed.decode = 'gpu' needs a CUDA device; this machine has none")
    if prepared is not None:
        _, selection, model, config = prepared
        model.to(device)
    else:
        with catalog.open(verdict["dataset"]) as cat:
            selection = cat.select(verdict["where"])
        checkpoint = run.checkpoint(verdict["checkpoint"])
        if checkpoint.sha256 != verdict["checkpoint_sha256"]:
            raise AnalysisError(f"{checkpoint.path}: changed while embedding started; run `analysis embed` again")
        model, config, _ = run.load_model(checkpoint, device)
    if device.type == "cpu" and local_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    data = dataclasses.replace(config.data, decode=decode)
    m = config.model
    views = BatchViews(data, m.mode, m.rgb_patch, m.ir_patch, data.ir_mean, data.ir_std, device)
    # Mode rgb-grey reads no IR for the model; the thumbnails need it all the same.
    decode_mode = "rgb-ir" if thumb_mine and m.mode == "rgb-grey" else m.mode
    batches = []
    for c in mine:
        start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n)
        for b in range(start, stop, cfg.batch_size):
            batches.append(((c, b - start), np.arange(b, min(b + cfg.batch_size, stop))))
    try:
        cache = shard_cache(dataclasses.replace(data, dataset=verdict["dataset"]), selection,
                            max(cfg.worker_count(local_size), 1) * local_size)
    except ValueError as exc:
        raise AnalysisError(f"data.cache_limit: {exc}") from None
    reader = SelectionReader(selection, catalog.dataset_ref(verdict["dataset"]), cache=cache)
    loader = make_loader(RowBatches(reader, batches, data, decode_mode, data.ir_mean), cfg.worker_count(local_size), 4,
                         pin_memory=device.type == "cuda")
    names = [name for name in ("rgb", "ir", "rgb_z", "ir_z") if name in group.array_keys()]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and torch.cuda.is_bf16_supported()
                else torch.autocast("cpu", enabled=False))
    total = sum(len(rows) for (c, _), rows in batches if c in embed_mine)  # the rows embedded, not just thumbnailed
    bar = None
    if rank == 0 and progress:
        bar = tqdm(total=total, unit="pair", desc=f"embed {verdict['checkpoint']}", dynamic_ncols=True, file=sys.stderr)
    all_keys = np.asarray(group["key"][:], dtype=object)
    started = time.perf_counter()
    prefetch = DevicePrefetcher(loader, EmbedPrepare(views, embed_mine, thumb_mine, cfg.thumb_size), device)
    try:
        warm = _write_chunks(prefetch, model, autocast, group, names, n, chunk_rows, all_keys, path, bar,
                             thumbs)
    finally:
        prefetch.close()
    if bar is not None:
        bar.close()
    ended = time.perf_counter()
    steady = None
    if warm is not None and total > warm[1] and ended > warm[0]:
        steady = (total - warm[1]) / (ended - warm[0])
    return total, ended - started, steady


def dino_scoring_arrays(model) -> dict[str, np.ndarray]:
    """A DINO model's teacher prototypes per modality and centre per direction, as stored beside its projections."""
    arrays = {f"{m}_prototypes": model.prototypes(m).float().cpu().numpy() for m in ("rgb", "ir")}
    for direction, loss in model.losses.items():
        teacher, student = parse_direction(direction)
        arrays[f"centre_{teacher}_to_{student}"] = loss.center.detach().float().cpu().numpy().reshape(-1)
    return arrays


def _when_copied(copied, write, *args) -> None:
    """``write(*args)`` on the writer thread once a chunk's device-to-host copies (``copied``, None: none) landed."""
    if copied is not None:
        copied.synchronize()
    write(*args)


def _write_chunk(group, names: list[str], chunk: int, start: int, stop: int, arrays: dict) -> None:
    for name in names:
        group[name][start:stop] = arrays[name].numpy()
    group["done"][chunk] = 1  # after the rows: a chunk marked done is complete on disk


def _write_chunks(prefetch, model, autocast, group, names, n, chunk_rows, all_keys, path, bar,
                  thumbs=None) -> tuple[float, int] | None:
    """Embed every prepared batch; write each chunk, then its done flag, once all its rows are in; likewise the
    batches' thumbnails into ``thumbs`` (the thumbnail store's group), where a batch has them.

    A chunk's outputs stay on the device until the chunk is full and come back in one copy, into pinned memory
    without the host waiting: the writer thread waits for the copy, so the GPU queue never drains at a chunk's end.
    Returns (when the first batch had been embedded, its rows), or None if there was no batch: the steady rate
    is measured from there, past the loader's start-up and the first forward's one-off library set-up."""
    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zarr-writer")
    pending: list = []
    parts: dict[int, dict[str, list]] = {}
    filled: dict[int, int] = {}
    thumb_parts: dict[int, list] = {}
    layout = layout_of(thumbs) if thumbs is not None else None
    dtypes = {name: torch.float16 if group[name].dtype == np.float16 else torch.float32 for name in names}
    warm = None
    try:
        with torch.inference_mode():
            for batch, prepared in prefetch:
                c, offset = batch["tag"]
                start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n)
                rows = len(batch["keys"])
                if list(batch["keys"]) != list(all_keys[start + offset : start + offset + rows]):
                    raise AnalysisError(f"{path}: rows {start + offset}.. do not hold the catalog's keys "
                                        "(catalog changed?)")
                if offset != filled.get(c, 0):
                    raise AnalysisError(f"{path}: chunk {c} got rows out of order (offset {offset})")
                if prepared.views is not None:
                    first, second = prepared.views
                    with autocast:
                        h_rgb = model.rgb_backbone(first)
                        h_ir = model.ir_backbone(second)
                        out = {"rgb": h_rgb, "ir": h_ir}
                        if "rgb_z" in names:
                            out["rgb_z"], out["ir_z"] = model.projection("rgb", h_rgb), model.projection("ir", h_ir)
                    chunk = parts.setdefault(c, {name: [] for name in names})
                    for name in names:
                        chunk[name].append(out[name].to(dtypes[name]))
                    if warm is None:
                        if first.is_cuda:
                            torch.cuda.synchronize(first.device)  # once: the first batch's set-up is not the rate
                        warm = (time.perf_counter(), rows)
                    if bar is not None:
                        bar.update(rows)
                if prepared.thumbs is not None:
                    thumb_parts.setdefault(c, []).append(prepared.thumbs)
                filled[c] = filled.get(c, 0) + rows
                if filled[c] == stop - start:
                    del filled[c]
                    # Compressing and writing a chunk takes a while: a writer thread does it while the GPU goes on.
                    if c in parts:
                        chunk = parts.pop(c)
                        arrays, copied = _to_host({name: torch.cat(chunk[name]) for name in names})
                        pending.append(writer.submit(_when_copied, copied, _write_chunk, group, names, c, start, stop,
                                                     arrays))
                    if c in thumb_parts:
                        made = thumb_parts.pop(c)
                        keep = torch.as_tensor(layout.chunk_rows_of(c) - start).to(made[0][0].device)
                        arrays, copied = _to_host({i: torch.cat([t[i] for t in made])[keep] for i in range(3)})
                        pending.append(writer.submit(_when_copied, copied, _write_thumbnails, thumbs, c, arrays))
                    while pending and pending[0].done():
                        pending.pop(0).result()
    finally:
        # Chunks already handed to the writer are finished even when embedding fails: their done flags are true.
        writer.shutdown(wait=True)
    for future in pending:
        future.result()
    if parts or thumb_parts:
        raise AnalysisError(f"{path}: chunks {sorted(set(parts) | set(thumb_parts))} were not filled "
                            "(loader ended early)")
    return warm


def _write_thumbnails(group, chunk: int, arrays: dict) -> None:
    write_thumbnail_chunk(group, chunk, arrays[0].numpy(), arrays[1].numpy(), arrays[2].numpy())


def _to_host(tensors: dict):
    """(host copies, an event marking when they are complete, or None when they already are)."""
    first = next(iter(tensors.values()))
    if not first.is_cuda:
        return {name: t.cpu() for name, t in tensors.items()}, None
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for name, t in tensors.items()}
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
