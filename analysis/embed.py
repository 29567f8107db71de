"""`analysis embed`: both branches' embeddings of a catalog selection into Zarr, from one rank or many.

Preprocessing is training's evaluation view (``training.loader.EVAL_AUGMENT``: the whole frame, no flip, no
jitter, no IR noise) through the same ``BatchViews`` training uses, so analysis sees what the model was trained
on. Rows are in catalog order; chunk ``c`` belongs to rank ``c mod R``; a rank writes a chunk's rows, then its
``done`` flag, so an interrupted embed resumes at the first unfinished chunk of each rank, with any number of
ranks. Rank 0 marks the store complete after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.config import EmbedConfig
from analysis.runs import AnalysisError, Checkpoint, RunDir
from analysis.store import create_embedding_store

__all__ = ["embed", "EmbedResult", "selection_for", "embedding_identity"]


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


def selection_for(run: RunDir, where: str, dataset: str | None = None):
    """(catalog Selection, dataset path, training config) of ``where`` over the run's dataset."""
    import catalog

    config = run.training_config()
    root = dataset or config.data.dataset
    if not root or not Path(root).is_dir():
        raise AnalysisError(f"{run.root / 'config.toml'}: data.dataset {root!r} does not exist here (pass --dataset)")
    try:
        with catalog.open(root) as cat:
            selection = cat.select(where)
    except catalog.CatalogError as exc:
        message = str(exc).strip().splitlines()[0].replace(f"bad --where {where!r}: ", "")
        raise AnalysisError(f"--where {where!r} is not valid SQL over `samples`: {message}") from None
    if selection.num_rows == 0:
        raise AnalysisError(f"--where {where!r} selects no samples in {root}")
    return selection, Path(root), config


def embedding_identity(checkpoint: Checkpoint, where: str, selection_sha: str, config, projections: bool) -> str:
    """What the arrays depend on: the weights, the samples, the preprocessing. Equal identity = nothing to do."""
    d = config.data
    what = {"checkpoint": checkpoint.sha256, "where": where, "selection": selection_sha, "mode": config.model.mode,
            "ir_size": list(d.ir_size), "rgb_scale": d.rgb_scale, "fit": d.fit, "ir_mean": d.ir_mean,
            "ir_std": d.ir_std, "ir3_bounds": list(d.ir3_bounds), "projections": projections, "version": 1}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def embed(run_dir: str | Path, checkpoint_name: str = "last", where: str | None = None, config: EmbedConfig | None = None,
          dataset: str | None = None, progress: bool = True, log=print) -> EmbedResult:
    """Embed under any number of MPI ranks (each process calls this); returns on every rank."""
    from training.distributed import abort, bcast, mpi_world

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
    if verdict["skip"]:
        if rank == 0:
            log(f"{path}: up to date ({verdict['n']} samples)")
        return EmbedResult(path, verdict["n"], 0, 0.0, True)
    try:
        computed, seconds, steady = _embed_my_chunks(run, verdict, cfg, rank, world, local_rank, local_size, progress, prepared)
    except BaseException as exc:
        if world > 1:
            print(f"analysis embed: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            abort(1)
        raise
    if world > 1:
        from mpi4py import MPI

        computed = MPI.COMM_WORLD.allreduce(computed)
        rates = MPI.COMM_WORLD.allgather(steady)
        steady = sum(r for r in rates if r) or None  # a rank with one batch or none has no rate
        MPI.COMM_WORLD.Barrier()
    if rank == 0:
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        done = group["done"][:]
        if int(done[: group.attrs["n_chunks"]].sum()) != group.attrs["n_chunks"]:
            raise AnalysisError(f"{path}: some chunks were not written; run `analysis embed` again")
        group.attrs.update({"complete": True, "world_size": world, "seconds": seconds})
        rate = computed / seconds if seconds > 0 else float("nan")
        after_first = f"; {steady:.0f} pairs/s after each rank's first batch" if steady else ""
        log(f"{path}: {verdict['n']} samples ({computed} embedded now, {rate:.0f} pairs/s on {world} rank(s){after_first})")
    return EmbedResult(path, verdict["n"], computed, seconds, False, steady)


def _prepare(run: RunDir, checkpoint_name: str, where: str, cfg: EmbedConfig, dataset: str | None):
    """Rank 0: resolve everything, create or reuse the store. Returns (what every rank needs to start, what rank 0
    made on the way: checkpoint, selection, model, config)."""
    import zarr

    from catalog.runinfo import config_to_dict, provenance
    from training.loader import selection_fingerprint

    checkpoint = run.checkpoint(checkpoint_name)
    selection, root, _ = selection_for(run, where, dataset)
    model, config, spec = run.load_model(checkpoint)  # checks the architecture before anything is written
    selection_sha = selection_fingerprint(selection)
    identity = embedding_identity(checkpoint, where, selection_sha, config, cfg.projections)
    path = run.embeddings(checkpoint.name)
    n = selection.num_rows
    skip = False
    existing = None
    if path.exists():
        try:
            existing = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # noqa: BLE001 - unreadable: rebuilt below
            existing = None
    if existing is not None and existing.get("identity") == identity and existing.get("chunk_rows") == min(cfg.chunk_rows, n):
        skip = bool(existing.get("complete"))
    else:
        dims = {"rgb": (model.rgb_backbone.num_features, "float32"), "ir": (model.ir_backbone.num_features, "float32")}
        if cfg.projections:
            dims.update(rgb_z=(config.model.expander[-1], "float16"), ir_z=(config.model.expander[-1], "float16"))
        attrs = {
            "identity": identity, "checkpoint": checkpoint.name, "checkpoint_sha256": checkpoint.sha256,
            "checkpoint_epoch": checkpoint.epoch, "checkpoint_step": checkpoint.step, "where": where,
            "selection_sha256": selection_sha, "dataset": str(root), "model_spec": spec,
            "training_config": json.loads(json.dumps(config_to_dict(config))),
            "preprocessing": "training.loader.EVAL_AUGMENT: whole frame, no flip, no jitter, no IR noise; BatchViews",
            "provenance": json.loads(json.dumps(provenance(packages=("torch", "timm", "zarr")), default=str)),
        }
        create_embedding_store(path, selection.column("key").to_pylist(), dims, cfg.chunk_rows, attrs)
    verdict = {"path": str(path), "skip": skip, "n": n, "checkpoint": checkpoint.name, "where": where,
               "dataset": str(root), "checkpoint_sha256": checkpoint.sha256}
    return verdict, (checkpoint, selection, model, config)


def _embed_my_chunks(run: RunDir, verdict: dict, cfg: EmbedConfig, rank: int, world: int, local_rank: int,
                     local_size: int, progress: bool, prepared=None) -> tuple[int, float, float | None]:
    import catalog
    import torch
    import zarr

    from shards.reader import SelectionReader
    from training.distributed import local_device
    from training.loader import BatchViews, DevicePrefetcher, RowBatches, make_loader

    path = Path(verdict["path"])
    group = zarr.open_group(str(path), mode="r+")
    n, chunk_rows, n_chunks = int(group.attrs["n"]), int(group.attrs["chunk_rows"]), int(group.attrs["n_chunks"])
    done = group["done"][:]
    mine = [c for c in range(rank, n_chunks, world) if not done[c]]
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
    import dataclasses

    data = dataclasses.replace(config.data, decode=decode)
    m = config.model
    views = BatchViews(data, m.mode, m.rgb_patch, m.ir_patch, data.ir_mean, data.ir_std, device)
    batches = []
    for c in mine:
        start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n)
        for b in range(start, stop, cfg.batch_size):
            batches.append(((c, b - start), np.arange(b, min(b + cfg.batch_size, stop))))
    reader = SelectionReader(selection, Path(verdict["dataset"]))
    loader = make_loader(RowBatches(reader, batches, data, m.mode, data.ir_mean), cfg.worker_count(local_size), 4,
                         pin_memory=device.type == "cuda")
    names = [name for name in ("rgb", "ir", "rgb_z", "ir_z") if name in group.array_keys()]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and torch.cuda.is_bf16_supported()
                else torch.autocast("cpu", enabled=False))
    total = sum(len(rows) for _, rows in batches)
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="pair", desc=f"embed {verdict['checkpoint']}", dynamic_ncols=True, file=sys.stderr)
    all_keys = np.asarray(group["key"][:], dtype=object)
    started = time.perf_counter()
    prefetch = DevicePrefetcher(loader, views, device)
    try:
        warm = _write_chunks(prefetch, model, autocast, group, names, n, chunk_rows, all_keys, path, bar)
    finally:
        prefetch.close()
    if bar is not None:
        bar.close()
    ended = time.perf_counter()
    steady = None
    if warm is not None and total > warm[1] and ended > warm[0]:
        steady = (total - warm[1]) / (ended - warm[0])
    return total, ended - started, steady


def _write_chunk(group, names: list[str], chunk: int, start: int, stop: int, arrays: dict, copied=None) -> None:
    if copied is not None:
        copied.synchronize()  # the device-to-host copies of this chunk have landed
    for name in names:
        group[name][start:stop] = arrays[name].numpy()
    group["done"][chunk] = 1  # after the rows: a chunk marked done is complete on disk


def _write_chunks(prefetch, model, autocast, group, names, n, chunk_rows, all_keys, path, bar) -> tuple[float, int] | None:
    """Embed every prepared batch; write each chunk, then its done flag, once all its rows are in.

    A chunk's outputs stay on the device until the chunk is full and come back in one copy, into pinned memory
    without the host waiting: the writer thread waits for the copy, so the GPU queue never drains at a chunk's end.
    Returns (when the first batch had been embedded, its rows), or None if there was no batch: the steady rate
    is measured from there, past the loader's start-up and the first forward's one-off library set-up."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zarr-writer")
    pending: list = []
    parts: dict[int, dict[str, list]] = {}
    filled: dict[int, int] = {}
    dtypes = {name: torch.float16 if group[name].dtype == np.float16 else torch.float32 for name in names}
    warm = None
    try:
        with torch.inference_mode():
            for batch, (first, second) in prefetch:
                c, offset = batch["tag"]
                with autocast:
                    h_rgb = model.rgb_backbone(first)
                    h_ir = model.ir_backbone(second)
                    out = {"rgb": h_rgb, "ir": h_ir}
                    if "rgb_z" in names:
                        out["rgb_z"], out["ir_z"] = model.rgb_expander(h_rgb), model.ir_expander(h_ir)
                start, stop = c * chunk_rows, min((c + 1) * chunk_rows, n)
                rows = len(batch["keys"])
                if list(batch["keys"]) != list(all_keys[start + offset : start + offset + rows]):
                    raise AnalysisError(f"{path}: rows {start + offset}.. do not hold the catalog's keys "
                                        "(catalog changed?)")
                if offset != filled.get(c, 0):
                    raise AnalysisError(f"{path}: chunk {c} got rows out of order (offset {offset})")
                chunk = parts.setdefault(c, {name: [] for name in names})
                for name in names:
                    chunk[name].append(out[name].to(dtypes[name]))
                filled[c] = filled.get(c, 0) + rows
                if warm is None:
                    if first.is_cuda:
                        torch.cuda.synchronize(first.device)  # once: the first batch's set-up is not the rate
                    warm = (time.perf_counter(), rows)
                if bar is not None:
                    bar.update(rows)
                if filled[c] == stop - start:
                    arrays, copied = _to_host({name: torch.cat(chunk[name]) for name in names})
                    del parts[c], filled[c]
                    # Compressing and writing a chunk takes a while: a writer thread does it while the GPU goes on.
                    pending.append(writer.submit(_write_chunk, group, names, c, start, stop, arrays, copied))
                    while pending and pending[0].done():
                        pending.pop(0).result()
    finally:
        # Chunks already handed to the writer are finished even when embedding fails: their done flags are true.
        writer.shutdown(wait=True)
    for future in pending:
        future.result()
    if parts:
        raise AnalysisError(f"{path}: chunks {sorted(parts)} were not filled (loader ended early)")
    return warm


def _to_host(tensors: dict):
    """(host copies, an event marking when they are complete, or None when they already are)."""
    import torch

    first = next(iter(tensors.values()))
    if not first.is_cuda:
        return {name: t.cpu() for name, t in tensors.items()}, None
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for name, t in tensors.items()}
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
