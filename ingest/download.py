"""`ingest download RAW`: SAGE upload records -> ``RAW/<VSN>/<ts_ns>-<filename>``, resumable and exact.

Order of work: query the upload records of each VSN with ``sage_data_client``; store the result as
``RAW/metadata/<stem>.parquet`` beside ``<stem>.query.json`` (the query that produced it), which is what
``build-shards`` joins for positions; pick the files ingest uses; fetch them concurrently with ``requests``,
each into ``<dest>.part``, continued with an HTTP Range request after a failure and renamed only when its
size is verified. A file that keeps failing is listed in the summary; every other file is still fetched.

Credentials for private nodes (``SAGE_USERNAME``/``SAGE_ACCESS_TOKEN``, else ``~/.netrc`` through requests)
live only in the sessions' basic auth: never in the config, a message, or a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd
import requests
import sage_data_client
import urllib3
from requests.utils import get_netrc_auth
from tqdm import tqdm

from ingest.metadata import QUERY_RECORD_SUFFIX, column_values, text_or_none
from ingest.naming import classify_name, parse_raw_path

__all__ = [
    "DEFAULT_ENDPOINT",
    "PART_SUFFIX",
    "DownloadConfig",
    "DownloadError",
    "DownloadSummary",
    "UploadFile",
    "dest_path",
    "download",
    "env_credentials",
    "metadata_stem",
    "query_uploads",
    "redact_url",
    "select_files",
    "upload_filename",
    "wants_file",
]

DEFAULT_ENDPOINT = "https://data.sagecontinuum.org/api/v1/query"
PART_SUFFIX = ".part"
_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 60.0
_MAX_STEM_CHARS = 160  # file names stay well under the usual 255-byte limit
# What --all-files adds to the optical JPEG and celsius CSV. Plots are matplotlib renders of the CSV: never fetched.
_EXTRA_KINDS = frozenset({"uint_csv", "thermal_raw", "netcdf"})
_CONTENT_RANGE_RE = re.compile(r"^bytes (?:(?P<first>\d+)-(?P<last>\d+)|\*)/(?P<total>\d+|\*)$")


class DownloadError(RuntimeError):
    """A download that cannot start or whose query failed; no file was fetched."""


def _utc(text: str, what: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(text)
    except (TypeError, ValueError):
        stamp = pd.NaT
    if pd.isna(stamp):
        raise ValueError(f"{what} {text!r} is not a date or time (e.g. 2023-06-01 or 2023-06-01T12:00:00Z)")
    # sage_data_client formats times as '...Z' without converting them, so a zone must be resolved here.
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


@dataclass(frozen=True)
class DownloadConfig:
    """What `ingest download` fetches and how hard it tries. Holds no credentials (they come from the environment)."""

    raw_dir: str | os.PathLike[str]
    vsns: tuple[str, ...]
    start: str  # UTC unless it names a zone; date-only means midnight
    end: str  # exclusive
    plugin: str = "*mobotix*"  # glob on meta.plugin
    all_files: bool = False  # also the uint CSV, .raw and .nc (never plots)
    workers: int = 8
    endpoint: str = DEFAULT_ENDPOINT
    timeout_s: float = 60.0  # per connect and per read: a stalled transfer is retried after this
    retries: int = 5  # attempts per file (and per query), the first one included
    backoff_s: float = 0.5  # wait before the second attempt; doubles for each further one

    def __post_init__(self) -> None:
        if not str(self.raw_dir):
            raise ValueError("raw_dir must be a directory path")
        if isinstance(self.vsns, str) or not self.vsns:
            raise ValueError(f"vsns must be a non-empty tuple of VSNs (e.g. ('W056',)), got {self.vsns!r}")
        # build-shards reads RAW/<VSN>/ only for names like these (naming.parse_raw_path).
        bad = [v for v in self.vsns if not (isinstance(v, str) and v.isascii() and v.isalnum() and 2 <= len(v) <= 8)]
        if bad:
            raise ValueError(f"VSNs must be 2-8 letters or digits (e.g. W056), got {', '.join(map(repr, bad))}")
        if self.end_utc <= self.start_utc:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if not self.plugin.strip():
            raise ValueError("plugin must be a glob such as '*mobotix*'")
        if urlsplit(self.endpoint).scheme not in ("http", "https") or not urlsplit(self.endpoint).hostname:
            raise ValueError(f"endpoint must be an http(s) URL, got {redact_url(self.endpoint)!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 1:
            raise ValueError(f"retries (attempts per file) must be >= 1, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")

    @property
    def start_utc(self) -> pd.Timestamp:
        return _utc(self.start, "start")

    @property
    def end_utc(self) -> pd.Timestamp:
        return _utc(self.end, "end")


@dataclass
class DownloadSummary:
    records: int = 0  # upload records the query returned
    selected: int = 0  # files among them that were wanted
    downloaded: int = 0  # completed in this run (resumed ones included)
    skipped_complete: int = 0  # already in RAW with the server's size
    resumed: int = 0  # continued from a .part of an earlier attempt or run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (URL without credentials, reason)
    bytes: int = 0  # received in this run
    metadata_path: str | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [
            f"query: {self.records} upload records, {self.selected} files wanted"
            + (f" (metadata: {self.metadata_path})" if self.metadata_path else ""),
            f"downloaded {self.downloaded} ({self.resumed} resumed), already complete {self.skipped_complete},"
            f" failed {len(self.failed)}; {_human_bytes(self.bytes)} in {self.seconds:.1f} s",
        ]
        if self.failed:
            lines.append("failed (run the same command again to retry; complete files are skipped):")
            lines += [f"  {url}: {reason}" for url, reason in self.failed]
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- pure helpers


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages and records."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def upload_filename(url: str, meta_filename: str | None) -> str | None:
    """``meta.filename``, else the URL's last segment after its first '-' (objects are stored as ``<ts_ns>-<name>``).

    Only the first '-' separates: custom-scan names contain '-' themselves.
    """
    if meta_filename:
        return meta_filename
    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    _, sep, name = last.partition("-")
    return name if sep and name else None


def wants_file(filename: str, all_files: bool) -> bool:
    """Optical JPEGs and celsius CSVs always; the uint CSV, .raw and .nc with ``all_files``; plots never."""
    name = classify_name(filename)
    return name.role in ("rgb", "thermal") or (all_files and name.kind in _EXTRA_KINDS)


@dataclass(frozen=True)
class UploadFile:
    """One file to fetch: where it is and where it goes."""

    url: str
    vsn: str
    ts_ns: int
    filename: str


def dest_path(record: UploadFile) -> str:
    """``<VSN>/<ts_ns>-<filename>`` relative to RAW: the layout build-shards reads."""
    return f"{record.vsn}/{record.ts_ns}-{record.filename}"


def _placement_problem(url: str, vsn: str | None, filename: str) -> str | None:
    """Why a record cannot become a file under RAW (None when it can)."""
    if urlsplit(url).scheme not in ("http", "https"):
        return f"value is not an http(s) URL: {redact_url(url)!r}"
    if vsn is None:
        return "record has no meta.vsn"
    if "/" in filename or "\\" in filename or "\0" in filename or filename in (".", ".."):
        return f"file name {filename!r} is not a plain name"
    return None


def select_files(frame: pd.DataFrame, all_files: bool) -> tuple[list[UploadFile], list[tuple[str, str]]]:
    """Wanted files of a query result, in (VSN, ts_ns, name) order, and (URL, reason) for wanted records that
    cannot be placed under RAW. A file listed twice is fetched once."""
    if len(frame) == 0 or "value" not in frame.columns:
        return [], []
    uploads = frame[frame["name"].astype(str) == "upload"]
    ts_ns = pd.to_datetime(uploads["timestamp"], utc=True).dt.as_unit("ns").astype("int64").tolist()
    files: dict[str, UploadFile] = {}
    problems: list[tuple[str, str]] = []
    for url, ts, vsn, meta_name in zip(
        uploads["value"].astype(str).tolist(), ts_ns, column_values(uploads, "meta.vsn"), column_values(uploads, "meta.filename")
    ):
        filename = upload_filename(url, text_or_none(meta_name))
        if filename is None or not wants_file(filename, all_files):
            continue
        problem = _placement_problem(url, text_or_none(vsn), filename)
        if problem is not None:
            problems.append((redact_url(url), problem))
            continue
        record = UploadFile(url=url, vsn=str(text_or_none(vsn)), ts_ns=int(ts), filename=filename)
        parsed = parse_raw_path(dest_path(record))
        if parsed is None or (parsed.vsn, parsed.ts_ns, parsed.filename) != (record.vsn, record.ts_ns, record.filename):
            problems.append((redact_url(url), f"{dest_path(record)} would not be read back by build-shards"))
            continue
        files.setdefault(dest_path(record), record)
    return sorted(files.values(), key=lambda f: (f.vsn, f.ts_ns, f.filename)), problems


def metadata_stem(config: DownloadConfig) -> str:
    """Name of the stored query result: the same query always gets the same name, so a rerun replaces its own
    result and nothing else."""

    def stamp(t: pd.Timestamp) -> str:
        return t.strftime("%Y%m%dT%H%M%SZ")

    vsns = "-".join(sorted(set(config.vsns)))
    plugin = re.sub(r"[^A-Za-z0-9.-]+", "_", config.plugin).strip("_") or "any"
    stem = f"uploads_{vsns}_{stamp(config.start_utc)}_{stamp(config.end_utc)}_{plugin}"
    if len(stem) > _MAX_STEM_CHARS:
        digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
        stem = f"uploads_{len(set(config.vsns))}nodes_{stamp(config.start_utc)}_{stamp(config.end_utc)}_{digest}"
    return stem


def env_credentials(environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(user, token) from SAGE_USERNAME/SAGE_ACCESS_TOKEN; None lets requests look in ~/.netrc (or $NETRC)."""
    user, token = environ.get("SAGE_USERNAME", ""), environ.get("SAGE_ACCESS_TOKEN", "")
    if user and token:
        return user, token
    if user or token:
        missing = "SAGE_ACCESS_TOKEN" if user else "SAGE_USERNAME"
        raise DownloadError(f"{missing} is not set: SAGE_USERNAME and SAGE_ACCESS_TOKEN go together")
    return None


# ---------------------------------------------------------------------------------------------- query


def _query_time(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # what sage_data_client sends


def _query_filters(config: DownloadConfig) -> list[dict[str, str]]:
    # One query per VSN: a glob in the filter is documented, an alternation of VSNs is not.
    return [{"name": "upload", "plugin": config.plugin, "vsn": vsn} for vsn in sorted(set(config.vsns))]


@contextmanager
def _default_socket_timeout(seconds: float) -> Iterator[None]:
    # sage_data_client.query calls urlopen without a timeout: a stalled API would otherwise hang forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _query_error(exc: Exception) -> tuple[str, bool]:
    """A short description of a failed query, and whether another attempt may succeed."""
    if isinstance(exc, HTTPError):
        try:
            body = exc.read(300).decode("utf-8", "replace").strip()
        except Exception:  # the error body is only a hint; any failure to read it is no news
            body = ""
        return f"HTTP {exc.code} {exc.reason}" + (f": {body}" if body else ""), exc.code >= 500 or exc.code == 429
    if isinstance(exc, (ValueError, KeyError)):  # a response that is not the API's NDJSON
        return f"unreadable response ({type(exc).__name__}: {exc})", False
    return f"{type(exc).__name__}: {exc}", True  # URLError, timeouts, dropped connections


def query_uploads(config: DownloadConfig) -> pd.DataFrame:
    """The sage_data_client DataFrame of upload records for all of the config's VSNs (API order per VSN)."""
    frames = []
    for flt in _query_filters(config):
        for attempt in range(1, config.retries + 1):
            try:
                with _default_socket_timeout(config.timeout_s):
                    frame = sage_data_client.query(
                        start=config.start_utc, end=config.end_utc, filter=flt, endpoint=config.endpoint
                    )
                break
            except Exception as exc:  # urllib, http.client, json and pandas all raise their own types
                reason, transient = _query_error(exc)
                if not transient or attempt == config.retries:
                    raise DownloadError(
                        f"query to {redact_url(config.endpoint)} for VSN {flt['vsn']} failed"
                        f" (attempt {attempt} of {config.retries}): {reason}"
                    ) from None
                time.sleep(_backoff(config.backoff_s, attempt))
        frames.append(frame)
    filled = [f for f in frames if len(f)]
    # pandas warns about concatenating empty frames; an all-empty result keeps the client's empty columns.
    return pd.concat(filled, ignore_index=True) if filled else frames[0]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_metadata(raw: Path, config: DownloadConfig, frame: pd.DataFrame) -> Path:
    """RAW/metadata/<stem>.parquet and the query record beside it; returns the Parquet path."""
    folder = raw / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    stem = metadata_stem(config)
    parquet = folder / f"{stem}.parquet"
    try:
        # Parquet keeps the timestamps as datetime64[ns, UTC]: build-shards needs every nanosecond of them.
        _atomic_write(parquet, lambda tmp: frame.to_parquet(tmp, index=False))
    except (ValueError, TypeError, ImportError) as exc:  # pyarrow's errors derive from these
        raise DownloadError(f"{parquet}: cannot store the query result as Parquet: {exc}") from None
    try:
        client = package_metadata.version("sage-data-client")
    except package_metadata.PackageNotFoundError:
        client = "unknown"
    record = {
        "endpoint": redact_url(config.endpoint),
        "queries": [
            {"start": _query_time(config.start_utc), "end": _query_time(config.end_utc), "filter": flt}
            for flt in _query_filters(config)
        ],
        "records": len(frame),
        "result": parquet.name,
        "client": f"sage-data-client {client}",
        "queried_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2) + "\n"
    _atomic_write(folder / f"{stem}{QUERY_RECORD_SUFFIX}", lambda tmp: tmp.write_text(text))
    return parquet


# ---------------------------------------------------------------------------------------------- transfer


def _backoff(base_s: float, attempt: int) -> float:
    """Wait after failed attempt number ``attempt`` (1, 2, ...)."""
    return min(base_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)


class _Retry(Exception):
    """This attempt failed in a way another attempt may not (timeouts, 5xx, dropped connections)."""


class _GiveUp(Exception):
    """No further attempt can help (401/403/404, a bad URL, a local disk error)."""


@dataclass(frozen=True)
class _Outcome:
    status: str  # downloaded, complete or failed
    resumed: bool = False
    reason: str | None = None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None for what it leaves out."""
    match = _CONTENT_RANGE_RE.match((value or "").strip())
    if match is None:
        return None, None
    first, total = match.group("first"), match.group("total")
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body's bytes as they arrive, exactly as stored (no content decoding).

    Not ``iter_content``: urllib3's ``read(amt)`` waits to fill ``amt`` and drops what it holds when the
    connection breaks or stalls, so a .part would miss up to a chunk; ``read1`` hands over every byte received.
    Errors are urllib3's own (ProtocolError, ReadTimeoutError), not requests'.
    """
    while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=False):
        yield chunk


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


class _Fetcher:
    """Fetches files of one run: a requests session per thread, the retry policy and byte counting."""

    def __init__(self, raw: Path, config: DownloadConfig, auth: tuple[str, str] | None, on_bytes: Callable[[int], None]):
        self._raw = raw
        self._config = config
        self._auth = auth
        self._on_bytes = on_bytes
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()  # Sessions are not documented as thread-safe: one per thread.
            session.auth = self._auth  # None: requests applies ~/.netrc per host
            # Byte counts and Range offsets must refer to the stored file, not to a compressed transfer of it.
            session.headers["Accept-Encoding"] = "identity"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _status_problem(self, response: requests.Response, url: str) -> None:
        """Raise for a status that is not a success (206 and 416 are the caller's business)."""
        code = response.status_code
        if code < 400:
            return
        if code in (401, 403):
            host = urlsplit(url).hostname or "the storage host"
            had = self._auth is not None or get_netrc_auth(url) is not None
            why = "the credentials were refused" if had else "no credentials were found"
            raise _GiveUp(
                f"HTTP {code} ({why}): this node's files are private; set SAGE_USERNAME and SAGE_ACCESS_TOKEN"
                f" (your SAGE portal user name and access token) or add 'machine {host} login USER password TOKEN'"
                " to ~/.netrc"
            )
        if code in (404, 410):
            raise _GiveUp(f"HTTP {code}: the server has no such file")
        if code >= 500 or code in (408, 429):
            raise _Retry(f"HTTP {code} {response.reason}".rstrip())
        raise _GiveUp(f"HTTP {code} {response.reason}".rstrip())

    def _remote_size(self, url: str) -> int | None:
        """The server's size of a file, or None when it does not say."""
        timeout = self._config.timeout_s
        with self._session().head(url, allow_redirects=True, timeout=timeout) as head:
            if head.status_code == 401:
                self._status_problem(head, url)
            if head.ok and _content_length(head) is not None:
                return _content_length(head)
        # Some stores refuse HEAD (e.g. URLs signed for GET only): the headers of a GET say the same.
        with self._session().get(url, stream=True, timeout=timeout) as response:
            self._status_problem(response, url)
            return _content_length(response)

    def _transfer(self, url: str, part: Path) -> bool:
        """Fetch ``url`` into ``part``, continuing what is there; returns whether it continued a partial file.

        Raises _Retry with the .part kept (the next attempt continues it) or _GiveUp.
        """
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._session().get(url, headers=headers, stream=True, timeout=self._config.timeout_s) as response:
            if response.status_code == 416 and offset:
                _, total = _parse_content_range(response.headers.get("Content-Range"))
                if total == offset:
                    return True  # an earlier attempt received every byte but stopped before the rename
                part.unlink()
                raise _Retry(f"a .part of {offset} bytes does not fit the server's {total} bytes; starting over")
            self._status_problem(response, url)
            if response.status_code == 206:
                first, total = _parse_content_range(response.headers.get("Content-Range"))
                if first != offset or total is None:
                    part.unlink(missing_ok=True)
                    raise _Retry(f"asked for bytes from {offset}, got Content-Range {response.headers.get('Content-Range')!r}")
                mode = "ab"
            else:
                # A 200 is the whole file, also when a Range was asked for and ignored: start the file again.
                total, mode, offset = _content_length(response), "wb", 0
            with open(part, mode) as out:
                for chunk in _body_chunks(response):
                    out.write(chunk)
                    self._on_bytes(len(chunk))
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"incomplete body: {size} of {total} bytes")
        return offset > 0

    def fetch(self, item: UploadFile) -> _Outcome:
        dest = self._raw / dest_path(item)
        part = dest.with_name(dest.name + PART_SUFFIX)
        resumed = False
        reason = ""
        for attempt in range(1, self._config.retries + 1):
            if attempt > 1:
                time.sleep(_backoff(self._config.backoff_s, attempt - 1))
            try:
                if dest.exists():
                    size = self._remote_size(item.url)
                    if size is None or size == dest.stat().st_size:
                        part.unlink(missing_ok=True)
                        return _Outcome("complete")
                    # Stored files never change, so a size that differs means the local copy is damaged.
                dest.parent.mkdir(parents=True, exist_ok=True)
                resumed = self._transfer(item.url, part) or resumed
                os.replace(part, dest)
                return _Outcome("downloaded", resumed=resumed)
            except _GiveUp as exc:
                return _Outcome("failed", reason=str(exc))
            except _Retry as exc:
                reason = str(exc)
            except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
                reason = f"timed out (no data for {self._config.timeout_s:g} s)"
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
                return _Outcome("failed", reason=f"bad URL: {type(exc).__name__}")
            except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                reason = f"connection dropped ({type(exc).__name__})"
            except OSError as exc:  # after requests' exceptions, which are OSErrors too: this is the local disk
                return _Outcome("failed", reason=f"cannot write {part}: {exc.strerror or exc}")
        return _Outcome("failed", reason=f"{reason} (gave up after {self._config.retries} attempts)")


def download(config: DownloadConfig, progress: bool = True) -> DownloadSummary:
    """Query, store the metadata, fetch every wanted file; see the module docstring.

    Raises DownloadError when nothing can start (half-set credentials, a failed query). Files that fail
    are listed in ``summary.failed``.
    """
    t_start = time.perf_counter()
    auth = env_credentials()
    raw = Path(config.raw_dir)
    frame = query_uploads(config)
    parquet = _write_metadata(raw, config, frame)
    files, unplaceable = select_files(frame, config.all_files)
    summary = DownloadSummary(
        records=len(frame), selected=len(files) + len(unplaceable), failed=list(unplaceable), metadata_path=str(parquet)
    )

    files_bar = tqdm(total=len(files), unit="file", desc="download", disable=not progress or not files)
    bytes_bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="received", disable=not progress or not files)
    bytes_lock = threading.Lock()

    def count_bytes(n: int) -> None:
        with bytes_lock:
            summary.bytes += n
            bytes_bar.update(n)

    fetcher = _Fetcher(raw, config, auth, count_bytes)
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="download")
    try:
        futures: dict[Future[_Outcome], UploadFile] = {pool.submit(fetcher.fetch, f): f for f in files}
        for future in as_completed(futures):
            outcome = future.result()
            files_bar.update(1)
            if outcome.status == "complete":
                summary.skipped_complete += 1
            elif outcome.status == "downloaded":
                summary.downloaded += 1
                summary.resumed += outcome.resumed
            else:
                summary.failed.append((redact_url(futures[future].url), outcome.reason or "unknown"))
    except BaseException:
        # Transfers in flight keep their .part files: the next run continues them.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        files_bar.close()
        bytes_bar.close()
    pool.shutdown(wait=True)
    fetcher.close()
    summary.failed.sort()
    summary.seconds = time.perf_counter() - t_start
    return summary
