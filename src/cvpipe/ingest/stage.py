"""Ingest stage: collect raw images, validate every one, quarantine the bad with reasons.

Reads ``ingest.*`` and ``paths.raw`` / ``paths.metrics`` / ``paths.reports``. Writes::

    <paths.raw>/images/<sha[:2]>/<sha256>.<ext>   content-addressed images
    <paths.raw>/manifest.csv                      one row per accepted image
    <paths.raw>/quarantine.csv                    one row per rejected file, with a reason code
    <paths.metrics>/ingest.json                   headline counts: images, quarantined, labels_relabelled, seconds
    <paths.reports>/ingest.json                   the detail: per class, per split hint, rejections by reason,
                                                  work counters, reviewers' decisions

Images are stored under the SHA-256 of their source bytes; a clean RGB JPEG/PNG
keeps its original bytes, anything else is normalized (RGB, upright). Every file
is written atomically, so an interrupted run never leaves a partial image under
its final name, and a rerun reuses images already stored.

Ingest owns its output and nothing else: an output that overlaps a source is
refused before anything is touched (exit 2); only images it recorded itself (in
the previous manifest or its journal) are ever pruned, anything else under
``images/`` is left where it is, with a warning; one run at a time holds the
output's lock (``<paths.raw>/.cvpipe-ingest.lock``, naming its holder). A failure
to write the output (disk full, read-only, I/O error) stops the stage (exit 1,
naming the path; the previous manifest stays); only failures of the source side
become quarantine rows.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import stat
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

from rich.progress import ProgressColumn
from rich.text import Text

from cvpipe.core import storage
from cvpipe.core.config import IngestParams, Params
from cvpipe.core.console import console, info, is_quiet, progress, warn
from cvpipe.core.errors import CvpipeError, ParamsError, StageError, UsageError
from cvpipe.core.urls import redact_text, redact_url
from cvpipe.data import manifest
from cvpipe.data.images import ImageRejected, decode_image
from cvpipe.data.sources import (
    SourceItem,
    SourceOptions,
    check_source,
    fetch_many,
    filesystem_for,
    list_sources,
    overlaps,
    resolve_sources,
    source_location,
)
from cvpipe.ingest import overrides

JUNK = "junk_file"
NO_LABEL = "no_label"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
CONFLICTING_LABELS = "conflicting_labels"
TOO_LARGE = "too_large"
NOT_REGULAR = "not_a_regular_file"
# outcomes never journaled: transient (read or fetch failures) or found again without reading a byte
_NOT_JOURNALED = frozenset({UNREADABLE, TOO_LARGE, NOT_REGULAR})
LOCK_NAME = ".cvpipe-ingest.lock"
NAMELESS_HOLDER_WAIT_S = 2.0  # how long a lock held under no name is retried before exiting 2 without one
# what ingest writes under <raw>/images: <sha[:2]>/<sha256>.<ext>
_STORED_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]+")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")


class OutputError(StageError):
    """Writing the output failed (disk full, read-only, I/O error): the stage stops, exit 1.

    Never a per-file outcome: only the source side of a file produces quarantine rows.
    """


def _output_error(path: Any, exc: OSError, manifest_kept: bool) -> OutputError:
    why = exc.strerror or str(exc) or type(exc).__name__
    code = f"[Errno {exc.errno}] " if exc.errno else ""
    return OutputError(f"cannot write {path}: {code}{why}" + ("; the previous manifest is unchanged" if manifest_kept else ""))


@contextlib.contextmanager
def _writing(path: Any, manifest_kept: bool = True):
    """Turn an OSError while writing *path* into an :class:`OutputError` naming it (and saying the
    previous manifest is unchanged, when the failure comes before the new one is in place)."""
    try:
        yield
    except OSError as exc:
        raise _output_error(getattr(exc, "filename", None) or path, exc, manifest_kept) from None


@dataclass(slots=True)  # one per listed file: slots keep a million of them ~100 MB smaller
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
    # incremental work counters: a rerun over an unchanged source has transferred == decoded == 0
    listed: int = 0  # files found in the sources
    reused: int = 0  # outcomes taken from the state (fingerprint unchanged)
    transferred: int = 0  # files whose bytes were read or downloaded
    bytes_transferred: int = 0  # including archive downloads
    decoded: int = 0  # files fully decoded and validated
    # reviewers' decisions (ingest.overrides, cvpipe.ingest.overrides): applied this run
    labels_relabelled: int = 0
    images_excluded: int = 0
    review: dict[str, Any] = field(default_factory=dict)  # details: old -> new labels, unknown ids, label_review.json

    def to_json(self) -> dict[str, Any]:
        """Everything: the versioned report ``<paths.reports>/ingest.json``."""
        return asdict(self)

    def headline(self) -> dict[str, Any]:
        """The DVC metrics file ``<paths.metrics>/ingest.json``: the few counts a person compares across data
        versions (``dvc metrics diff``). Keys shared with the other stages' metrics files (``images``,
        ``seconds``) keep ``dvc metrics show`` to one narrow table; the detail is in :meth:`to_json`."""
        return {"images": self.accepted, "quarantined": self.quarantined,
                "labels_relabelled": self.labels_relabelled, "seconds": self.seconds}


def _process(item: SourceItem, data: Optional[bytes], raw_dir: str, p: dict[str, Any]) -> Outcome:
    """Read (unless *data* was fetched already), hash, decode-check and store one file.

    Runs in a decode thread. Never raises: any failure is an outcome with a reason.
    """
    try:
        return _process_inner(item, data, raw_dir, p)
    except OutputError:
        raise  # the output side failed: the stage stops, nothing is quarantined for it
    except Exception as exc:  # anything else about this file (e.g. out of memory): quarantined, retried next run
        return Outcome(item, reason=UNREADABLE, detail=redact_text(f"{type(exc).__name__}: {exc}", [item.remote]))


def _read_local(item: SourceItem, max_bytes: int) -> Outcome | bytes:
    """The bytes of a local file, or the outcome that says why they are not read.

    Opened without blocking (a FIFO that appeared since the listing must not hang the run) and checked
    to be a regular file no larger than *max_bytes* before a byte is read (one that grows meanwhile is read
    at most a chunk past the cap).
    """
    try:
        fd = os.open(item.local_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))  # type: ignore[arg-type]
    except (OSError, TypeError) as exc:
        return Outcome(item, reason=UNREADABLE, detail=getattr(exc, "strerror", None) or str(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Outcome(item, reason=NOT_REGULAR, detail="not a regular file (a FIFO, socket or device)")
        if st.st_size > max_bytes:
            return _too_large(item, st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(st.st_size + 1)  # one buffer of the file's size (+1 byte to notice it grew)
            if len(data) > st.st_size:  # it grew since the stat: read on, never far past the cap
                parts, total = [data], len(data)
                while total <= max_bytes and (chunk := fh.read(1 << 20)):
                    parts.append(chunk)
                    total += len(chunk)
                data = b"".join(parts)
        if len(data) > max_bytes:
            return _too_large(item, len(data), max_bytes)
        return data
    except OSError as exc:
        return Outcome(item, reason=UNREADABLE, detail=exc.strerror or str(exc))
    finally:
        os.close(fd)


def _max_bytes(p: dict[str, Any] | IngestParams) -> int:
    mb = p["max_file_mb"] if isinstance(p, dict) else p.max_file_mb
    return int(mb * 1024 * 1024)


def _too_large(item: SourceItem, size: int, max_bytes: int) -> Outcome:
    return Outcome(item, reason=TOO_LARGE, detail=f"{size} bytes exceeds max_file_mb={max_bytes / 1024 / 1024:g} ({max_bytes} bytes)")


def _process_inner(item: SourceItem, data: Optional[bytes], raw_dir: str, p: dict[str, Any]) -> Outcome:
    max_bytes = _max_bytes(p)
    if data is None:
        got = _read_local(item, max_bytes)
        if isinstance(got, Outcome):
            return got
        data = got
    elif len(data) > max_bytes:  # a fetched object whose size the listing did not know
        return _too_large(item, len(data), max_bytes)
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
        # no fsync per image: rename keeps a killed run from exposing a partial file, and a
        # rerun re-checks every stored file's size (_stored_intact) before reusing it.
        # A failure here is the output's (disk full, read-only): it stops the stage.
        with _writing(dest):
            storage.write_bytes(dest, payload, durable=False)
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


def _stored_intact(raw_dir: Path | str, record: dict[str, Any]) -> bool:
    try:
        return os.stat(os.path.join(raw_dir, record["path"])).st_size == int(record["bytes"])
    except (OSError, KeyError, ValueError):
        return False


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


def _prune_unreferenced(raw_dir: Path, keep: set[str], owned: set[str]) -> tuple[int, list[str]]:
    """Remove the stored images ingest wrote itself (*owned*) that the new manifest no longer lists
    (*keep*), and temp files of killed runs: ``(removed, what was left alone)``.

    Everything else under ``images/`` -- files ingest did not record, other folders -- is someone
    else's: it stays where it is and is returned (relative to *raw_dir*) for a warning. The store
    is two levels deep (``images/<sha[:2]>/<file>``); scandir with plain strings keeps this pass at
    a few milliseconds per thousand files.
    """
    removed = 0
    foreign: list[str] = []
    images = os.path.join(raw_dir, "images")
    try:
        with os.scandir(images) as top:
            entries = sorted(top, key=lambda e: e.name)
    except FileNotFoundError:
        return 0, []
    for e in entries:
        if e.name.startswith(storage.TMP_MARKER) and not e.is_dir(follow_symlinks=False):
            removed += _unlink(e.path)
        elif e.is_dir(follow_symlinks=False) and _SHARD_NAME.fullmatch(e.name):
            removed += _prune_shard(e, keep, owned, foreign)
        else:  # nothing of ours lives directly under images/, or in folders not named like a shard
            foreign.append(f"images/{e.name}" + ("/" if e.is_dir(follow_symlinks=False) else ""))
    return removed, foreign


def _prune_shard(shard: os.DirEntry, keep: set[str], owned: set[str], foreign: list[str]) -> int:
    removed = left = 0
    with os.scandir(shard.path) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            rel = f"images/{shard.name}/{e.name}"
            if e.is_dir(follow_symlinks=False):
                foreign.append(rel + "/")  # nothing of ours nests deeper
                left += 1
            elif rel in keep:
                left += 1
            elif e.name.startswith(storage.TMP_MARKER) or (rel in owned and _STORED_NAME.fullmatch(e.name)):
                removed += _unlink(e.path)
            else:
                foreign.append(rel)
                left += 1
    if not left:
        with contextlib.suppress(OSError):
            os.rmdir(shard.path)
    return removed


def _unlink(path: str) -> int:
    with _writing(path, manifest_kept=False):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 1


def _previous_paths(raw_dir: Path) -> set[str]:
    """The ``path`` column of the manifest a previous run left (what ingest stored there), if any."""
    try:
        with open(raw_dir / "manifest.csv", newline="", encoding="utf-8") as fh:
            return {row.get("path") or "" for row in csv.DictReader(fh)} - {""}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def _warn_foreign(raw_dir: Path, foreign: list[str]) -> None:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    warn(f"left {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} under {raw_dir / 'images'} that ingest did not "
         f"write (never deleted): {shown}")


VALIDATION_VERSION = 2  # bump when decode_image's rules change: invalidates every stored outcome


def _params_key(p: IngestParams) -> str:
    """Outcomes depend on these: a change makes the state stale (everything is decoded again)."""
    blob = json.dumps(
        [VALIDATION_VERSION, p.min_size, p.max_pixels, p.max_aspect_ratio, list(p.background)], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class IngestState:
    """Append-only journal ``uri -> (fingerprint, label, outcome)``, one JSON object per line.

    Written line by line as files finish (flushed, so a SIGKILL loses at most the
    line being written; a torn last line is ignored when read back), compacted
    atomically at the end of a run. The first line holds the params key; a journal
    written under other validation params is ignored, except for :attr:`owned`: the
    stored paths it records are still images ingest wrote (and this run may prune them).
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.entries: dict[str, dict[str, Any]] = {}
        self.owned: set[str] = set()  # every stored path this journal ever recorded
        self._fh: Optional[IO[str]] = None
        self._lines = 0  # entry lines in the file: more than len(entries) when a URI was redone
        self._torn = False
        self._appended = 0
        if path.exists():
            self._load()

    def _load(self) -> None:
        # line by line: a million-line journal is never one string. A line cut inside a UTF-8 character by a
        # kill decodes with a replacement character, fails as JSON and is skipped like any torn line.
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                self._read(fh)
        except OSError:
            return

    def _read(self, fh: IO[str]) -> None:
        try:
            current = json.loads(fh.readline()).get("params_key") == self.key
        except (ValueError, AttributeError):
            return
        for line in fh:
            try:
                e = json.loads(line, object_pairs_hook=_shared_strings)
            except ValueError:
                self._torn = True  # by a kill
                continue
            if isinstance(e, dict) and "uri" in e:
                if isinstance(e.get("record"), dict) and isinstance(e["record"].get("path"), str):
                    self.owned.add(e["record"]["path"])
                if current:
                    self.entries[e["uri"]] = e
                    self._lines += 1

    def lookup(self, item: SourceItem) -> Optional[dict[str, Any]]:
        e = self.entries.get(item.uri)
        if e and item.fingerprint and e.get("fp") == item.fingerprint and e.get("label") == item.label:
            return e
        return None

    def open(self) -> None:
        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or not self.entries and not self._header_ok()
            if fresh:
                storage.write_text(self.path, json.dumps({"params_key": self.key}) + "\n")
            self._fh = open(self.path, "a+", encoding="utf-8")
            self._fh.seek(0, os.SEEK_END)
            if self._fh.tell() > 0:
                self._fh.seek(self._fh.tell() - 1)
                last = self._fh.read(1)
                if last != "\n":  # a torn line from a killed run: never glue the next entry to it
                    self._fh.write("\n")
            self._fh.flush()

    def _header_ok(self) -> bool:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.loads(fh.readline()).get("params_key") == self.key
        except (OSError, ValueError):
            return False

    def record(self, o: Outcome) -> None:
        if o.reason in _NOT_JOURNALED or not o.item.fingerprint:
            return  # transient (network, permissions), free to find again, or unidentifiable: retried next run
        e: dict[str, Any] = {"uri": o.item.uri, "fp": o.item.fingerprint, "label": o.item.label, "sha": o.sha256}
        if o.record is not None:
            e["record"] = o.record  # the manifest row itself, not a copy: _journal_line writes the journal's part of it
            self.owned.add(o.record["path"])
        else:
            e["reason"], e["detail"] = o.reason, o.detail
        self.entries[o.item.uri] = e
        self._appended += 1
        assert self._fh is not None
        with _writing(self.path):
            self._fh.write(_journal_line(e))
            self._fh.flush()

    def abort(self) -> None:
        """Close the journal after a failed run, as it is (the lines written so far stay valid)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def close(self, keep: set[str]) -> None:
        if self._fh is not None:
            with _writing(self.path):
                self._fh.close()
            self._fh = None
        kept = [u for u in sorted(keep) if u in self.entries]
        if not (self._appended or self._torn) and self._lines == len(self.entries) == len(kept):
            return  # already compact: an unchanged rerun writes nothing
        # streamed into the temp file, not joined first; not fsynced: the journal is a cache, and
        # a torn or lost one only means files are decoded again
        with _writing(self.path), storage.atomic_open(self.path, "w", durable=False, encoding="utf-8") as fh:
            fh.write(json.dumps({"params_key": self.key}) + "\n")
            for u in kept:
                fh.write(_journal_line(self.entries[u]))


_JOURNAL_RECORD_KEYS = ("id", "path", "width", "height", "format", "source_mode", "sha256", "bytes")


def _journal_line(e: dict[str, Any]) -> str:
    """One journal line: the entry, with only the stored file's part of its record (the label, source URI and
    split hint are the item's, which the listing gives again)."""
    if "record" in e:
        e = dict(e, record={k: e["record"][k] for k in _JOURNAL_RECORD_KEYS})
    return json.dumps(e, ensure_ascii=False) + "\n"


def _shared_strings(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A journal object, its keys (and the few values every entry repeats) interned: ``json.loads`` makes fresh
    key strings for every line; shared, a 40k-image journal read back takes 24 MB instead of 74."""
    return {sys.intern(k): sys.intern(v) if k in _REPEATED_VALUES and isinstance(v, str) else v for k, v in pairs}


_REPEATED_VALUES = frozenset(manifest.REPEATED_COLUMNS)


def _outcome_from_entry(item: SourceItem, e: dict[str, Any]) -> Outcome:
    if "record" in e:
        rec = e["record"]  # completed in place into the manifest row (the journal writes only its own keys of it)
        rec.update(label=item.label, source_uri=item.uri, split_hint=item.split_hint or "")
        return Outcome(item, record=rec, sha256=e.get("sha", ""))
    return Outcome(item, reason=e.get("reason"), detail=e.get("detail", ""), sha256=e.get("sha", ""))


_DONE = object()


def _fetch_remote(remote: list[SourceItem], opts: SourceOptions, concurrency: int, out: "queue.Queue[tuple[Any, Any]]",
                  stop: threading.Event) -> None:
    """Fetch remote objects in concurrent batches into *out* as ``(item, bytes | exception)``.

    *out* is bounded, so fetched bytes wait in memory only until a decode thread is free;
    ``(None, _DONE)`` (or ``(None, exception)`` if the listing's filesystem itself broke) ends it.
    """
    end: Any = _DONE
    try:
        by_proto: dict[str, list[SourceItem]] = defaultdict(list)
        for it in remote:
            by_proto[storage.protocol(it.remote)].append(it)  # type: ignore[arg-type]
        batch = max(2 * concurrency, 64)
        for group in by_proto.values():
            try:
                fs = filesystem_for(group[0].remote, opts)  # type: ignore[arg-type]
            except Exception as exc:
                for it in group:
                    out.put((it, exc))
                continue
            for i in range(0, len(group), batch):
                if stop.is_set():
                    return
                chunk = group[i : i + batch]
                for it, res in zip(chunk, fetch_many(fs, [it.remote for it in chunk], concurrency)):  # type: ignore[misc]
                    out.put((it, res))
    except BaseException as exc:  # pragma: no cover - never leave the decode threads waiting
        end = exc
    finally:
        out.put((None, end))


class _BytesRate(ProgressColumn):
    def render(self, task) -> Text:  # type: ignore[override]
        elapsed = task.finished_time if task.finished else task.elapsed
        b = task.fields.get("bytes", 0)
        if not elapsed or not b:
            return Text("- B/s", style="cyan")
        rate = b / elapsed
        for unit in ("B", "KiB", "MiB", "GiB"):
            if rate < 1024 or unit == "GiB":
                return Text(f"{rate:,.1f} {unit}/s", style="cyan")
            rate /= 1024
        return Text("")  # pragma: no cover


def _process_items(
    todo: list[SourceItem], raw_dir: str, p: IngestParams, src_opts: SourceOptions, state: IngestState,
    report: IngestReport, on_done: Callable[[Outcome, int], None],
) -> list[Outcome]:
    """Transfer (remote: concurrently; local: by the decode threads) and decode every item of *todo*.

    ``ingest.workers`` decode *threads*, not processes: the per-file work is almost all C that
    releases the GIL (file I/O, SHA-256, libjpeg-turbo, Pillow's decoders); the Python left
    (header parse, marker walk, bookkeeping) is a few percent. Processes paid for that with
    forks, pickled items and outcomes, and a parent competing with the workers for the cores.
    Each thread pulls its next file itself (fetched objects as they arrive, local files largest
    first, so the run ends on small ones and no thread finishes long after the other) and records
    the outcome (journal, counters, progress) under one lock: no thread wakes per file to
    hand work around.
    """
    if not todo:
        return []
    threads = _DecodeThreads(todo, raw_dir, p, src_opts, state, report, on_done)
    report.transferred += len(threads.local)
    report.bytes_transferred += sum(it.size for it in threads.local)
    return threads.run()


class _DecodeThreads:
    """One :func:`_process_items` call: its work lists, the fetch queue, the decode threads and what they found."""

    def __init__(self, todo: list[SourceItem], raw_dir: str, p: IngestParams, src_opts: SourceOptions,
                 state: IngestState, report: IngestReport, on_done: Callable[[Outcome, int], None]):
        self.raw_dir, self.src_opts, self.state, self.report, self.on_done = raw_dir, src_opts, state, report, on_done
        self.opts = p.model_dump(mode="json")
        self.concurrency = p.transfer_concurrency
        self.local = deque(sorted((it for it in todo if not it.remote), key=lambda it: -it.size))
        self.remote = [it for it in todo if it.remote]
        self.workers = _worker_count(p.workers)
        self.fetched: "queue.Queue[tuple[Any, Any]]" = queue.Queue(maxsize=self.workers * 4 + 2 * p.transfer_concurrency)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.results: list[Outcome] = []
        self.failures: list[BaseException] = []

    def run(self) -> list[Outcome]:
        """Start the decode threads (and the fetcher, for remote items), wait for them, raise their first failure."""
        threads = [threading.Thread(target=self.decode_loop, name=f"cvpipe-ingest-{i}", daemon=True)
                   for i in range(self.workers)]
        if self.remote:
            threads.append(threading.Thread(target=_fetch_remote,
                                            args=(self.remote, self.src_opts, self.concurrency, self.fetched, self.stop),
                                            name="cvpipe-ingest-fetch", daemon=True))
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        finally:
            self.stop.set()
            while any(t.is_alive() for t in threads):  # interrupted: unblock a fetcher waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    self.fetched.get_nowait()
                for t in threads:
                    t.join(0.05)
        if self.failures:
            exc = self.failures[0]
            raise exc if isinstance(exc, StageError) else StageError(f"ingest failed: {type(exc).__name__}: {exc}")
        return self.results

    def finish(self, o: Outcome, consumed: Optional[int]) -> None:
        with self.lock:
            if consumed is not None:  # None: a failed fetch, nothing was read or decoded
                self.report.decoded += 1
                if o.item.remote:
                    self.report.transferred += 1
                    self.report.bytes_transferred += consumed
            self.state.record(o)
            self.results.append(o)
            self.on_done(o, consumed or 0)

    def fetched_item(self, block: bool) -> Optional[tuple[SourceItem, Any]]:
        """The next fetched object, or None when there is none now (*block*: none will come)."""
        while True:
            try:
                it, res = self.fetched.get(timeout=0.1) if block else self.fetched.get_nowait()
            except queue.Empty:
                if block and not self.stop.is_set():
                    continue
                return None
            if it is not None:
                return it, res
            self.fetched.put((it, res))  # the end marker stays for the other threads
            if res is not _DONE:
                raise StageError(redact_text(f"fetching remote objects failed: {type(res).__name__}: {res}",
                                             [it.remote for it in self.remote]))
            return None

    def next_job(self) -> Optional[tuple[SourceItem, Any]]:
        """Fetched bytes first (the fetcher waits while its queue is full), then local files, then wait for fetches."""
        job = self.fetched_item(block=False) if self.remote else None
        if job is not None:
            return job
        try:
            return self.local.popleft(), None
        except IndexError:
            return self.fetched_item(block=True) if self.remote else None

    def decode_loop(self) -> None:
        try:
            while not self.stop.is_set():
                job = self.next_job()
                if job is None:
                    return
                it, data = job
                if isinstance(data, BaseException):
                    detail = redact_text(f"fetch failed: {type(data).__name__}: {data}", [it.remote])
                    self.finish(Outcome(it, reason=UNREADABLE, detail=detail), None)
                    continue
                if data is not None:
                    data = bytes(data)
                # _process turns every failure of the file into an outcome
                self.finish(_process(it, data, self.raw_dir, self.opts), it.size if data is None else len(data))
        except BaseException as exc:
            self.failures.append(exc)
            self.stop.set()


def _clean_leftovers(raw_dir: Path, state_path: Path) -> None:
    """Temp files of a killed run (never visible under a final name) are removed: in the output (which
    this run holds the lock of) and this output's journal's own in the state folder (other outputs'
    journals there may be in the middle of a write)."""
    for folder, suffix in ((raw_dir, ""), (state_path.parent, f"-{state_path.name}")):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(storage.TMP_MARKER) and path.name.endswith(suffix):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def run(params: Params) -> IngestReport:
    """Ingest ``ingest.source`` into ``paths.raw``; see the module docstring. No message it raises
    carries a credential of a source URL."""
    sources = resolve_sources(params.ingest.sources)  # ${NAME} variables expanded: in memory only
    try:
        return _run(params, sources)
    except CvpipeError as exc:
        text = redact_text(str(exc), sources)
        if text == str(exc):
            raise
        raise type(exc)(text) from None
    except Exception as exc:
        text = redact_text(f"{type(exc).__name__}: {exc}", sources)
        if text == f"{type(exc).__name__}: {exc}":
            raise
        raise StageError(text) from None


def _run(params: Params, sources: list[str]) -> IngestReport:
    p: IngestParams = params.ingest
    for src in sources:
        check_source(src)
    raw_dir = Path(params.paths.raw)
    if storage.is_remote(params.paths.raw):
        raise StageError("paths.raw must be a local folder (DVC tracks it); sources may be remote")
    _refuse_overlap(sources, raw_dir)  # before anything is read or written
    started = time.perf_counter()
    src_opts = SourceOptions(gcs_token=p.gcs_token, max_archive_bytes=p.max_archive_bytes)
    report = IngestReport()

    stats: dict[str, int] = {}
    items = list_sources(sources, src_opts, stats)
    if not items:
        raise StageError(f"no files found in ingest.source {redact_url(str(p.source))!r}")
    _refuse_items_inside(items, raw_dir)
    report.listed = len(items)
    report.bytes_transferred += stats.get("bytes", 0)

    with _writing(raw_dir):
        raw_dir.mkdir(parents=True, exist_ok=True)
    with _output_lock(raw_dir):
        _ingest(params, items, raw_dir, src_opts, report)
    report.seconds = round(time.perf_counter() - started, 3)
    for path, content in ((storage.join(params.paths.reports, "ingest.json"), report.to_json()),
                          (storage.join(params.paths.metrics, "ingest.json"), report.headline())):
        with _writing(path, manifest_kept=False):
            storage.write_json(path, content)
    _print_report(report, raw_dir)
    return report


def _ingest(params: Params, items: list[SourceItem], raw_dir: Path, src_opts: SourceOptions, report: IngestReport) -> None:
    """The part of a run that holds the output's lock: process, write the manifest and quarantine, prune."""
    p = params.ingest
    previous = _previous_paths(raw_dir)  # stored by an earlier run: ingest's own, whatever the journal says
    before = overrides.previous_labels(raw_dir)
    decisions = overrides.load(p)  # a malformed overrides file stops the run before anything is written
    state = _open_state(p, raw_dir)
    try:
        listed_rejects, outcomes, todo = _reuse_known(items, state, raw_dir, report, _max_bytes(p))
        resolved = _process_with_progress(items, todo, outcomes, raw_dir, p, src_opts, state, report)
        state.close(set(outcomes))
    except BaseException:
        state.abort()
        raise
    resolved += listed_rejects
    review = overrides.apply(resolved, decisions)

    accepted = sorted((o.record for o in resolved if o.record), key=lambda r: (r["label"], r["source_uri"]))
    rejected = sorted((o for o in resolved if o.record is None), key=lambda o: (o.item.uri, o.item.label or ""))
    if not accepted:
        raise StageError(f"no valid image among {len(items)} files; see the reasons in {raw_dir / 'quarantine.csv'}")

    with _writing(raw_dir / "quarantine.csv"):
        storage.write_csv(  # untouched when the bytes are unchanged: a rerun that changes nothing changes no file
            str(raw_dir / "quarantine.csv"),
            manifest.QUARANTINE_COLUMNS,
            (
                {"source_uri": o.item.uri, "label": o.item.label or "", "reason": o.reason, "detail": o.detail, "sha256": o.sha256}
                for o in rejected
            ),
            only_if_changed=True,
        )
    with _writing(raw_dir / "manifest.csv"):
        storage.write_csv(str(raw_dir / "manifest.csv"), manifest.MANIFEST_COLUMNS, accepted, only_if_changed=True)
    owned = previous | state.owned | {o.record["path"] for o in outcomes.values() if o.record}
    _, foreign = _prune_unreferenced(raw_dir, {r["path"] for r in accepted}, owned)
    if foreign:
        _warn_foreign(raw_dir, foreign)
    _count(report, accepted, rejected)
    with _writing(raw_dir / manifest.LABEL_REVIEW_NAME, manifest_kept=False):
        summary = overrides.write_summary(raw_dir, review, before, accepted)
    report.labels_relabelled, report.images_excluded = review["labels_relabelled"], review["images_excluded"]
    report.review = {k: v for k, v in review.items() if k not in ("labels_relabelled", "images_excluded")}
    report.review["since_previous"] = summary


def _refuse_overlap(sources: list[str], raw_dir: Path) -> None:
    """Exit 2, nothing touched, when the output and a source contain one another (real paths; bucket/prefix)."""
    out = source_location(str(raw_dir))
    for src in sources:
        loc = source_location(src)
        if overlaps(loc, out):
            assert loc is not None and out is not None
            how = "is" if loc[1] == out[1] else ("is inside" if out[1].startswith(loc[1]) else "contains")
            raise ParamsError(
                f"paths.raw: the output {str(raw_dir)!r} {how} the source {redact_url(src)!r} (real paths: {out[1]} "
                f"and {loc[1]}); ingest would store into, and prune, what it reads: choose an output outside every "
                "source. Nothing was written."
            )


def _refuse_items_inside(items: list[SourceItem], raw_dir: Path) -> None:
    """Exit 2, nothing touched, when a listed file (a manifest row, an extracted archive) lies inside the output."""
    out = source_location(str(raw_dir))
    assert out is not None
    inside = [it for it in items if it.local_path and (it.local_path == out[1] or it.local_path.startswith(out[1] + os.sep))]
    if inside:
        raise ParamsError(
            f"paths.raw: {len(inside)} listed file(s) lie inside the output {str(raw_dir)!r}, e.g. {inside[0].uri!r}: "
            "ingest would store into, and prune, what it reads: choose an output outside every source. Nothing was written."
        )


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _describe_holder(path: Path) -> str | None:
    """The lock holder's pid, host and start time, or None while the lock file names nobody."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _output_lock(raw_dir: Path):
    """Hold ``<raw>/.cvpipe-ingest.lock`` (an OS file lock: released by the kernel if the holder dies),
    with the holder's pid, host and start time written in it while held; a second run exits 2 naming them.

    The file stays (empty) after the run: removing a lock file races with a process about to take it.
    A second run that finds the lock taken but the file empty has met the holder between taking the lock
    and writing its name, or between truncating and letting go; it retries for up to
    ``NAMELESS_HOLDER_WAIT_S``, and then either names the holder or takes the freed lock.
    """
    from filelock import FileLock, Timeout

    path = raw_dir / LOCK_NAME
    holder = (_holder() + "\n").encode()

    def write_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)

    lock = FileLock(str(path), timeout=0, on_acquired=write_holder)
    deadline = time.monotonic() + NAMELESS_HOLDER_WAIT_S
    with _writing(path):
        while True:
            try:
                lock.acquire(blocking=False)
                break
            except Timeout:  # an OSError itself: caught before _writing would call it a write failure
                named = _describe_holder(path)
                # An empty file means the holder has just taken the lock and not yet written its name, or has
                # just truncated it to let go: either way a moment resolves it (its name, or a free lock).
                if named is not None or time.monotonic() > deadline:
                    raise UsageError(
                        f"another ingest is writing into {raw_dir}: "
                        f"{named or 'a process that has not written its name yet'} (lock file {path}); "
                        "run one at a time per output"
                    ) from None
                time.sleep(0.05)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.truncate(path, 0)  # before the release: the next holder writes its own name
        lock.release()


def _open_state(p: IngestParams, raw_dir: Path) -> IngestState:
    """The journal of this raw folder (one per folder, under ``ingest.state_dir``), opened for appending."""
    state_path = Path(p.state_dir) / f"state-{hashlib.sha256(str(raw_dir.resolve()).encode()).hexdigest()[:16]}.jsonl"
    with _writing(state_path.parent):
        _clean_leftovers(raw_dir, state_path)
    state = IngestState(state_path, _params_key(p))
    state.open()
    return state


def _reuse_known(items: list[SourceItem], state: IngestState, raw_dir: Path, report: IngestReport,
                 max_bytes: int) -> tuple[list[Outcome], dict[str, Outcome], list[SourceItem]]:
    """What is known without reading a file: ``(rejected by the listing, outcomes by URI, the rest to do)``.

    Junk, items the listing rejected (unreadable folders, FIFOs, conflicting labels...: one outcome
    per naming, never journaled), files above ``ingest.max_file_mb`` by their listed size, and
    items unchanged in the journal whose stored copy is intact.
    """
    listed_rejects: list[Outcome] = []
    outcomes: dict[str, Outcome] = {}
    todo: list[SourceItem] = []
    for it in items:
        if it.junk:
            outcomes[it.uri] = Outcome(it, reason=JUNK, detail="OS/editor metadata or hidden file")
            continue
        if it.rejected is not None:
            listed_rejects.append(Outcome(it, reason=it.rejected[0], detail=it.rejected[1]))
            continue
        if it.size > max_bytes:
            outcomes[it.uri] = _too_large(it, it.size, max_bytes)
            continue
        e = state.lookup(it)
        if e is not None and "record" in e and not _stored_intact(raw_dir, e["record"]):
            e = None  # the stored copy is gone or cut short (e.g. lost in an OS crash): redo it
        if e is not None:
            outcomes[it.uri] = _outcome_from_entry(it, e)
            report.reused += 1
        else:
            todo.append(it)
    return listed_rejects, outcomes, todo


def _process_with_progress(items: list[SourceItem], todo: list[SourceItem], outcomes: dict[str, Outcome], raw_dir: Path,
                           p: IngestParams, src_opts: SourceOptions, state: IngestState,
                           report: IngestReport) -> list[Outcome]:
    """Process *todo* into *outcomes* under a progress bar; the outcomes with duplicates resolved."""
    with progress("files", _BytesRate()) as bar:
        task = bar.add_task("ingest", total=len(items), completed=len(items) - len(todo), bytes=0)

        def on_done(o: Outcome, nbytes: int) -> None:
            bar.update(task, advance=1, bytes=bar.tasks[0].fields.get("bytes", 0) + nbytes)

        for o in _process_items(todo, str(raw_dir), p, src_opts, state, report, on_done):
            outcomes[o.item.uri] = o

        resolved = _resolve_duplicates_copy(outcomes.values())
        # an accepted image whose stored file is gone (deleted by hand, or by `dvc repro`
        # without persist) is fetched and stored again
        missing = [o.item for o in resolved if o.record and not os.path.exists(os.path.join(raw_dir, o.record["path"]))]
        if missing:
            bar.update(task, total=len(items) + len(missing))
            for o in _process_items(missing, str(raw_dir), p, src_opts, state, report, on_done):
                outcomes[o.item.uri] = o
            resolved = _resolve_duplicates_copy(outcomes.values())
    return resolved


def _count(report: IngestReport, accepted: list[dict[str, Any]], rejected: list[Outcome]) -> None:
    """The report's counts: accepted and quarantined, per class, per rejection reason, per split hint."""
    report.accepted = len(accepted)
    report.quarantined = len(rejected)
    report.per_class = dict(sorted(Counter(r["label"] for r in accepted).items()))
    report.rejections = dict(sorted(Counter(o.reason for o in rejected).items()))  # type: ignore[arg-type]
    report.per_split_hint = dict(sorted(Counter(r["split_hint"] or "none" for r in accepted).items()))


def _resolve_duplicates_copy(outcomes: Iterable[Outcome]) -> list[Outcome]:
    copies = [replace(o) for o in outcomes]
    _resolve_duplicates(copies)
    return copies


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
    info(
        f"manifest: {raw_dir / 'manifest.csv'} ({report.seconds:.1f}s; {report.transferred} transferred, "
        f"{report.decoded} decoded, {report.reused} reused)"
    )
    if report.review.get("decisions"):
        info(f"review decisions: {report.labels_relabelled} relabelled, {report.images_excluded} excluded, "
             f"{report.review['labels_kept']} kept, {len(report.review['unknown_ids'])} unknown ids")
