"""Human-readable summaries of a catalog: `catalog describe` and plain-text tables."""

from __future__ import annotations

import pyarrow as pa

from catalog.query import Catalog

__all__ = ["describe", "format_table"]


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(table: pa.Table, max_rows: int = 200) -> str:
    """A fixed-width text table (numbers right-aligned); long results are cut with a note."""
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.slice(0, max_rows).to_pylist()]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if table.num_rows > max_rows:
        out.append(f"... {table.num_rows - max_rows} more rows (use --format csv or --out)")
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out)


def describe(catalog: Catalog) -> str:
    q = catalog.query
    sections = [
        ("samples per node", "SELECT vsn, any_value(node_id) AS node_id, count(*) AS samples, min(time_utc) AS first, "
         "max(time_utc) AS last, count(*) FILTER (WHERE tz IS NULL) AS unlocated FROM samples GROUP BY vsn ORDER BY vsn"),
        ("samples per position", "SELECT coalesce(CAST(position AS VARCHAR), 'unknown') AS position, "
         "CASE WHEN is_sky THEN 'sky' WHEN NOT is_sky THEN 'not sky' ELSE 'unknown' END AS view, count(*) AS samples "
         "FROM samples GROUP BY ALL ORDER BY min(position) NULLS FIRST"),
        ("day / night", "SELECT CASE WHEN is_day THEN 'day' WHEN NOT is_day THEN 'night' ELSE 'unknown' END AS daylight, "
         "count(*) AS samples, count(*) FILTER (WHERE is_sky) AS sky FROM samples GROUP BY ALL ORDER BY daylight"),
        ("splits", "SELECT split, count(*) AS samples, count(DISTINCT vsn || CAST(time_utc::DATE AS VARCHAR)) AS node_days "
         "FROM samples GROUP BY split ORDER BY split"),
        ("files", "SELECT status, role, count(*) AS files, sum(bytes) AS bytes FROM files GROUP BY ALL ORDER BY ALL"),
        ("rejects per reason", "SELECT reason, count(*) AS files, count(DISTINCT key) AS frames FROM rejects "
         "GROUP BY reason ORDER BY files DESC, reason"),
        ("shards", "SELECT count(*) AS shards, sum(n_samples) AS samples, round(sum(bytes) / 1e6, 1) AS mb, "
         "round(avg(bytes) / 1e6, 1) AS mean_mb FROM shards"),
        ("runs", "SELECT id, started, round(epoch(finished) - epoch(started), 1) AS seconds, files_seen, files_new, "
         "samples_added, shards_added FROM runs ORDER BY id"),
    ]
    return "\n\n".join(f"== {title}\n{format_table(q(sql))}" for title, sql in sections)
