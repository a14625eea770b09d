"""Read an offline W&B run (``offline-run-*/run-<id>.wandb``) back into Python.

wandb 0.31 removed its Python reader for the transaction log, and there is no
W&B server to sync to on an offline machine, so this is written by hand against
the documented format: a 7-byte header (``b":W&B"``, magic ``0xBEE1``, version),
then LevelDB-log style records in 32 KiB blocks, each record with a 7-byte
header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Each payload
is a ``wandb.proto.wandb_internal_pb2.Record``.

Used by the tests (to prove what a run logged, read and linked) and by anyone who
wants to inspect runs that were never synced. ``OfflineRun.artifacts`` are the artifacts a
run logged, ``OfflineRun.used`` those it read (``use_after_commit`` records, see
:meth:`cvpipe.core.tracking.Tracker.use_artifact`); registry links made offline are in
``summary["registry/links"]``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")
FILE_HEADER = struct.Struct("<4sHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    id: Optional[str] = None
    project: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # logged by the run (its outputs)
    used: list[dict[str, Any]] = field(default_factory=list)  # read by the run (W&B lineage inputs)
    exit_code: Optional[int] = None


def _items(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        key = it.key or "/".join(it.nested_key)
        try:
            out[key] = json.loads(it.value_json)
        except (ValueError, TypeError):
            out[key] = it.value_json
    return out


def _artifact(a) -> dict[str, Any]:
    """An ArtifactRecord: name, type, aliases, W&B digest, metadata and manifest (path -> base64 MD5 digest, size)."""
    try:
        metadata = json.loads(a.metadata) if a.metadata else {}
    except ValueError:
        metadata = {"_raw": a.metadata}
    return {
        "name": a.name, "type": a.type, "aliases": list(a.aliases), "digest": a.digest, "metadata": metadata,
        "files": {e.path: {"digest": e.digest, "size": e.size} for e in a.manifest.contents},
    }


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield the raw payload of every complete record in a ``.wandb`` file."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        return
    magic, ident, _version = FILE_HEADER.unpack_from(data, 0)
    if magic != b":W&B" or ident != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos = FILE_HEADER.size
    pending: list[bytes] = []
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER.size:  # block tail padding
            pos += left_in_block
            continue
        crc, length, rtype = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        chunk = data[start : start + length]
        pos = start + length
        if rtype == 0 and length == 0:  # zero padding at end of a block
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            break  # torn tail of a run still being written, or corruption: stop at the last good record
        if rtype == FULL:
            yield chunk
        elif rtype == FIRST:
            pending = [chunk]
        elif rtype == MIDDLE:
            pending.append(chunk)
        elif rtype == LAST:
            pending.append(chunk)
            yield b"".join(pending)
            pending = []


def read_run(run_dir_or_file: str | Path) -> OfflineRun:
    """Parse one offline run folder (or its ``.wandb`` file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(run_dir_or_file)
    files = [p] if p.is_file() else sorted(p.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {p}")
    run = OfflineRun(path=files[0])
    for payload in iter_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.project, run.name = r.run_id, r.project, r.display_name
            run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
            run.config.update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in _items(r.config.update).items()})
        elif kind == "config":
            run.config.update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in _items(rec.config.update).items()})
            for it in rec.config.remove:
                run.config.pop(it.key or "/".join(it.nested_key), None)
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "artifact":
            art = _artifact(rec.artifact)
            # use_artifact offline is recorded as the artifact with use_after_commit (cvpipe.core.tracking)
            (run.used if rec.artifact.use_after_commit else run.artifacts).append(art)
        elif kind == "use_artifact":
            u = rec.use_artifact
            run.used.append({"name": u.name, "type": u.type, "id": u.id})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def find_runs(wandb_dir: str | Path) -> list[Path]:
    """Offline run folders under a W&B dir (``<dir>/wandb/offline-run-*`` or ``<dir>/offline-run-*``)."""
    root = Path(wandb_dir)
    runs = sorted(root.glob("offline-run-*")) + sorted(root.glob("wandb/offline-run-*"))
    return [r for r in runs if r.is_dir()]
