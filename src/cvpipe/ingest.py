"""Ingest stage: collect raw images, validate every one, quarantine the bad with reasons.

Reads ``ingest.*`` and ``paths.raw`` / ``paths.metrics``. Writes::

    <paths.raw>/images/<sha[:2]>/<sha256>.<ext>   content-addressed images
    <paths.raw>/manifest.csv                      one row per accepted image
    <paths.raw>/quarantine.csv                    one row per rejected file, with a reason code
    <paths.metrics>/ingest.json                   counts per class, rejections by reason

Images are stored under the SHA-256 of their source bytes; a clean RGB JPEG/PNG
keeps its original bytes, anything else is normalized (RGB, upright). Every file
is written atomically, so an interrupted run never leaves a partial image under
its final name, and a rerun reuses images already stored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from cvpipe import storage
from cvpipe.config import IngestParams, Params
from cvpipe.console import console, info, is_quiet, progress
from cvpipe.errors import StageError
from cvpipe.images import ImageRejected, decode_image
from cvpipe.sources import SourceItem, check_source, iter_source

MANIFEST_COLUMNS = [
    "id",
    "path",
    "label",
    "source_uri",
    "width",
    "height",
    "format",
    "source_mode",
    "sha256",
    "bytes",
    "split_hint",
]
QUARANTINE_COLUMNS = ["source_uri", "label", "reason", "detail", "sha256"]

JUNK = "junk_file"
NO_LABEL = "no_label"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
CONFLICTING_LABELS = "conflicting_labels"


@dataclass
class Outcome:
    item: SourceItem
    record: Optional[dict[str, Any]] = None  # manifest row when accepted
    reason: Optional[str] = None
    detail: str = ""
    sha256: str = ""


@dataclass
class IngestReport:
    accepted: int = 0
    quarantined: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    per_split_hint: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _process(item: SourceItem, raw_dir: str, p: dict[str, Any]) -> Outcome:
    """Read, hash, decode-check and store one file. Runs in a worker process."""
    if item.junk:
        return Outcome(item, reason=JUNK, detail="OS/editor metadata file")
    try:
        with open(item.local_path, "rb") as fh:  # type: ignore[arg-type]
            data = fh.read()
    except OSError as exc:
        return Outcome(item, reason=UNREADABLE, detail=exc.strerror or str(exc))
    sha = hashlib.sha256(data).hexdigest()
    if item.label is None:
        return Outcome(item, reason=NO_LABEL, detail="file is not inside a class folder", sha256=sha)
    try:
        decoded = decode_image(
            data,
            max_pixels=p["max_pixels"],
            min_size=p["min_size"],
            max_aspect_ratio=p["max_aspect_ratio"],
            background=tuple(p["background"]),
        )
    except ImageRejected as rej:
        return Outcome(item, reason=rej.reason, detail=rej.detail, sha256=sha)
    payload, ext = decoded.encoded(data)
    rel = f"images/{sha[:2]}/{sha}.{ext}"
    dest = os.path.join(raw_dir, rel)
    if not os.path.exists(dest):
        storage.write_bytes(dest, payload)
    record = {
        "id": sha[:16],
        "path": rel,
        "label": item.label,
        "source_uri": item.uri,
        "width": decoded.width,
        "height": decoded.height,
        "format": decoded.format,
        "source_mode": decoded.source_mode,
        "sha256": sha,
        "bytes": len(payload),
        "split_hint": item.split_hint or "",
    }
    return Outcome(item, record=record, sha256=sha)


def _worker_count(requested: int) -> int:
    return requested or max(1, os.cpu_count() or 1)


def _resolve_duplicates(outcomes: list[Outcome]) -> None:
    """Exact duplicates by content: same label kept once; conflicting labels all quarantined."""
    by_hash: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.record is not None:
            by_hash[o.sha256].append(o)
    for group in by_hash.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda o: o.item.uri)
        labels = sorted({o.item.label for o in group})  # type: ignore[type-var]
        if len(labels) > 1:
            others = ", ".join(o.item.uri for o in group)
            for o in group:
                o.record, o.reason = None, CONFLICTING_LABELS
                o.detail = f"same content labelled {labels} at: {others}"
        else:
            for o in group[1:]:
                o.record, o.reason = None, DUPLICATE
                o.detail = f"same content as {group[0].item.uri}"


def _write_csv(path: str, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    storage.write_text(path, buf.getvalue())


def read_manifest(raw_dir: str) -> list[dict[str, str]]:
    path = storage.join(raw_dir, "manifest.csv")
    if not storage.exists(path):
        raise StageError(f"no manifest at {path}: run `cvpipe ingest` first")
    fs, p = storage.get_fs(path)
    with fs.open(p, "r", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _prune_unreferenced(raw_dir: Path, keep: set[str]) -> int:
    """Remove stored images no longer in the manifest, and leftovers of killed runs."""
    removed = 0
    images = raw_dir / "images"
    if not images.exists():
        return 0
    for path in images.rglob("*"):
        if path.is_file():
            rel = path.relative_to(raw_dir).as_posix()
            if rel not in keep:
                path.unlink()
                removed += 1
    for d in sorted(images.iterdir()) if images.exists() else []:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed


def run(params: Params) -> IngestReport:
    p: IngestParams = params.ingest
    for src in p.sources:
        check_source(src)
    raw_dir = Path(params.paths.raw)
    if storage.is_remote(params.paths.raw):
        raise StageError("paths.raw must be a local folder (DVC tracks it); sources may be remote")
    raw_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    items: list[SourceItem] = []
    for src in p.sources:
        items.extend(iter_source(src))
    items.sort(key=lambda it: it.uri)
    if not items:
        raise StageError(f"no files found in ingest.source {p.source!r}")

    opts = p.model_dump(mode="json")
    workers = _worker_count(p.workers)
    outcomes: list[Outcome] = []
    with progress("files") as bar:
        task = bar.add_task("ingest", total=len(items))
        if workers == 1:
            for it in items:
                outcomes.append(_process(it, str(raw_dir), opts))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                chunk = max(1, min(64, len(items) // (workers * 8) or 1))
                for o in pool.map(_process, items, [str(raw_dir)] * len(items), [opts] * len(items), chunksize=chunk):
                    outcomes.append(o)
                    bar.advance(task)

    _resolve_duplicates(outcomes)
    accepted = sorted((o.record for o in outcomes if o.record), key=lambda r: (r["label"], r["source_uri"]))
    rejected = sorted((o for o in outcomes if o.record is None), key=lambda o: o.item.uri)
    if not accepted:
        raise StageError(f"no valid image among {len(items)} files; see the reasons in {raw_dir / 'quarantine.csv'}")

    _write_csv(
        str(raw_dir / "quarantine.csv"),
        QUARANTINE_COLUMNS,
        (
            {"source_uri": o.item.uri, "label": o.item.label or "", "reason": o.reason, "detail": o.detail, "sha256": o.sha256}
            for o in rejected
        ),
    )
    _write_csv(str(raw_dir / "manifest.csv"), MANIFEST_COLUMNS, accepted)
    _prune_unreferenced(raw_dir, {r["path"] for r in accepted})

    report = IngestReport(
        accepted=len(accepted),
        quarantined=len(rejected),
        per_class=dict(sorted(Counter(r["label"] for r in accepted).items())),
        rejections=dict(sorted(Counter(o.reason for o in rejected).items())),  # type: ignore[arg-type]
        per_split_hint=dict(sorted(Counter(r["split_hint"] or "none" for r in accepted).items())),
        seconds=round(time.perf_counter() - started, 3),
    )
    storage.write_json(storage.join(params.paths.metrics, "ingest.json"), report.to_json())
    _print_report(report, raw_dir)
    return report


def _print_report(report: IngestReport, raw_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"ingest: {report.accepted} accepted, {report.quarantined} quarantined", title_justify="left")
    table.add_column("class")
    table.add_column("images", justify="right")
    for label, n in report.per_class.items():
        table.add_row(label, str(n))
    for reason, n in report.rejections.items():
        table.add_row(f"[red]rejected: {reason}[/red]", str(n))
    if not is_quiet():
        console.print(table)
    info(f"manifest: {raw_dir / 'manifest.csv'} ({report.seconds:.1f}s)")
