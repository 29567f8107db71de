"""The loopback object-storage servers of tests/objectstore.py, checked against a real client (obstore)."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import PermissionDeniedError
from obstore.store import HTTPStore, S3Store

from tests.objectstore import Fault, FaultProxy, RangeHTTPServer, SeaweedS3, free_ports

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
# Quick retries (obstore: 100 ms first backoff; a backoff base of 1 panics in object_store, "cannot sample empty range").
FAST_RETRY = {"max_retries": 10, "backoff": {"init_backoff": datetime.timedelta(milliseconds=10)}}
DATA = random.Random(17).randbytes(3 * 1024 * 1024 + 123)


def s3_store(s3: SeaweedS3, bucket: str | None = None, endpoint: str | None = None, **kwargs) -> S3Store:
    return S3Store(
        bucket or s3.private_bucket,
        endpoint=endpoint or s3.endpoint,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        region="us-east-1",
        client_options={"allow_http": True},
        **kwargs,
    )


def anonymous_store(s3: SeaweedS3, bucket: str) -> S3Store:
    return S3Store(
        bucket, endpoint=s3.endpoint, skip_signature=True, region="us-east-1", client_options={"allow_http": True}
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    directory = tmp_path_factory.mktemp("published")
    (directory / "shards").mkdir()
    (directory / "shards" / "000.tar").write_bytes(DATA)
    (directory / "empty.bin").write_bytes(b"")
    return directory


# ------------------------------------------------------------------------------------------------- SeaweedS3


def test_free_ports_are_distinct_and_paired():
    ports = free_ports(5, offset=10000)
    pairs = ports + [p + 10000 for p in ports]
    assert len(set(pairs)) == 10 and all(p + 10000 <= 65535 for p in ports)


def test_s3_authenticated_put_get_range_head_list(s3):
    store = s3_store(s3)
    obstore.put(store, "a/data.bin", DATA)
    assert obstore.get(store, "a/data.bin").bytes() == DATA
    assert obstore.get_range(store, "a/data.bin", start=1000, end=5000) == DATA[1000:5000]
    parts = obstore.get_ranges(store, "a/data.bin", starts=[0, 2_000_000], lengths=[10, 1_000_000])
    assert [bytes(p) for p in parts] == [DATA[:10], DATA[2_000_000:3_000_000]]
    assert obstore.head(store, "a/data.bin")["size"] == len(DATA)
    listed = [meta["path"] for batch in obstore.list(store, prefix="a/") for meta in batch]
    assert listed == ["a/data.bin"]  # the readiness probe left nothing behind


def test_s3_wrong_secret_is_refused(s3):
    store = S3Store(
        s3.private_bucket, endpoint=s3.endpoint, access_key_id=s3.access_key, secret_access_key="wrong",
        region="us-east-1", client_options={"allow_http": True}, retry_config={"max_retries": 0},
    )
    with pytest.raises((PermissionDeniedError, obstore.exceptions.GenericError)):
        obstore.put(store, "nope.bin", b"x")


def test_s3_public_bucket_reads_anonymously_private_does_not(s3):
    obstore.put(s3_store(s3, s3.public_bucket), "pub/hello.txt", b"hello")
    obstore.put(s3_store(s3), "priv/hello.txt", b"secret")
    public = anonymous_store(s3, s3.public_bucket)
    assert obstore.get(public, "pub/hello.txt").bytes() == b"hello"
    assert obstore.get_range(public, "pub/hello.txt", start=1, end=4) == b"ell"
    assert [m["path"] for batch in obstore.list(public, prefix="pub/") for m in batch] == ["pub/hello.txt"]
    with pytest.raises(PermissionDeniedError):
        obstore.put(public, "pub/vandal.txt", b"x")
    with pytest.raises(PermissionDeniedError):
        obstore.get(anonymous_store(s3, s3.private_bucket), "priv/hello.txt")


def test_s3_env_works_for_a_client_process(s3):
    """A child configured only by env() / anonymous_env() reaches the server (S3Store reads AWS_* itself)."""
    obstore.put(s3_store(s3, s3.public_bucket), "env/x.bin", b"from-env")
    script = (
        "import obstore, sys; from obstore.store import S3Store;"
        "s = S3Store(sys.argv[1]); obstore.put(s, 'env/y.bin', b'ok') if sys.argv[2] == 'w' else None;"
        "sys.stdout.write(bytes(obstore.get(s, 'env/x.bin').bytes()).decode())"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    signed = subprocess.run(
        [sys.executable, "-c", script, s3.public_bucket, "w"], env=base | s3.env(), capture_output=True, text=True
    )
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout == "from-env"
    anonymous = subprocess.run(
        [sys.executable, "-c", script, s3.public_bucket, "r"], env=base | s3.anonymous_env(), capture_output=True,
        text=True,
    )
    assert anonymous.returncode == 0, anonymous.stderr
    assert anonymous.stdout == "from-env"
    assert "AWS_ACCESS_KEY_ID" not in s3.anonymous_env() and s3.secret_key not in repr(s3)


def test_cli_runs_a_command_with_the_server_and_keeps_credentials_quiet(tmp_path):
    script = (
        "import os, sys, obstore; from obstore.store import S3Store;"
        "s = S3Store(os.environ['SAGEPAIRS_DEMO_BUCKET']); obstore.put(s, 'k', b'v');"
        "assert bytes(obstore.get(s, 'k').bytes()) == b'v'; sys.exit(3)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "objectstore.py"), "run", "--dir", str(tmp_path / "s3"), "--",
         sys.executable, "-c", script],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 3, result.stderr
    assert "SeaweedFS S3 at http://127.0.0.1:" in result.stderr
    assert "SECRET" not in result.stderr.upper() and "AWS_" not in result.stdout + result.stderr
    assert any((tmp_path / "s3").iterdir())  # the data stayed where it was asked to be


# ------------------------------------------------------------------------------------------------- RangeHTTPServer


def test_range_server_through_httpstore(published):
    with RangeHTTPServer(published) as server:
        store = HTTPStore(server.url, client_options={"allow_http": True})
        assert obstore.get(store, "shards/000.tar").bytes() == DATA
        assert obstore.get_range(store, "shards/000.tar", start=100, end=70_000) == DATA[100:70_000]
        parts = obstore.get_ranges(store, "shards/000.tar", starts=[5, 3_000_000], ends=[9, len(DATA)], coalesce=0)
        assert [bytes(p) for p in parts] == [DATA[5:9], DATA[3_000_000:]]
        meta = obstore.head(store, "shards/000.tar")
        assert meta["size"] == len(DATA) and meta["e_tag"]
        with pytest.raises(FileNotFoundError):
            obstore.get(store, "shards/missing.tar")
        prefixed = HTTPStore(f"{server.url}/shards", client_options={"allow_http": True})
        assert obstore.get_range(prefixed, "000.tar", start=0, length=4) == DATA[:4]


def raw(url: str, method: str, path: str, headers: dict | None = None, connection=None):
    host, port = url.removeprefix("http://").split(":")
    connection = connection or http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    return response, response.read(), connection


def test_range_server_status_codes_and_keep_alive(published):
    with RangeHTTPServer(published) as server:
        size = len(DATA)
        response, body, conn = raw(server.url, "GET", "/shards/000.tar", {"Range": "bytes=10-19"})
        assert response.status == 206 and body == DATA[10:20]
        assert response.headers["Content-Range"] == f"bytes 10-19/{size}"
        response, body, _ = raw(server.url, "GET", "/shards/000.tar", {"Range": "bytes=-5"}, conn)
        assert response.status == 206 and body == DATA[-5:]
        response, body, _ = raw(server.url, "GET", "/shards/000.tar", {"Range": f"bytes={size - 2}-{size + 99}"}, conn)
        assert response.status == 206 and body == DATA[-2:]
        response, body, _ = raw(server.url, "GET", "/shards/000.tar", {"Range": f"bytes={size}-"}, conn)
        assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{size}"
        response, body, _ = raw(server.url, "GET", "/empty.bin", {"Range": "bytes=0-0"}, conn)
        assert response.status == 416
        response, body, _ = raw(server.url, "GET", "/shards/000.tar", {"Range": "bytes=0-1,5-6"}, conn)
        assert response.status == 200 and len(body) == size
        response, body, _ = raw(server.url, "HEAD", "/shards/000.tar", None, conn)
        assert response.status == 200 and body == b"" and int(response.headers["Content-Length"]) == size
        response, body, _ = raw(server.url, "GET", "/nothing/here", None, conn)
        assert response.status == 404
        response, body, _ = raw(server.url, "GET", "/empty.bin", None, conn)
        assert response.status == 200 and body == b""
        assert server.requests == 9  # all on one kept-alive connection (http.client reconnects silently otherwise)
        conn.close()


# ------------------------------------------------------------------------------------------------- FaultProxy


def test_proxy_slowdown_every_third_request_is_retried_by_obstore(s3):
    obstore.put(s3_store(s3), "faults/data.bin", DATA)
    with FaultProxy(s3, fail_every=3) as proxy:
        store = s3_store(s3, endpoint=proxy.endpoint)  # default retry config
        for start in range(0, 12 * 100_000, 100_000):
            assert obstore.get_range(store, "faults/data.bin", start=start, length=50_000) == DATA[start:start + 50_000]
        assert obstore.get(store, "faults/data.bin").bytes() == DATA
        stats = proxy.stats()
        assert stats["faults_by_kind"] == {"slowdown": stats["faults_injected"], "drop": 0}
        assert stats["faults_injected"] >= 4 and stats["requests"] >= 19
        # The 503 is S3's: XML with Code SlowDown, and the connection stays usable.
        proxy.faults = [Fault("slowdown", every=1, methods=None)]
        response, body, conn = raw(proxy.url, "GET", f"/{s3.private_bucket}/faults/data.bin")
        assert response.status == 503 and b"<Code>SlowDown</Code>" in body
        response, body, _ = raw(proxy.url, "HEAD", f"/{s3.private_bucket}/faults/data.bin", None, conn)
        assert response.status == 503 and body == b""
        conn.close()


def test_proxy_dropped_connection_is_retried(s3):
    obstore.put(s3_store(s3), "faults/drop.bin", DATA)
    with FaultProxy(s3.endpoint, drop_every=2) as proxy:
        store = s3_store(s3, endpoint=proxy.endpoint, retry_config=FAST_RETRY)
        for _ in range(3):
            assert obstore.get(store, "faults/drop.bin").bytes() == DATA
        assert obstore.get_range(store, "faults/drop.bin", start=7, length=300_000) == DATA[7:300_007]
        assert proxy.faults_by_kind["drop"] == proxy.faults_injected >= 2


def test_proxy_uploads_and_counts_bytes(s3):
    with FaultProxy(s3) as proxy:
        store = s3_store(s3, endpoint=proxy.endpoint)
        obstore.put(store, "via-proxy/single.bin", DATA[:1_000_000], use_multipart=False)
        big = DATA * 4  # 12 MiB: three parts of S3's minimum 5 MiB
        obstore.put(store, "via-proxy/multi.bin", big, use_multipart=True, chunk_size=5 * 1024 * 1024)
        direct = s3_store(s3)
        assert obstore.get(direct, "via-proxy/single.bin").bytes() == DATA[:1_000_000]
        assert obstore.get(direct, "via-proxy/multi.bin").bytes() == big
        assert proxy.bytes_up >= len(big) + 1_000_000
        assert proxy.requests == 6  # one PUT; create, 3 parts, complete


def test_proxy_latency_applies_to_every_request(published):
    with RangeHTTPServer(published) as server, FaultProxy(server, latency_s=0.02) as proxy:
        store = HTTPStore(proxy.url, client_options={"allow_http": True})
        obstore.get_range(store, "shards/000.tar", start=0, length=10)  # connection set up
        for _ in range(3):
            started = time.perf_counter()
            assert obstore.get_range(store, "shards/000.tar", start=50, length=10) == DATA[50:60]
            assert time.perf_counter() - started >= 0.02
        proxy.latency_s = 0
        assert obstore.get_range(store, "shards/000.tar", start=0, length=4) == DATA[:4]
        assert server.requests == proxy.requests == 5
        assert proxy.connections < proxy.requests  # kept alive (obstore's pool may open a second one now and then)


def test_proxy_rate_rule_is_deterministic(published):
    counts = []
    for _ in range(2):
        with RangeHTTPServer(published) as server, FaultProxy(server) as proxy:
            proxy.faults = [Fault("slowdown", rate=0.3, seed=5)]
            store = HTTPStore(proxy.url, client_options={"allow_http": True}, retry_config=FAST_RETRY)
            for i in range(20):
                assert obstore.get_range(store, "shards/000.tar", start=i, length=3) == DATA[i:i + 3]
            counts.append(proxy.stats())
            del counts[-1]["connections"]  # obstore may open a second one
    assert counts[0] == counts[1] and counts[0]["faults_by_kind"]["slowdown"] > 0


def test_proxy_many_requests_in_flight_with_both_faults(published):
    """64 concurrent range reads on many kept-alive connections, some answered 503 and some cut short: all correct."""
    rng = random.Random(3)
    spans = [(start, rng.randrange(1, 200_000)) for start in (rng.randrange(len(DATA) - 200_000) for _ in range(300))]
    faults = [Fault("slowdown", every=7), Fault("drop", every=11)]
    with RangeHTTPServer(published) as server, FaultProxy(server, latency_s=0.002, faults=faults) as proxy:
        store = HTTPStore(proxy.url, client_options={"allow_http": True}, retry_config=FAST_RETRY)

        async def read_all():
            limit = asyncio.Semaphore(64)

            async def one(start, length):
                async with limit:
                    return await obstore.get_range_async(store, "shards/000.tar", start=start, length=length)

            return await asyncio.gather(*(one(*span) for span in spans))

        results = asyncio.run(read_all())
        assert all(bytes(got) == DATA[start:start + length] for got, (start, length) in zip(results, spans))
        assert proxy.faults_by_kind["slowdown"] >= 40 and proxy.faults_by_kind["drop"] >= 20
        assert proxy.connections > 8


class _EchoHandler(BaseHTTPRequestHandler):
    """POST: answers the (chunked) request body chunked; GET /eof: an HTTP/1.0-style body ended by closing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = b""
        while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (body[:3], body[3:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self):  # after http.server has answered Expect: 100-continue
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"until-close" * 1000)
        self.close_connection = True


def test_proxy_streams_chunked_and_close_delimited_bodies():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            host, port = "127.0.0.1", proxy.port
            conn = http.client.HTTPConnection(host, port, timeout=10)
            for _ in range(2):  # twice on one connection
                conn.request("POST", "/echo", body=iter([b"hello ", b"chunked ", b"world"]), encode_chunked=True)
                response = conn.getresponse()
                assert response.read() == b"hello chunked world"
            conn.close()
            response, body, conn = raw(proxy.url, "GET", "/eof")
            assert body == b"until-close" * 1000
            conn.close()
            with socket.create_connection((host, port), timeout=10) as sock:  # the body only after 100 Continue
                sock.sendall(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
                answer = b""
                while not answer.endswith(b"\r\n\r\n"):
                    answer += sock.recv(1)
                assert answer.startswith(b"HTTP/1.1 100")
                sock.sendall(b"hello")
                reply = sock.makefile("rb")
                assert reply.readline().startswith(b"HTTP/1.1 201")
                while reply.readline() != b"\r\n":
                    pass
                assert reply.read(5) == b"hello"
            assert proxy.requests == 4 and proxy.connections == 3
    finally:
        upstream.shutdown()
        upstream.server_close()
