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

import contextlib
import hashlib
import json
import os
import queue
import shutil
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
from cvpipe.core.console import console, info, is_quiet, progress
from cvpipe.core.errors import StageError
from cvpipe.data import manifest
from cvpipe.data.images import ImageRejected, decode_image
from cvpipe.data.sources import SourceItem, SourceOptions, check_source, fetch_many, filesystem_for, list_sources

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
    # incremental work counters: a rerun over an unchanged source has transferred == decoded == 0
    listed: int = 0  # files found in the sources
    reused: int = 0  # outcomes taken from the state (fingerprint unchanged)
    transferred: int = 0  # files whose bytes were read or downloaded
    bytes_transferred: int = 0  # including archive downloads
    decoded: int = 0  # files fully decoded and validated

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _process(item: SourceItem, data: Optional[bytes], raw_dir: str, p: dict[str, Any]) -> Outcome:
    """Read (unless *data* was fetched already), hash, decode-check and store one file.

    Runs in a decode thread. Never raises: any failure is an outcome with a reason.
    """
    try:
        return _process_inner(item, data, raw_dir, p)
    except Exception as exc:  # a decoder bug must not stop the run: quarantine the file
        return Outcome(item, reason=UNREADABLE, detail=f"{type(exc).__name__}: {exc}")


def _process_inner(item: SourceItem, data: Optional[bytes], raw_dir: str, p: dict[str, Any]) -> Outcome:
    if data is None:
        try:
            with open(item.local_path, "rb") as fh:  # type: ignore[arg-type]
                data = fh.read()
        except (OSError, TypeError) as exc:
            return Outcome(item, reason=UNREADABLE, detail=getattr(exc, "strerror", None) or str(exc))
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
        # rerun re-checks every stored file's size (_stored_intact) before reusing it
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


def _prune_unreferenced(raw_dir: Path, keep: set[str]) -> int:
    """Remove stored images no longer in the manifest, and leftovers of killed runs.

    The store is two levels deep (``images/<sha[:2]>/<file>``); scandir with plain strings
    keeps this pass at a few milliseconds per thousand files.
    """
    removed = 0
    images = os.path.join(raw_dir, "images")
    try:
        with os.scandir(images) as top:
            entries = list(top)
    except FileNotFoundError:
        return 0
    shards = []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            shards.append(e)
        else:  # nothing of ours lives directly under images/
            os.unlink(e.path)
            removed += 1
    for shard in shards:
        left = 0
        with os.scandir(shard.path) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)  # nothing of ours nests deeper
                    removed += 1
                elif f"images/{shard.name}/{e.name}" in keep:
                    left += 1
                else:
                    os.unlink(e.path)
                    removed += 1
        if not left:
            os.rmdir(shard.path)
    return removed


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
    written under other validation params is ignored.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.entries: dict[str, dict[str, Any]] = {}
        self._fh: Optional[IO[str]] = None
        self._lines = 0  # entry lines in the file: more than len(entries) when a URI was redone
        self._torn = False
        self._appended = 0
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return
        if not lines:
            return
        try:
            if json.loads(lines[0]).get("params_key") != self.key:
                return
        except ValueError:
            return
        for line in lines[1:]:
            try:
                e = json.loads(line)
            except ValueError:
                self._torn = True  # by a kill
                continue
            if isinstance(e, dict) and "uri" in e:
                self.entries[e["uri"]] = e
                self._lines += 1

    def lookup(self, item: SourceItem) -> Optional[dict[str, Any]]:
        e = self.entries.get(item.uri)
        if e and item.fingerprint and e.get("fp") == item.fingerprint and e.get("label") == item.label:
            return e
        return None

    def open(self) -> None:
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
        if o.reason == UNREADABLE or not o.item.fingerprint:
            return  # transient (network, permissions) or unidentifiable: retried next run
        e: dict[str, Any] = {"uri": o.item.uri, "fp": o.item.fingerprint, "label": o.item.label, "sha": o.sha256}
        if o.record is not None:
            e["record"] = {k: o.record[k] for k in ("id", "path", "width", "height", "format", "source_mode", "sha256", "bytes")}
        else:
            e["reason"], e["detail"] = o.reason, o.detail
        self.entries[o.item.uri] = e
        self._appended += 1
        assert self._fh is not None
        self._fh.write(json.dumps(e, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self, keep: set[str]) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        kept = [u for u in sorted(keep) if u in self.entries]
        if not (self._appended or self._torn) and self._lines == len(self.entries) == len(kept):
            return  # already compact: an unchanged rerun writes nothing
        lines = [json.dumps({"params_key": self.key})]
        lines += [json.dumps(self.entries[u], ensure_ascii=False) for u in kept]
        # not fsynced: the journal is a cache; a torn or lost one only means files are decoded again
        storage.write_text(self.path, "\n".join(lines) + "\n", durable=False)


def _outcome_from_entry(item: SourceItem, e: dict[str, Any]) -> Outcome:
    if "record" in e:
        rec = dict(e["record"], label=item.label, source_uri=item.uri, split_hint=item.split_hint or "")
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
                raise StageError(f"fetching remote objects failed: {type(res).__name__}: {res}")
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
                    self.finish(Outcome(it, reason=UNREADABLE, detail=f"fetch failed: {type(data).__name__}: {data}"), None)
                    continue
                if data is not None:
                    data = bytes(data)
                # _process turns every failure of the file into an outcome
                self.finish(_process(it, data, self.raw_dir, self.opts), it.size if data is None else len(data))
        except BaseException as exc:
            self.failures.append(exc)
            self.stop.set()


def _clean_leftovers(*folders: Path) -> None:
    """Temp files of a killed run (never visible under a final name) are removed."""
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(storage.TMP_MARKER):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def run(params: Params) -> IngestReport:
    p: IngestParams = params.ingest
    for src in p.sources:
        check_source(src)
    raw_dir = Path(params.paths.raw)
    if storage.is_remote(params.paths.raw):
        raise StageError("paths.raw must be a local folder (DVC tracks it); sources may be remote")
    raw_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    src_opts = SourceOptions(gcs_token=p.gcs_token, max_archive_bytes=p.max_archive_bytes)
    report = IngestReport()

    stats: dict[str, int] = {}
    items = list_sources(p.sources, src_opts, stats)
    if not items:
        raise StageError(f"no files found in ingest.source {p.source!r}")
    report.listed = len(items)
    report.bytes_transferred += stats.get("bytes", 0)

    state = _open_state(p, raw_dir)
    outcomes, todo = _reuse_known(items, state, raw_dir, report)
    resolved = _process_with_progress(items, todo, outcomes, raw_dir, p, src_opts, state, report)
    state.close(set(outcomes))

    accepted = sorted((o.record for o in resolved if o.record), key=lambda r: (r["label"], r["source_uri"]))
    rejected = sorted((o for o in resolved if o.record is None), key=lambda o: o.item.uri)
    if not accepted:
        raise StageError(f"no valid image among {len(items)} files; see the reasons in {raw_dir / 'quarantine.csv'}")

    storage.write_csv(  # untouched when the bytes are unchanged: a rerun that changes nothing changes no file
        str(raw_dir / "quarantine.csv"),
        manifest.QUARANTINE_COLUMNS,
        (
            {"source_uri": o.item.uri, "label": o.item.label or "", "reason": o.reason, "detail": o.detail, "sha256": o.sha256}
            for o in rejected
        ),
        only_if_changed=True,
    )
    storage.write_csv(str(raw_dir / "manifest.csv"), manifest.MANIFEST_COLUMNS, accepted, only_if_changed=True)
    _prune_unreferenced(raw_dir, {r["path"] for r in accepted})

    _count(report, accepted, rejected)
    report.seconds = round(time.perf_counter() - started, 3)
    storage.write_json(storage.join(params.paths.metrics, "ingest.json"), report.to_json())
    _print_report(report, raw_dir)
    return report


def _open_state(p: IngestParams, raw_dir: Path) -> IngestState:
    """The journal of this raw folder (one per folder, under ``ingest.state_dir``), opened for appending."""
    state_path = Path(p.state_dir) / f"state-{hashlib.sha256(str(raw_dir.resolve()).encode()).hexdigest()[:16]}.jsonl"
    _clean_leftovers(raw_dir, state_path.parent)
    state = IngestState(state_path, _params_key(p))
    state.open()
    return state


def _reuse_known(items: list[SourceItem], state: IngestState, raw_dir: Path,
                 report: IngestReport) -> tuple[dict[str, Outcome], list[SourceItem]]:
    """Outcomes known without reading a file (junk, or unchanged in the journal and intact on disk), and the rest to do."""
    outcomes: dict[str, Outcome] = {}
    todo: list[SourceItem] = []
    for it in items:
        if it.junk:
            outcomes[it.uri] = Outcome(it, reason=JUNK, detail="OS/editor metadata or hidden file")
            continue
        e = state.lookup(it)
        if e is not None and "record" in e and not _stored_intact(raw_dir, e["record"]):
            e = None  # the stored copy is gone or cut short (e.g. lost in an OS crash): redo it
        if e is not None:
            outcomes[it.uri] = _outcome_from_entry(it, e)
            report.reused += 1
        else:
            todo.append(it)
    return outcomes, todo


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
