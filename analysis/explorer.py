"""The interactive embedding explorer: ``write_explorer`` turns 2-D maps, catalog columns and thumbnail atlases into
a static page (``index.html`` + classic scripts + data) that opens straight from disk and over HTTP.

Everything the page needs ships as classic ``.js`` files (Chromium blocks module scripts and ``fetch`` of local
files on ``file://``): ``data/meta.js`` sets ``window.SAGEPAIRS_EXPLORER`` (names, labels, sizes, cluster
summaries) and each ``data/<part>.js`` adds one entry to ``window.SAGEPAIRS_EXPLORER_PARTS`` holding arrays as
base64 of little-endian typed arrays, which the page decodes with one ``atob`` each (a JSON list of a million
floats would be several times larger and slower to parse). The page loads a part when it needs it, by adding a
``<script>`` element. The format is described in docs/explorer.md.

Pure data writing: numpy, PIL (to read the atlases' sizes) and the standard library; no torch.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ExplorerMap", "ExplorerLink", "Thumbnails", "write_explorer", "read_part", "decode_array",
           "FORMAT_VERSION", "MISSING"]

FORMAT_VERSION = 1
ASSETS = Path(__file__).resolve().with_name("explorer_assets")
# What the page needs at view time; the npm build input under vendor/npm/ stays behind.
STATIC_FILES = ("index.html", "explorer.js", "explorer.css", "vendor/regl-scatterplot.min.js",
                "vendor/LICENSE-regl-scatterplot", "vendor/LICENSES-bundled.txt")
MISSING = "(missing)"
# Integer (or integral float) columns with at most this many distinct values are coloured as categories.
FEW_DISTINCT = 12
CLUSTER_TOP_SHARES = 3  # metadata values shown per cluster
CLUSTER_EXAMPLES = 12  # thumbnails shown per cluster
PARTS_GLOBAL = "window.SAGEPAIRS_EXPLORER_PARTS"


@dataclass(frozen=True)
class ExplorerMap:
    """One 2-D map; every point is drawn. ``rows`` index keys/columns/thumbnails (a map may hold a subset)."""

    name: str
    xy: np.ndarray  # [m, 2] float32
    rows: np.ndarray  # [m] int64


@dataclass(frozen=True)
class ExplorerLink:
    """The RGB<->IR link map: a sample's RGB point and IR point, joined by a line in the page."""

    name: str
    rgb_xy: np.ndarray  # [m, 2] float32
    ir_xy: np.ndarray  # [m, 2] float32
    rows: np.ndarray  # [m] int64


@dataclass(frozen=True)
class Thumbnails:
    """Atlases of thumbnail cells (RGB thumb | IR thumb side by side) and where each sample's cell is."""

    atlases: list[Path]  # image files (WebP), each a grid of cells
    cell: tuple[int, int]  # (width, height) of ONE thumb; a cell is (2*width, height)
    per_row: int  # cells per atlas row
    atlas: np.ndarray  # [n] int32, atlas index of sample i, -1 = no thumbnail
    slot: np.ndarray  # [n] int32, cell index within that atlas (row-major)
    ir_range_c: np.ndarray  # [n, 2] float32, the IR thumb's (min, max) in deg C (NaN when none)


@dataclass(frozen=True)
class _Column:
    """A column as the page gets it: categorical codes into labels, or float32 values with their range."""

    name: str
    kind: str  # "categorical" | "numeric"
    codes: np.ndarray | None = None  # [n] u1/u2/i4 into labels
    labels: tuple[str, ...] = ()
    values: np.ndarray | None = None  # [n] float32, NaN = missing


def write_explorer(out_dir: Path, keys: Sequence[str], columns: Mapping[str, np.ndarray | Sequence],
                   maps: Sequence[ExplorerMap], links: Sequence[ExplorerLink] = (),
                   thumbnails: Thumbnails | None = None, *, title: str = "", dataset: str = "",
                   cluster_column: str | None = None) -> Path:
    """Writes out_dir/index.html (+ js/css/vendor, data/*.js, thumbs/); returns the index.html path.

    Atomic: built in a sibling temp dir, swapped in at the end, so a reader never sees half a page.
    """
    out_dir = Path(out_dir)
    keys = _checked_keys(keys)
    n = len(keys)
    _check_maps(maps, links, n)
    _check_thumbnails(thumbnails, n)
    cluster_columns = _cluster_columns(columns, cluster_column)
    encoded = [_encode_column(name, values, n, name in cluster_columns) for name, values in columns.items()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        _copy_assets(tmp)
        meta = {"version": FORMAT_VERSION, "title": title or "Embedding explorer", "dataset": dataset, "n": n,
                "missingLabel": MISSING, "keysPart": _write_part(tmp, "keys", {"keys": "\n".join(keys)})}
        meta["columns"] = [_write_column(tmp, i, column) for i, column in enumerate(encoded)]
        meta["maps"] = _write_maps(tmp, maps, links, n)
        meta["thumbs"] = _write_thumbnails(tmp, thumbnails)
        meta["clusters"] = _cluster_summaries(encoded, cluster_columns, thumbnails)
        meta["clusterColumn"] = cluster_columns[0] if cluster_columns else None
        _write_js(tmp / "data" / "meta.js", f"window.SAGEPAIRS_EXPLORER = {json.dumps(meta, allow_nan=False)};\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def read_part(path: Path) -> dict:
    """The object a ``data/<part>.js`` file adds to ``window.SAGEPAIRS_EXPLORER_PARTS`` (or meta.js's object)."""
    lines = Path(path).read_text(encoding="utf-8").strip().splitlines()
    head, sep, body = lines[-1].partition(" = ") if lines else ("", "", "")
    if not sep or not body.rstrip().endswith(";"):
        raise ValueError(f"{path}: not an explorer data file (expected 'NAME = {{...}};')")
    return json.loads(body.rstrip().removesuffix(";"))


def decode_array(encoded: str, dtype: str) -> np.ndarray:
    """A base64 string of a part back into its little-endian array (dtype as meta.js names it: <f4, <i4, u1...)."""
    return np.frombuffer(base64.b64decode(encoded), dtype=np.dtype(dtype))


# ---------------------------------------------------------------------------------------------------------------
# checks: every error names the argument and what was wrong with it


def _checked_keys(keys: Sequence[str]) -> list[str]:
    keys = [str(k) for k in keys]
    if not keys:
        raise ValueError("write_explorer: keys is empty; the explorer needs at least one sample")
    for key in keys:
        if "\n" in key or "\r" in key:
            raise ValueError(f"write_explorer: key {key!r} holds a line break, which keys.csv cannot carry")
    return keys


def _check_rows(what: str, rows: np.ndarray, m: int, n: int) -> None:
    rows = np.asarray(rows)
    if rows.shape != (m,) or rows.dtype.kind not in "iu":
        raise ValueError(f"write_explorer: {what}.rows must be [{m}] integers, got shape {rows.shape} {rows.dtype}")
    if m and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"write_explorer: {what}.rows holds {int(rows.min())}..{int(rows.max())}, outside 0..{n - 1}"
                         " (rows index keys)")


def _check_xy(what: str, xy: np.ndarray) -> int:
    xy = np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"write_explorer: {what} must be [m, 2], got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError(f"write_explorer: {what} holds {int((~np.isfinite(xy)).any(axis=1).sum())} points that are"
                         " not finite")
    return xy.shape[0]


def _check_maps(maps: Sequence[ExplorerMap], links: Sequence[ExplorerLink], n: int) -> None:
    if not maps and not links:
        raise ValueError("write_explorer: no maps and no links; the page needs at least one map")
    names = [m.name for m in maps] + [link.name for link in links]
    if len(set(names)) != len(names):
        raise ValueError(f"write_explorer: map names must be unique, got {names}")
    for one in maps:
        _check_rows(f"map {one.name!r}", one.rows, _check_xy(f"map {one.name!r} xy", one.xy), n)
    for link in links:
        m = _check_xy(f"link {link.name!r} rgb_xy", link.rgb_xy)
        if _check_xy(f"link {link.name!r} ir_xy", link.ir_xy) != m:
            raise ValueError(f"write_explorer: link {link.name!r} has {m} RGB points but "
                             f"{len(link.ir_xy)} IR points")
        _check_rows(f"link {link.name!r}", link.rows, m, n)


def _check_thumbnails(thumbnails: Thumbnails | None, n: int) -> None:
    if thumbnails is None:
        return
    shapes = {"atlas": (np.asarray(thumbnails.atlas).shape, (n,)), "slot": (np.asarray(thumbnails.slot).shape, (n,)),
              "ir_range_c": (np.asarray(thumbnails.ir_range_c).shape, (n, 2))}
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"write_explorer: thumbnails.{name} must have shape {want} (n = {n} keys), got {got}")
    atlas = np.asarray(thumbnails.atlas)
    if n and (atlas.min() < -1 or atlas.max() >= len(thumbnails.atlases)):
        raise ValueError(f"write_explorer: thumbnails.atlas holds {int(atlas.min())}..{int(atlas.max())} but there "
                         f"are {len(thumbnails.atlases)} atlases (-1 = no thumbnail)")
    for path in thumbnails.atlases:
        if not Path(path).is_file():
            raise ValueError(f"write_explorer: thumbnail atlas {path} does not exist")


def _cluster_columns(columns: Mapping, cluster_column: str | None) -> list[str]:
    """The columns that get the cluster panel: cluster_column first, then "cluster" and "cluster_*"."""
    if cluster_column is not None and cluster_column not in columns:
        raise ValueError(f"write_explorer: cluster_column {cluster_column!r} is not among the columns "
                         f"{list(columns)}")
    named = [c for c in columns if c == "cluster" or c.startswith("cluster_")]
    return ([cluster_column] if cluster_column else []) + [c for c in named if c != cluster_column]


# ---------------------------------------------------------------------------------------------------------------
# columns


def _encode_column(name: str, values, n: int, categorical: bool) -> _Column:
    """Strings, bools and dates become categories; numbers a numeric scale unless they take few distinct
    (integral) values, or the column is a cluster column."""
    array = np.asarray(values)
    if array.shape != (n,):
        raise ValueError(f"write_explorer: column {name!r} has shape {array.shape}, keys has {n} values")
    if array.dtype.kind in "iuf" and not categorical and not _few_integral(array):
        return _numeric(name, array)
    return _categorical(name, array)


def _few_integral(array: np.ndarray) -> bool:
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    distinct = np.unique(finite)
    return len(distinct) <= FEW_DISTINCT and bool(np.all(distinct == np.round(distinct)))


def _numeric(name: str, array: np.ndarray) -> _Column:
    values = array.astype(np.float32)
    if not np.isfinite(values).any():
        return _categorical(name, np.full(len(values), None, dtype=object))
    return _Column(name, "numeric", values=np.where(np.isfinite(values), values, np.float32("nan")))


def _categorical(name: str, array: np.ndarray) -> _Column:
    """Codes into sorted labels; missing values (None, NaN, NaT) get the last label, MISSING."""
    missing, present = _missing_mask(array), None
    kind = array.dtype.kind
    if kind == "b":
        present = np.where(array, "true", "false")
    elif kind in "iu":
        present = array
    elif kind == "f":
        filled = np.where(missing, 0, array)
        integral = bool(np.all(filled == np.round(filled)))  # so a float cluster id 3.0 is the label "3"
        present = filled.astype(np.int64) if integral else filled.astype(str)
    elif kind == "M":
        present = np.datetime_as_string(array)
    else:
        present = np.array([_label(v) for v in array.tolist()], dtype=object).astype(str)
    labels, codes = np.unique(np.asarray(present)[~missing], return_inverse=True)
    full = np.full(len(array), len(labels), dtype=np.int64)
    full[~missing] = codes
    labels = [_label(v) for v in labels.tolist()] + ([MISSING] if missing.any() else [])
    return _Column(name, "categorical", codes=full.astype(_code_dtype(len(labels))), labels=tuple(labels))


def _missing_mask(array: np.ndarray) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "f":
        return np.isnan(array)
    if kind == "M":
        return np.isnat(array)
    if kind == "O":
        return np.array([_is_missing(v) for v in array.tolist()], dtype=bool)
    return np.zeros(len(array), dtype=bool)


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN (and NaT)
    except TypeError:  # pandas.NA: its comparisons are NA, whose truth is undefined
        return True


def _label(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _code_dtype(count: int) -> str:
    return "u1" if count <= 0xFF else "<u2" if count <= 0xFFFF else "<i4"


def _write_column(root: Path, index: int, column: _Column) -> dict:
    part = f"col-{index:03d}"
    if column.kind == "numeric":
        finite = column.values[np.isfinite(column.values)]
        _write_part(root, part, {"values": _b64(column.values, "<f4")})
        return {"name": column.name, "kind": "numeric", "part": part, "dtype": "<f4",
                "min": float(finite.min()), "max": float(finite.max()),
                "missing": int(len(column.values) - len(finite))}
    dtype = _code_dtype(len(column.labels))
    _write_part(root, part, {"codes": _b64(column.codes, dtype)})
    return {"name": column.name, "kind": "categorical", "part": part, "dtype": dtype, "labels": list(column.labels),
            "counts": np.bincount(column.codes, minlength=len(column.labels)).tolist()}


# ---------------------------------------------------------------------------------------------------------------
# maps, thumbnails, clusters


def _rows_or_identity(rows: np.ndarray, n: int) -> str | None:
    """None when the map holds every sample in key order (the common case: the page makes 0..n-1 itself)."""
    rows = np.asarray(rows)
    return None if len(rows) == n and np.array_equal(rows, np.arange(n)) else _b64(rows, "<i4")


def _write_maps(root: Path, maps: Sequence[ExplorerMap], links: Sequence[ExplorerLink], n: int) -> list[dict]:
    specs = []
    for one in maps:
        part = f"map-{len(specs):02d}"
        _write_part(root, part, {"xy": _b64(one.xy, "<f4"), "rows": _rows_or_identity(one.rows, n)})
        specs.append({"name": one.name, "kind": "map", "part": part, "m": len(one.rows)})
    for link in links:
        part = f"map-{len(specs):02d}"
        _write_part(root, part, {"rgb": _b64(link.rgb_xy, "<f4"), "ir": _b64(link.ir_xy, "<f4"),
                                 "rows": _rows_or_identity(link.rows, n)})
        specs.append({"name": link.name, "kind": "link", "part": part, "m": len(link.rows)})
    return specs


def _write_thumbnails(root: Path, thumbnails: Thumbnails | None) -> dict | None:
    """Hard-links (or copies, across file systems) the atlases into thumbs/ and writes where each sample is."""
    if thumbnails is None:
        return None
    (root / "thumbs").mkdir()
    atlases = []
    for i, source in enumerate(thumbnails.atlases):
        source = Path(source)
        name = f"atlas-{i:04d}{source.suffix.lower()}"
        _link_or_copy(source, root / "thumbs" / name)
        with Image.open(source) as image:
            width, height = image.size
        atlases.append({"file": name, "width": width, "height": height})
    _write_part(root, "thumbs", {"atlas": _b64(thumbnails.atlas, "<i4"), "slot": _b64(thumbnails.slot, "<i4"),
                                 "irRange": _b64(thumbnails.ir_range_c, "<f4")})
    width, height = thumbnails.cell
    return {"part": "thumbs", "atlases": atlases, "cell": [int(width), int(height)],
            "perRow": int(thumbnails.per_row)}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _cluster_summaries(columns: list[_Column], cluster_columns: list[str],
                       thumbnails: Thumbnails | None) -> dict:
    """Per cluster column, per cluster: size, the metadata values most over-represented in it (share in the
    cluster against share overall), and example rows (with thumbnails when there are any)."""
    by_name = {c.name: c for c in columns}
    others = [c for c in columns if c.kind == "categorical" and c.name not in cluster_columns]
    has_thumb = (np.asarray(thumbnails.atlas) >= 0) if thumbnails is not None else None
    return {name: _clusters_of(by_name[name], others, has_thumb) for name in cluster_columns}


def _clusters_of(cluster: _Column, others: list[_Column], has_thumb: np.ndarray | None) -> list[dict]:
    k = len(cluster.labels)
    codes = cluster.codes.astype(np.int64)
    sizes = np.bincount(codes, minlength=k)
    tops = [[] for _ in range(k)]
    for column in others:
        labels = len(column.labels)
        counts = np.bincount(codes * labels + column.codes, minlength=k * labels).reshape(k, labels)
        overall = counts.sum(axis=0) / max(1, len(codes))
        best = counts.argmax(axis=1)
        for c in range(k):
            if sizes[c]:
                share = counts[c, best[c]] / sizes[c]
                tops[c].append((share - overall[best[c]], column.name, column.labels[best[c]], share,
                                overall[best[c]]))
    rng = np.random.default_rng(0)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [{"code": c, "label": cluster.labels[c], "size": int(sizes[c]),
             "top": [[name, value, round(float(share), 4), round(float(overall), 4)]
                     for _, name, value, share, overall in sorted(tops[c], reverse=True)[:CLUSTER_TOP_SHARES]],
             "examples": _examples(order[starts[c]:starts[c + 1]], has_thumb, rng)}
            for c in range(k) if sizes[c]]


def _examples(rows: np.ndarray, has_thumb: np.ndarray | None, rng: np.random.Generator) -> list[int]:
    if has_thumb is not None and has_thumb[rows].any():
        rows = rows[has_thumb[rows]]
    picked = rng.choice(rows, size=min(CLUSTER_EXAMPLES, len(rows)), replace=False)
    return sorted(int(r) for r in picked)


# ---------------------------------------------------------------------------------------------------------------
# files


def _b64(array, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(array), dtype=np.dtype(dtype)).tobytes()).decode("ascii")


def _write_part(root: Path, name: str, payload: dict) -> str:
    """data/<name>.js: one entry of window.SAGEPAIRS_EXPLORER_PARTS; returns name."""
    body = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    _write_js(root / "data" / f"{name}.js",
              f"{PARTS_GLOBAL} = {PARTS_GLOBAL} || {{}};\n{PARTS_GLOBAL}[{json.dumps(name)}] = {body};\n")
    return name


def _write_js(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _copy_assets(root: Path) -> None:
    for name in STATIC_FILES:
        source = ASSETS / name
        if not source.is_file():
            raise FileNotFoundError(f"write_explorer: the page's asset {source} is missing from the installation")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / name)


def _remove_leftovers(out_dir: Path) -> None:
    """Half-written pages of a writer that was killed (SIGKILL runs no cleanup): never read, only taking room."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Puts the finished ``tmp`` at ``out_dir``: the old one (if any) moves aside by one rename and the new one in
    by another, then the old one is deleted, and with it any that a swap killed between its renames left aside."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
