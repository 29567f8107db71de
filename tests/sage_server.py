"""A loopback stand-in for the SAGE data API and its file store, for tests of `ingest download`.

- Query: ``POST /api/v1/query`` with ``{"start", "end", "filter"}`` (what ``sage_data_client.query`` sends) answers
  NDJSON lines as the real API writes them (RFC 3339 timestamps with up to 9 fraction digits, trailing zeros
  dropped; a ``meta`` object with sorted keys), gzipped when the client accepts gzip. Filter values are globs on
  ``name`` and on meta keys; a record matches when ``start <= timestamp < end``.
- Files: ``GET``/``HEAD /api/v1/data/{job}/{plugin-slug}-{version}/{node_id}/{ts_ns}-{filename}`` with Range support
  (206 + Content-Range, 416), basic auth for private nodes, and faults queued per file (consumed by GETs).

Everything listens on 127.0.0.1 only. Every request is recorded in ``server.seen``.
"""

from __future__ import annotations

import base64
import fnmatch
import gzip
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import pandas as pd

SCAN_PLUGIN = "registry.sagecontinuum.org/bhupendraraut/mobotix-scan:0.23.4.24"

# 500: answer HTTP 500. drop: send half the body, then close the connection. stall: send nothing until the
# client has given up. stall_body: send half the body, then nothing. ignore_range: answer 200 with the whole
# file whatever Range asked for.
FAULTS = ("500", "drop", "stall", "stall_body", "ignore_range")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Upload:
    """One stored file and the upload record that describes it."""

    vsn: str
    node_id: str
    ts_ns: int
    filename: str
    data: bytes
    plugin: str = SCAN_PLUGIN
    job: str = "sage"
    private: bool = False
    meta: dict[str, str] = field(default_factory=dict)  # extra meta keys (position, loop_num, ...)

    @property
    def path(self) -> str:
        image = self.plugin.rsplit("/", 1)[-1].replace(":", "-")
        return f"/api/v1/data/{self.job}/sage-{image}/{self.node_id}/{self.ts_ns}-{quote(self.filename)}"


@dataclass
class Measurement:
    """A record that is not a file (e.g. exit.status): the query must filter it out by name."""

    vsn: str
    node_id: str
    ts_ns: int
    name: str
    value: object
    plugin: str = SCAN_PLUGIN


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorization: bool
    status: int | None  # None where the connection was dropped or stalled before a status line


def rfc3339_nano(ts_ns: int) -> str:
    """Go's time.RFC3339Nano in UTC, as the API writes record timestamps."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    text = pd.Timestamp(seconds, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


class SageServer:
    def __init__(self, credentials: tuple[str, str], stall_s: float = 2.0) -> None:
        self.credentials = credentials
        self.stall_s = stall_s
        self.uploads: dict[str, Upload] = {}
        self.measurements: list[Measurement] = []
        self.seen: list[Seen] = []
        self.queries: list[dict] = []
        self._faults: dict[str, list[str]] = {}
        self._query_faults: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.sage = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- setup -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/api/v1/query"

    def add(self, upload: Upload) -> Upload:
        self.uploads[upload.path] = upload
        return upload

    def url_of(self, upload: Upload) -> str:
        return self.url + upload.path

    def fail(self, upload: Upload, *faults: str) -> None:
        """Queue faults for the next GETs of ``upload`` (one per GET, in order)."""
        assert all(f in FAULTS for f in faults), faults
        with self._lock:
            self._faults.setdefault(upload.path, []).extend(faults)

    def fail_query(self, *faults: str) -> None:
        """Queue faults for the next queries: "500" or "stall" (no answer until the client has given up)."""
        assert all(f in ("500", "stall") for f in faults), faults
        with self._lock:
            self._query_faults.extend(faults)

    def gets(self, upload: Upload) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and s.path == upload.path]

    def start(self) -> SageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------------
    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

    def _next_query_fault(self) -> str | None:
        with self._lock:
            return self._query_faults.pop(0) if self._query_faults else None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _authorized(self, header: str | None) -> bool:
        user, token = self.credentials
        expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        return header == expected

    def _query_lines(self, body: dict) -> list[str]:
        start = pd.Timestamp(body["start"]).value
        end = pd.Timestamp(body["end"]).value if "end" in body else None
        patterns: dict[str, str] = body.get("filter") or {}
        rows = []
        for upload in self.uploads.values():
            meta = {
                "filename": upload.filename, "host": f"{upload.node_id}.ws-nxcore", "job": upload.job,
                "node": upload.node_id, "plugin": upload.plugin, "task": "mobotix-scan", "vsn": upload.vsn,
                "zone": "core", **upload.meta,
            }
            rows.append((upload.ts_ns, "upload", self.url + upload.path, meta))
        for m in self.measurements:
            meta = {"host": f"{m.node_id}.ws-nxcore", "job": "sage", "node": m.node_id, "plugin": m.plugin,
                    "task": "mobotix-scan", "vsn": m.vsn, "zone": "core"}
            rows.append((m.ts_ns, m.name, m.value, meta))
        lines = []
        for ts_ns, name, value, meta in sorted(rows, key=lambda r: (r[0], r[1], str(r[2]))):
            if ts_ns < start or (end is not None and ts_ns >= end):
                continue
            fields = {"name": name, **meta}
            if all(k in fields and fnmatch.fnmatchcase(str(fields[k]), p) for k, p in patterns.items()):
                record = {"timestamp": rfc3339_nano(ts_ns), "name": name, "value": value, "meta": dict(sorted(meta.items()))}
                lines.append(json.dumps(record, separators=(",", ":")))
        return lines


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # the socket's own, whatever socket.setdefaulttimeout() says while it is accepted

    server: ThreadingHTTPServer

    @property
    def sage(self) -> SageServer:
        return self.server.sage  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass  # the client gave up (a timeout test) or went away: nothing to answer

    def _plain(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # -- query API ---------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        path = urlsplit(self.path).path
        self.sage._record(Seen("POST", path, None, "Authorization" in self.headers, None))
        if path != "/api/v1/query":
            self._plain(404, '{"error":"not found"}')
            return
        fault = self.sage._next_query_fault()
        if fault == "500":
            self._plain(500, '{"error":"internal error"}')
            return
        if fault == "stall":
            self.sage._stop.wait(self.sage.stall_s)
            self.close_connection = True
            return
        self.sage.queries.append(body)
        data = "".join(line + "\n" for line in self.sage._query_lines(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- file store --------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._file()

    def do_GET(self) -> None:
        self._file()

    def _file(self) -> None:
        path = urlsplit(self.path).path
        upload = self.sage.uploads.get(path) or self.sage.uploads.get(quote(unquote(path)))
        range_header = self.headers.get("Range")
        authorization = self.headers.get("Authorization")

        def record(status: int | None) -> None:
            self.sage._record(Seen(self.command, path, range_header, authorization is not None, status))

        if upload is None:
            record(404)
            self._plain(404, "no such object")
            return
        if upload.private and not self.sage._authorized(authorization):
            record(401)
            self._plain(401, "unauthorized", {"WWW-Authenticate": 'Basic realm="sage"'})
            return
        fault = self.sage._next_fault(path) if self.command == "GET" else None
        if fault == "500":
            record(500)
            self._plain(500, "internal server error")
            return
        if fault == "stall":
            record(None)
            self.sage._stop.wait(self.sage.stall_s)
            self.close_connection = True
            return

        data, status, headers = upload.data, 200, {}
        match = _RANGE_RE.match(range_header or "")
        if match and fault != "ignore_range":
            first = int(match.group(1))
            last = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if first >= len(data):
                record(416)
                self._plain(416, "range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
                return
            data, status = data[first : last + 1], 206
            headers["Content-Range"] = f"bytes {first}-{last}/{len(upload.data)}"
        record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault in ("drop", "stall_body"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if fault == "stall_body":
                self.sage._stop.wait(self.sage.stall_s)
            self.close_connection = True
            return
        self.wfile.write(data)
