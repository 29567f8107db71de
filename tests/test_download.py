"""`ingest download` against a loopback SAGE stand-in (tests/sage_server.py): the real sage_data_client does the
query, requests fetches the files, faults are injected per file, and build-shards ingests the result."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from ingest.build import build_shards
from ingest.cli import main as ingest_main
from ingest.config import IngestConfig
from ingest.download import (
    DownloadConfig,
    DownloadError,
    UploadFile,
    dest_path,
    download,
    metadata_stem,
    redact_url,
    select_files,
    upload_filename,
    wants_file,
)
from ingest.metadata import QUERY_RECORD_SUFFIX, read_metadata_frame, upload_records
from ingest.synth import FrameSpec, SynthConfig, frame_filenames, plan_frames, write_frame_files

sys.path.insert(0, str(Path(__file__).parent))
from sage_server import Measurement, SageServer, Upload  # noqa: E402 - found through the line above

pytestmark = pytest.mark.timeout(60)

USER, TOKEN = "sage-user-7f3a", "tok-SECRET-91c2e"
SECRETS = (USER, TOKEN, base64.b64encode(f"{USER}:{TOKEN}".encode()).decode())
SCALE = 0.1
START, END = "2023-06-01", "2023-06-08"
PRIVATE_VSN = "W057"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, no ~/.netrc and no proxy from the machine running the tests."""
    for name in ("SAGE_USERNAME", "SAGE_ACCESS_TOKEN", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[FrameSpec, dict[str, bytes]]]:
    """Two frames for each of W056 and W057 in the exact raw format: (spec, {kind: bytes as written})."""
    source = tmp_path_factory.mktemp("source")
    specs = plan_frames(SynthConfig(nodes=2, frames=2, scale=SCALE, start=START, end=END, workers=1))
    out = []
    for spec in specs:
        paths = write_frame_files(source, spec)
        out.append((spec, {kind: (source / rel).read_bytes() for kind, rel in paths.items()}))
    return out


@dataclass
class Served:
    server: SageServer
    files: dict[tuple[str, int, str], Upload]  # (vsn, frame index within the node, kind) -> upload
    in_query: list[Upload]  # every upload the query for W056+W057 in [START, END) and *mobotix* returns

    def file(self, vsn: str, index: int, kind: str) -> Upload:
        return self.files[(vsn, index, kind)]

    @property
    def wanted(self) -> list[Upload]:
        return [u for (_, _, kind), u in self.files.items() if kind in ("rgb", "thermal")]


@pytest.fixture
def served(frames: list[tuple[FrameSpec, dict[str, bytes]]]) -> Iterator[Served]:
    server = SageServer((USER, TOKEN), stall_s=4.0)
    files: dict[tuple[str, int, str], Upload] = {}
    index: dict[str, int] = {}
    for spec, contents in frames:
        i = index[spec.vsn] = index.get(spec.vsn, -1) + 1
        names = frame_filenames(spec)
        for kind, data in contents.items():
            files[(spec.vsn, i, kind)] = server.add(
                Upload(spec.vsn, spec.node_id, spec.ts_ns, names[kind], data, private=spec.vsn == PRIVATE_VSN,
                       meta={"position": str(spec.position), "loop_num": str(spec.loop_num)})
            )
    first = frames[0][0]
    # Later scan versions also upload a NetCDF and a plot; --all-files takes the first, nothing takes the second.
    files[(first.vsn, 0, "netcdf")] = server.add(
        Upload(first.vsn, first.node_id, first.ts_ns, f"right_336x252_14bit.thermal.celsius_position{first.position}.nc", b"CDF\x01decoy")
    )
    files[(first.vsn, 0, "plot")] = server.add(
        Upload(first.vsn, first.node_id, first.ts_ns, "right_336x252_14bit.thermal.celsius_plot.jpg", b"\xff\xd8plot\xff\xd9")
    )
    in_query = list(files.values())
    # What the query must leave out: another plugin's image, an upload after END, another node, a non-upload.
    server.add(Upload(first.vsn, first.node_id, first.ts_ns + 1, "1920x1080.jpg", b"other plugin",
                      plugin="registry.sagecontinuum.org/theone/imagesampler:0.3.0"))
    late = pd.Timestamp(END, tz="UTC").value + 5
    server.add(Upload(first.vsn, first.node_id, late, "6144x2048_position1.jpg", b"too late"))
    server.add(Upload("V017", "00004cd98fb54735", first.ts_ns, "6144x2048_position0.jpg", b"not asked for"))
    server.measurements.append(Measurement(first.vsn, first.node_id, first.ts_ns, "exit.status", "Loop_Complete"))
    with server:
        yield Served(server, files, in_query)


def _config(raw: Path, server: SageServer, **overrides) -> DownloadConfig:
    settings = dict(
        raw_dir=raw, vsns=("W056", PRIVATE_VSN), start=START, end=END, endpoint=server.endpoint,
        timeout_s=1.0, retries=4, backoff_s=0.01, workers=4,
    )
    return DownloadConfig(**{**settings, **overrides})


def _cli(raw: Path, server: SageServer, *extra: str) -> int:
    return ingest_main([
        "download", str(raw), "--vsn", "W056", "--vsn", PRIVATE_VSN, "--start", START, "--end", END,
        "--endpoint", server.endpoint, "--timeout", "1", "--retries", "3", "--quiet", *extra,
    ])


def _local(raw: Path, upload: Upload) -> Path:
    return raw / upload.vsn / f"{upload.ts_ns}-{upload.filename}"


def _assert_exact(raw: Path, uploads: list[Upload]) -> None:
    for upload in uploads:
        assert _local(raw, upload).read_bytes() == upload.data, upload.filename


def _assert_no_leftovers(raw: Path) -> None:
    leftovers = [p for p in raw.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert leftovers == []


def _assert_no_secrets(raw: Path, *texts: str) -> None:
    for secret in SECRETS:
        for text in texts:
            assert secret not in text
        for path in raw.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


# -------------------------------------------------------------------------------------------- pure helpers


def test_file_names_come_from_meta_or_the_url_after_its_first_dash() -> None:
    url = "https://storage.sagecontinuum.org/api/v1/data/sage/sage-mobotix-scan-0.23.4.24/00004cd98fb54735/"
    assert upload_filename(url + "1685708796600423152-x.jpg", "6144x2048_position5.jpg") == "6144x2048_position5.jpg"
    assert upload_filename(url + "1685708796600423152-6144x2048_position5.jpg", None) == "6144x2048_position5.jpg"
    custom = "6144x2048_2024-08-20T101500_Pt1-S-S5xD100ms_Img0.jpg"  # custom-scan names contain '-'
    assert upload_filename(url + f"1724148900000000000-{custom}", "") == custom
    assert upload_filename(url + "nodash", None) is None


@pytest.mark.parametrize(
    ("name", "default", "all_files"),
    [
        ("6144x2048_position5.jpg", True, True),
        ("6144x2048.jpg", True, True),
        ("right_336x252_14bit.thermal.celsius_position5.csv", True, True),
        ("right_336x252_14bit.thermal.uint_position5.csv", False, True),
        ("right_336x252_14bit.thermal_position5.raw", False, True),
        ("right_336x252_14bit.thermal.celsius_positionSES.nc", False, True),
        ("right_336x252_14bit.thermal.celsius_plot.jpg", False, False),
        ("right_336x252_14bit.thermal.celsius_plot_positionSES.jpg", False, False),
        ("notes.txt", False, False),
    ],
)
def test_wants_optical_and_celsius_by_default_and_never_plots(name: str, default: bool, all_files: bool) -> None:
    assert wants_file(name, all_files=False) is default
    assert wants_file(name, all_files=True) is all_files


def test_records_become_layout_paths_and_unplaceable_ones_are_reported() -> None:
    base = "https://storage.sagecontinuum.org/api/v1/data/sage/sage-mobotix-scan-0.23.4.24/000048b02d15c31f/"
    celsius = "right_336x252_14bit.thermal.celsius_position5.csv"
    frame = pd.DataFrame({
        "timestamp": pd.to_datetime(["2023-06-02T12:26:36.600423152Z"] * 5, utc=True),
        "name": ["upload"] * 5,
        "value": [base + "1685708796600423152-6144x2048_position5.jpg", base + "1685708796600423152-x.csv",
                  "ftp://example.org/1-6144x2048.jpg", base + "1685708796600423152-" + celsius, base + "1-notes.txt"],
        "meta.filename": ["6144x2048_position5.jpg", "a/" + celsius, None, celsius, None],
        "meta.vsn": ["W056", "W056", "W056", None, "W056"],
    })
    files, problems = select_files(frame, all_files=False)
    assert [dest_path(f) for f in files] == ["W056/1685708796600423152-6144x2048_position5.jpg"]
    assert [reason for _, reason in problems] == [
        f"file name 'a/{celsius}' is not a plain name",
        "value is not an http(s) URL: 'ftp://example.org/1-6144x2048.jpg'",
        "record has no meta.vsn",
    ]
    assert dest_path(UploadFile("u", "W056", 1, "a.jpg")) == "W056/1-a.jpg"
    assert redact_url("https://me:pw@storage.sagecontinuum.org:443/a/b") == "https://storage.sagecontinuum.org:443/a/b"


def test_metadata_name_is_deterministic(tmp_path: Path) -> None:
    a = DownloadConfig(raw_dir=tmp_path, vsns=("W057", "W056"), start="2023-06-01", end="2023-07-01")
    b = DownloadConfig(raw_dir=tmp_path, vsns=("W056", "W057"), start="2023-06-01T00:00:00Z", end="2023-07-01T02:00+02:00")
    assert metadata_stem(a) == metadata_stem(b) == "uploads_W056-W057_20230601T000000Z_20230701T000000Z_mobotix"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vsns": ()}, "vsns"),
        ({"vsns": "W056"}, "vsns"),
        ({"vsns": ("W0/56",)}, "VSNs"),
        ({"start": "yesterday-ish"}, "start"),
        ({"end": "2023-05-01"}, "after start"),
        ({"workers": 0}, "workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": 0}, "retries"),
        ({"backoff_s": -1}, "backoff_s"),
        ({"endpoint": "data.sagecontinuum.org/api/v1/query"}, "endpoint"),
        ({"plugin": " "}, "plugin"),
    ],
)
def test_config_is_validated(tmp_path: Path, change: dict, message: str) -> None:
    settings = {"raw_dir": tmp_path, "vsns": ("W056",), "start": "2023-06-01", "end": "2023-07-01", **change}
    with pytest.raises(ValueError, match=message):
        DownloadConfig(**settings)


# -------------------------------------------------------------------------------------------- against the server


def test_download_is_exact_through_faults_and_build_shards_ingests_it(
    tmp_path: Path, served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGE_USERNAME", USER)
    monkeypatch.setenv("SAGE_ACCESS_TOKEN", TOKEN)
    server = served.server
    failing_500 = served.file("W056", 0, "rgb")
    dropped = served.file("W056", 0, "thermal")
    stalled_body = served.file("W056", 1, "thermal")
    stalled = served.file(PRIVATE_VSN, 0, "thermal")
    server.fail(failing_500, "500")
    server.fail(dropped, "drop")
    server.fail(stalled_body, "stall_body")
    server.fail(stalled, "stall")
    raw = tmp_path / "raw"

    summary = download(_config(raw, server), progress=True)

    assert summary.failed == []
    assert summary.records == len(served.in_query)
    assert summary.selected == summary.downloaded == len(served.wanted) == 8
    assert summary.resumed == 2  # the dropped and the stalled body, continued where they stopped
    _assert_exact(raw, served.wanted)
    _assert_no_leftovers(raw)
    assert not _local(raw, served.file("W056", 0, "uint")).exists()
    assert not _local(raw, served.file("W056", 0, "plot")).exists()
    assert [(g.status, g.range) for g in server.gets(failing_500)] == [(500, None), (200, None)]
    assert [(g.status, g.range) for g in server.gets(dropped)] == [(200, None), (206, f"bytes={len(dropped.data) // 2}-")]
    assert [(g.status, g.range) for g in server.gets(stalled_body)] == [
        (200, None), (206, f"bytes={len(stalled_body.data) // 2}-")
    ]
    assert [g.status for g in server.gets(stalled)] == [None, 200]
    assert summary.bytes >= sum(len(u.data) for u in served.wanted)

    # The stored query result is what build-shards joins: same records, nanosecond timestamps.
    (parquet,) = (raw / "metadata").glob("*.parquet")
    frame = read_metadata_frame(parquet)
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    records = upload_records(frame, "metadata/" + parquet.name)
    assert {(r.vsn, r.ts_ns, r.filename) for r in records} == {(u.vsn, u.ts_ns, u.filename) for u in served.in_query}
    query = json.loads(parquet.with_name(parquet.name.removesuffix(".parquet") + QUERY_RECORD_SUFFIX).read_text())
    assert query["endpoint"] == server.endpoint and query["records"] == len(served.in_query)
    assert [q["filter"]["vsn"] for q in query["queries"]] == ["W056", PRIVATE_VSN]

    # A second run fetches nothing: every file is complete (HEAD says so).
    seen_before = len(server.seen)
    again = download(_config(raw, server), progress=False)
    assert (again.downloaded, again.skipped_complete, again.resumed, again.bytes, again.failed) == (0, 8, 0, 0, [])
    assert {s.method for s in server.seen[seen_before:]} == {"POST", "HEAD"}
    _assert_exact(raw, served.wanted)

    output = capsys.readouterr()
    _assert_no_secrets(raw, output.out, output.err, summary.describe(), again.describe())

    built = build_shards(raw, tmp_path / "dataset", IngestConfig(workers=1), progress=False, log=lambda _: None)
    assert built.samples_added == len(served.wanted) // 2 == 4
    assert built.status_counts.get("sample") == 8 and built.status_counts.get("rejected", 0) == 0


def test_cli_lists_private_files_without_credentials_and_exits_1(
    tmp_path: Path, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    assert _cli(raw, served.server) == 1
    out = capsys.readouterr().out
    public = [u for u in served.wanted if u.vsn != PRIVATE_VSN]
    private = [u for u in served.wanted if u.vsn == PRIVATE_VSN]
    _assert_exact(raw, public)
    for upload in private:
        assert not _local(raw, upload).exists()
        line = next(line for line in out.splitlines() if served.server.url_of(upload) in line)
        assert "HTTP 401 (no credentials were found)" in line and "SAGE_USERNAME" in line and "~/.netrc" in line
    assert f"failed {len(private)}" in out
    # A 401 is not retried: one GET per private file.
    assert all(len(served.server.gets(u)) == 1 for u in private)


def test_wrong_credentials_are_refused_and_never_shown(
    tmp_path: Path, served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGE_USERNAME", USER)
    monkeypatch.setenv("SAGE_ACCESS_TOKEN", TOKEN + "-wrong")
    raw = tmp_path / "raw"
    assert _cli(raw, served.server) == 1
    output = capsys.readouterr()
    assert output.out.count("HTTP 401 (the credentials were refused)") == 4
    assert TOKEN not in output.out + output.err and USER not in output.out + output.err
    _assert_no_secrets(raw, output.out, output.err)


def test_netrc_supplies_credentials(tmp_path: Path, served: Served, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {TOKEN}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    raw = tmp_path / "raw"
    assert _cli(raw, served.server) == 0
    _assert_exact(raw, served.wanted)
    output = capsys.readouterr()
    _assert_no_secrets(raw, output.out, output.err)


def test_a_partial_file_from_an_earlier_run_is_continued_with_range(tmp_path: Path, served: Served) -> None:
    raw = tmp_path / "raw"
    target = served.file("W056", 1, "rgb")
    part = _local(raw, target).with_name(_local(raw, target).name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(target.data[:1000])
    summary = download(_config(raw, served.server, vsns=("W056",)), progress=False)
    assert summary.failed == [] and summary.resumed == 1
    assert [(g.status, g.range) for g in served.server.gets(target)] == [(206, "bytes=1000-")]
    _assert_exact(raw, [u for u in served.wanted if u.vsn == "W056"])
    _assert_no_leftovers(raw)


def test_a_server_that_ignores_range_restarts_the_file_cleanly(tmp_path: Path, served: Served) -> None:
    raw = tmp_path / "raw"
    target = served.file("W056", 0, "thermal")
    part = _local(raw, target).with_name(_local(raw, target).name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 700)  # not the file's bytes: only a clean restart gives the right file
    served.server.fail(target, "ignore_range")
    summary = download(_config(raw, served.server, vsns=("W056",)), progress=False)
    assert summary.failed == [] and summary.resumed == 0
    assert [(g.status, g.range) for g in served.server.gets(target)] == [(200, "bytes=700-")]
    _assert_exact(raw, [target])
    _assert_no_leftovers(raw)


def test_a_damaged_complete_file_is_fetched_again(tmp_path: Path, served: Served) -> None:
    raw = tmp_path / "raw"
    target = served.file("W056", 0, "rgb")
    _local(raw, target).parent.mkdir(parents=True)
    _local(raw, target).write_bytes(target.data[:-10])
    summary = download(_config(raw, served.server, vsns=("W056",)), progress=False)
    assert summary.downloaded == 4 and summary.skipped_complete == 0
    _assert_exact(raw, [target])


def test_a_file_that_keeps_failing_is_listed_and_the_rest_complete(tmp_path: Path, served: Served) -> None:
    raw = tmp_path / "raw"
    target = served.file("W056", 1, "rgb")
    served.server.fail(target, *["500"] * 3)
    summary = download(_config(raw, served.server, vsns=("W056",), retries=3), progress=False)
    assert summary.failed == [(served.server.url_of(target), "HTTP 500 Internal Server Error (gave up after 3 attempts)")]
    assert len(served.server.gets(target)) == 3
    assert summary.downloaded == 3 and not _local(raw, target).exists()
    _assert_exact(raw, [u for u in served.wanted if u.vsn == "W056" and u is not target])
    assert served.server.url_of(target) in summary.describe()


def test_all_files_adds_uint_raw_and_netcdf_but_never_plots(tmp_path: Path, served: Served) -> None:
    raw = tmp_path / "raw"
    summary = download(_config(raw, served.server, vsns=("W056",), all_files=True), progress=False)
    w056 = [u for (vsn, _, kind), u in served.files.items() if vsn == "W056" and kind != "plot"]
    assert summary.failed == [] and summary.downloaded == len(w056) == 9
    _assert_exact(raw, w056)
    assert not _local(raw, served.file("W056", 0, "plot")).exists()


def test_a_failing_or_stalled_query_is_retried(tmp_path: Path, served: Served) -> None:
    served.server.fail_query("500", "stall")  # sage_data_client has no timeout of its own: this must not hang
    summary = download(_config(tmp_path / "raw", served.server, vsns=("W056",)), progress=False)
    assert summary.downloaded == 4
    assert sum(1 for s in served.server.seen if s.method == "POST") == 3


def test_a_failed_query_names_the_endpoint(tmp_path: Path, served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = served.server.url + "/api/v1/no-such-api"
    with pytest.raises(DownloadError, match=f"query to {endpoint} for VSN W056 failed.*HTTP 404"):
        download(_config(tmp_path / "raw", served.server, endpoint=endpoint), progress=False)
    assert ingest_main(["download", str(tmp_path / "raw"), "--vsn", "W056", "--start", START, "--end", END,
                        "--endpoint", endpoint, "--quiet"]) == 2
    assert endpoint in capsys.readouterr().err


def test_half_set_credentials_stop_before_anything_is_fetched(
    tmp_path: Path, served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGE_USERNAME", USER)
    assert _cli(tmp_path / "raw", served.server) == 2
    err = capsys.readouterr().err
    assert "SAGE_ACCESS_TOKEN is not set" in err and USER not in err
    assert served.server.seen == [] and not (tmp_path / "raw").exists()
