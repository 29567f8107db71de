"""DuckDB views over a dataset's Parquet catalog, SQL queries, and Selections.

``catalog.open(DATASET)`` gives a :class:`Catalog` with the views ``samples``, ``files``, ``rejects``,
``shards``, ``nodes`` and ``runs`` (DESIGN.md). It only reads committed parts, so it never sees a writer's
half-finished work, and it takes no lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.schema import FILES, NODES, RUNS, SAMPLES, SHARDS
from catalog.remote import fetch_catalog
from catalog.storage import StorageError, check_url, is_remote
from catalog.store import DatasetLayout

__all__ = ["Catalog", "CatalogError", "open_catalog", "write_selection", "read_keys_csv", "SELECTION_COLUMNS",
           "VIEWS"]

VIEWS = ("samples", "files", "rejects", "shards", "nodes", "runs")

# What a Selection holds per sample: enough to read it by byte range and to check it against the catalog.
SELECTION_COLUMNS = (
    "key",
    "vsn",
    "ts_ns",
    "split",
    "shard",
    "shard_bytes",
    "sample_offset",
    "sample_length",
    "ir_offset",
    "ir_size",
    "json_offset",
    "json_size",
    "rgb_offset",
    "rgb_size",
    "ir_member",
    "shard_sha256",
)


class CatalogError(ValueError):
    """A query or selection the catalog cannot answer.

    Structured, so a caller words its own message from the parts instead of cutting up this one's text:
    ``reason`` is one line (DuckDB's first line, or what is missing), ``detail`` all of DuckDB's text, ``where``
    the filter that failed (None for a whole statement or no filter), ``dataset`` the dataset root, ``views`` the
    help listing the views' columns. ``str()`` is the full message a command prints.
    """

    def __init__(self, reason: str, *, dataset: str | os.PathLike[str] | None = None, where: str | None = None,
                 views: str = "") -> None:
        self.detail = str(reason).strip()
        self.reason = _first_line(reason)
        self.dataset = None if dataset is None else str(dataset)
        self.where = where
        self.views = views
        head = self.detail if where is None else f"bad --where {where!r}: {self.detail}"
        super().__init__(head + (f"\n\n{views}" if views else ""))


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else str(text)


def sql_string(value: str) -> str:
    """A SQL string literal of ``value`` (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _path_list(paths: list[Path]) -> str:
    return "[" + ", ".join(sql_string(str(p.resolve())) for p in paths) + "]"


class Catalog:
    """Read-only SQL access to one dataset's catalog."""

    def __init__(self, dataset: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> None:
        """``dataset``: a directory, or the URL of a publication (its catalog is fetched into ``cache``)."""
        if is_remote(dataset):
            try:
                self.source = check_url(str(dataset))
                self.layout = DatasetLayout(fetch_catalog(self.source, cache))
            except StorageError as exc:
                raise CatalogError(str(exc), dataset=dataset) from None
        else:
            self.layout = DatasetLayout(dataset)
            self.source = str(self.layout.root.resolve())
        if not self.layout.exists():
            raise CatalogError(f"{self.source}: not a sagepairs dataset (no catalog/ directory)",
                               dataset=self.source)
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET TimeZone = 'UTC'")
        self._create_views()

    # -- views ---------------------------------------------------------------------------------------
    def _empty(self, name: str, schema: pa.Schema) -> str:
        self.con.register(f"_empty_{name}", schema.empty_table())
        return f"SELECT * FROM _empty_{name}"

    def _samples_union(self, parts: list[Path]) -> str:
        """Every part's samples, in today's columns: parts written before 2026-11-28 say ``draft_factor`` (the JPEG
        was decoded at 1/draft_factor) where newer ones say ``decode_scale``; parts written before 2026-12-05 have
        no ``ir_member``: their samples hold the plain ``ir.npy``."""
        union = f"SELECT * FROM read_parquet({_path_list(parts)}, union_by_name = true)"
        columns = {row[0] for row in self.con.execute(f"DESCRIBE {union}").fetchall()}
        exclude, replace, added = [], [], []
        if "draft_factor" in columns:
            older = "CAST(1.0 / draft_factor AS FLOAT)"
            exclude.append("draft_factor")
            if "decode_scale" in columns:
                replace.append(f"coalesce(decode_scale, {older}) AS decode_scale")
            else:
                added.append(f"{older} AS decode_scale")
        if "ir_member" in columns:
            replace.append("coalesce(ir_member, 'ir.npy') AS ir_member")
        else:
            added.append("'ir.npy' AS ir_member")
        star = "*" + (f" EXCLUDE ({', '.join(exclude)})" if exclude else "") + (
            f" REPLACE ({', '.join(replace)})" if replace else "")
        return f"SELECT {', '.join([star, *added])} FROM ({union})"

    def _create_views(self) -> None:
        snapshot = self.layout.latest_snapshot()
        uncovered = self.layout.uncovered_runs(snapshot)
        all_runs = self.layout.committed_runs()
        base = [snapshot.path] if snapshot else []

        samples = [d / "samples.parquet" for d in base + uncovered if (d / "samples.parquet").exists()]
        self.con.execute("CREATE VIEW samples AS " + (self._samples_union(samples) if samples else self._empty("samples", SAMPLES)))

        files = [d / "files.parquet" for d in base + uncovered if (d / "files.parquet").exists()]
        if not files:
            files_sql = self._empty("files", FILES)
        elif len(files) == 1:
            files_sql = f"SELECT * FROM read_parquet({_path_list(files)})"
        else:
            # Latest word on each path wins: snapshot rows rank 0, run parts by their run number.
            files_sql = (
                f"SELECT * EXCLUDE (filename) FROM read_parquet({_path_list(files)}, filename = true, "
                "union_by_name = true) QUALIFY row_number() OVER (PARTITION BY path ORDER BY "
                "coalesce(TRY_CAST(regexp_extract(filename, 'run-(\\d+)/files', 1) AS BIGINT), 0) DESC) = 1"
            )
        self.con.execute(f"CREATE VIEW files AS {files_sql}")
        self.con.execute(
            "CREATE VIEW rejects AS SELECT path, vsn, ts_ns, role, reason, detail, key, ingest_run, bytes "
            "FROM files WHERE status = 'rejected'"
        )

        shards = [d / "shards.parquet" for d in all_runs if (d / "shards.parquet").exists()]
        self.con.execute(
            "CREATE VIEW shards AS "
            + (f"SELECT * FROM read_parquet({_path_list(shards)})" if shards else self._empty("shards", SHARDS))
        )
        runs = [d / "runs.parquet" for d in all_runs if (d / "runs.parquet").exists()]
        self.con.execute(
            "CREATE VIEW runs AS "
            + (f"SELECT * FROM read_parquet({_path_list(runs)})" if runs else self._empty("runs", RUNS))
        )
        nodes = [d / "nodes.parquet" for d in base + uncovered if (d / "nodes.parquet").exists()]
        self.con.execute(
            "CREATE VIEW nodes AS "
            + (f"SELECT * FROM read_parquet({_path_list(nodes[-1:])})" if nodes else self._empty("nodes", NODES))
        )

    # -- queries -------------------------------------------------------------------------------------
    def describe_views(self) -> dict[str, list[tuple[str, str]]]:
        """Each view's columns and DuckDB types."""
        out = {}
        for view in VIEWS:
            rows = self.con.execute(f"DESCRIBE {view}").fetchall()
            out[view] = [(r[0], r[1]) for r in rows]
        return out

    def views_help(self) -> str:
        lines = ["views:"]
        for view, columns in self.describe_views().items():
            lines.append(f"  {view}: " + ", ".join(f"{c} {t}" for c, t in columns))
        return "\n".join(lines)

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run SQL over the views; a bad statement raises CatalogError with DuckDB's message and the views."""
        try:
            relation = self.con.sql(sql, params=params or None)
            table = relation.to_arrow_table() if relation is not None else pa.table({})
        except duckdb.Error as exc:
            raise CatalogError(str(exc), dataset=self.source, views=self.views_help()) from None
        return table

    def nodes(self) -> pa.Table:
        return self.con.sql("SELECT * FROM nodes").to_arrow_table()

    def missing_keys(self, keys: list[str]) -> list[str]:
        """The ``keys`` that name no sample of this catalog, in their order."""
        self.con.register("_asked_keys", pa.table({"key": pa.array(keys, type=pa.string())}))
        try:
            unknown = set(self.con.sql("SELECT a.key FROM _asked_keys a ANTI JOIN samples s ON s.key = a.key")
                          .to_arrow_table().column("key").to_pylist())
        finally:
            self.con.unregister("_asked_keys")
        return [key for key in keys if key in unknown]

    def select(self, where: str | None = None, split: str | None = None, limit: int | None = None,
               keys: list[str] | None = None) -> pa.Table:
        """A Selection: the samples matching ``where`` (SQL over ``samples``), of ``split``, among ``keys`` (when
        given), in shard order.

        Its schema metadata records the dataset, the filter and the split, so readers need nothing else.
        """
        conditions = []
        params: list[Any] = []
        if where and where.strip():
            conditions.append(f"({where})")
        if split:
            conditions.append("split = ?")
            params.append(split)
        if keys is not None:
            # A registered table, joined: any number of keys, no quoting to get wrong.
            self.con.register("_selected_keys", pa.table({"key": pa.array(list(keys), type=pa.string())}))
            conditions.append("key IN (SELECT key FROM _selected_keys)")
        filtered = "SELECT * FROM samples" + (" WHERE " + " AND ".join(conditions) if conditions else "")
        sql = (
            "SELECT s.key, s.vsn, s.ts_ns, s.split, s.shard, h.bytes AS shard_bytes, s.sample_offset, "
            "s.sample_length, s.ir_offset, s.ir_size, s.json_offset, s.json_size, s.rgb_offset, s.rgb_size, "
            "s.ir_member, h.sha256 AS shard_sha256 "
            f"FROM ({filtered}) s JOIN shards h ON s.shard = h.name ORDER BY s.shard, s.sample_offset"
            + (f" LIMIT {int(limit)}" if limit is not None else "")
        )
        try:
            table = self.con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise CatalogError(str(exc), dataset=self.source, where=where or "",
                               views=self.views_help()) from None
        finally:
            if keys is not None:
                self.con.unregister("_selected_keys")
        metadata = {
            b"sagepairs.dataset": self.source.encode(),
            b"sagepairs.where": (where or "").encode(),
            b"sagepairs.split": (split or "").encode(),
        }
        if keys is not None:
            metadata[b"sagepairs.keys"] = str(len(keys)).encode()  # how many keys it was chosen among
        return table.replace_schema_metadata(metadata)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_catalog(dataset: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> Catalog:
    return Catalog(dataset, cache=cache)


def read_keys_csv(path: str | os.PathLike[str]) -> list[str]:
    """The ``key`` column of a CSV file (what the explorer exports), duplicates dropped, in file order; a missing
    or unreadable file, one without a ``key`` column or without any key, is a CatalogError naming it."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}))
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such keys file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogError(f"{path}: not a CSV file of keys ({_first_line(str(exc))})") from None
    if "key" not in table.column_names:
        raise CatalogError(f"{path}: no 'key' column (has {', '.join(table.column_names) or 'no columns'}); "
                           "expected a header line 'key' and one sample key per line")
    keys = list(dict.fromkeys(k for k in table.column("key").to_pylist() if k))
    if not keys:
        raise CatalogError(f"{path}: no keys (a header line 'key' and nothing under it); export a selection that "
                           "holds samples")
    return keys


def write_selection(selection: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write a Selection to Parquet atomically (tmp + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(selection, tmp)
    os.replace(tmp, path)
