"""From a list of raw files to frames to decode, and a decision for every other file (pure; no pixels read).

A frame is all files of one (VSN, ts_ns). It is a candidate sample when it has exactly one optical JPEG and
one celsius CSV whose positions (both names and the upload metadata) agree. Everything else gets its final
decision here: ``unpaired``, ``duplicate`` and ``position_mismatch`` rejects, and ``ignored`` siblings.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ingest.metadata import METADATA_SUFFIXES, QUERY_RECORD_SUFFIX, UploadRecord
from ingest.naming import ROLE_OTHER, ROLE_RGB, ROLE_THERMAL, classify_name, parse_raw_path, position_from_label
from shards.layout import sample_key

__all__ = ["RawFile", "FileDecision", "FrameTask", "plan_frames", "metadata_file_kind"]


@dataclass(frozen=True, slots=True)  # slots: millions of these in a year of uploads, without a __dict__ each
class RawFile:
    path: str  # relative to RAW, '/'-separated
    bytes: int


@dataclass(frozen=True, slots=True)
class FileDecision:
    """One row of the catalog's ``files`` table (without the run id)."""

    path: str
    bytes: int
    vsn: str | None
    ts_ns: int | None
    role: str
    status: str  # sample, rejected, ignored
    reason: str | None = None
    detail: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class FrameTask:
    """A frame to decode: one optical JPEG and one celsius CSV that agree on where the camera pointed."""

    key: str
    vsn: str
    ts_ns: int
    rgb_path: str
    rgb_bytes: int
    thermal_path: str
    thermal_bytes: int
    position: int | None
    position_label: str | None
    node_id: str | None

    def provenance(self) -> dict:
        """Where the sample comes from: shared by its catalog row and its ``.json`` member."""
        return {
            "key": self.key, "vsn": self.vsn, "node_id": self.node_id, "ts_ns": self.ts_ns,
            "position": self.position, "position_label": self.position_label,
            "rgb_file": self.rgb_path, "thermal_file": self.thermal_path,
        }


def metadata_file_kind(path: str) -> str | None:
    """'metadata' or 'query_record' for files under RAW/metadata/, None for anything else."""
    if not path.startswith("metadata/"):
        return None
    lower = path.lower()
    if lower.endswith(QUERY_RECORD_SUFFIX):
        return "query_record"
    if lower.endswith(METADATA_SUFFIXES):
        return "metadata"
    return "unrecognised"


def _positions(task_files: list[tuple[RawFile, str, str | None, str]], uploads: dict[tuple[str, int, str], UploadRecord],
               vsn: str, ts_ns: int):
    """Every statement of the frame's position (VSN ``vsn``, ``ts_ns``): (source, label) pairs from names and metadata."""
    statements = []
    for _, filename, label, _ in task_files:
        if label is not None:
            statements.append((f"name {filename}", label))
        record = uploads.get((vsn, ts_ns, filename))
        if record is not None and record.position_label is not None:
            statements.append((f"metadata of {filename}", record.position_label))
    return statements


def plan_frames(
    files: list[RawFile],
    uploads: dict[tuple[str, int, str], UploadRecord],
    ingested_keys: set[str],
    metadata_status: dict[str, tuple[str, str | None, str | None]] | None = None,
) -> tuple[list[FrameTask], list[FileDecision]]:
    """Frames to decode (in (VSN, ts_ns) order) and the decision for every file that is not in one.

    ``metadata_status`` maps metadata file paths to (status, reason, detail) from loading them.
    """
    decisions: list[FileDecision] = []
    frames: dict[tuple[str, int], list[tuple[RawFile, str]]] = defaultdict(list)
    for raw in files:
        kind = metadata_file_kind(raw.path)
        if kind is not None:
            status, reason, detail = (metadata_status or {}).get(raw.path, ("ignored", kind, None))
            decisions.append(FileDecision(raw.path, raw.bytes, None, None, "metadata", status, reason, detail))
            continue
        parsed = parse_raw_path(raw.path)
        if parsed is None:
            decisions.append(
                FileDecision(
                    raw.path, raw.bytes, None, None, ROLE_OTHER, "ignored", "outside_layout",
                    "not RAW/<VSN>/<ts_ns>-<filename> or RAW/metadata/",
                )
            )
            continue
        frames[(parsed.vsn, parsed.ts_ns)].append((raw, parsed.filename))

    tasks: list[FrameTask] = []
    for (vsn, ts_ns) in sorted(frames):
        key = sample_key(vsn, ts_ns)
        members = frames[(vsn, ts_ns)]
        rgb, thermal = [], []
        for raw, filename in sorted(members, key=lambda m: m[0].path):
            name = classify_name(filename)
            if name.role == ROLE_RGB:
                rgb.append((raw, filename, name.position_label, ROLE_RGB))
            elif name.role == ROLE_THERMAL:
                thermal.append((raw, filename, name.position_label, ROLE_THERMAL))
            else:
                decisions.append(FileDecision(raw.path, raw.bytes, vsn, ts_ns, ROLE_OTHER, "ignored", name.kind, None, key))

        def reject(reason: str, detail: str, members=rgb + thermal, vsn=vsn, ts_ns=ts_ns, key=key) -> None:
            for raw, _, _, role in members:
                decisions.append(FileDecision(raw.path, raw.bytes, vsn, ts_ns, role, "rejected", reason, detail, key))

        if not rgb and not thermal:
            continue
        if key in ingested_keys:
            reject("duplicate", f"frame {key} is already a sample; this file arrived later")
            continue
        if len(rgb) > 1 or len(thermal) > 1:
            names = ", ".join(filename for _, filename, _, _ in rgb + thermal)
            reject("duplicate", f"frame has {len(rgb)} optical JPEG(s) and {len(thermal)} celsius CSV(s): {names}")
            continue
        if not rgb or not thermal:
            missing = "celsius CSV" if rgb else "optical JPEG"
            reject("unpaired", f"no {missing} with the same VSN and timestamp")
            continue
        statements = _positions(rgb + thermal, uploads, vsn, ts_ns)
        values = {}
        for source, label in statements:
            try:
                values[source] = position_from_label(label)
            except ValueError as exc:
                values[source] = f"invalid ({exc})"
        if len(set(values.values())) > 1 or any(isinstance(v, str) for v in values.values()):
            said = "; ".join(f"{source} says {label}" for source, label in statements)
            reject("position_mismatch", said)
            continue
        (rgb_raw, rgb_name, rgb_label, _), (th_raw, th_name, th_label, _) = rgb[0], thermal[0]
        record = uploads.get((vsn, ts_ns, rgb_name)) or uploads.get((vsn, ts_ns, th_name))
        label = rgb_label or th_label or (statements[0][1] if statements else None)
        tasks.append(
            FrameTask(
                key=key,
                vsn=vsn,
                ts_ns=ts_ns,
                rgb_path=rgb_raw.path,
                rgb_bytes=rgb_raw.bytes,
                thermal_path=th_raw.path,
                thermal_bytes=th_raw.bytes,
                position=next(iter(values.values())) if values else None,
                position_label=label,
                node_id=record.node_id if record else None,
            )
        )
    return tasks, decisions
