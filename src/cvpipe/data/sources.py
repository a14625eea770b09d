"""Where raw images come from: each source kind lists :class:`SourceItem` records.

A source is a URI in ``ingest.source`` (one or a list). Every kind goes through
fsspec, so listing, fingerprinting and fetching share one code path:

* ``sample://digits`` -- the built-in sample (see :mod:`cvpipe.data.sample`);
* a local folder in class-subfolder layout (``root/<class>/*``), or split layout
  (``root/<train|val|test>/<class>/*``), whose split is kept as a hint for preprocess;
* ``gs://bucket/prefix`` -- the same layouts in a bucket, through gcsfs (credentials
  from ``GOOGLE_APPLICATION_CREDENTIALS``/ADC, or ``ingest.gcs_token: anon``);
  objects are fetched concurrently by the ingest stage;
* ``http(s)://.../data.zip`` (``.tar``, ``.tar.gz``, ``.tgz``) -- an archive holding
  one of the layouts above (one wrapping top-level folder is allowed), downloaded
  once into the cache and extracted safely (see :func:`safe_extract`);
* a ``.csv`` or ``.jsonl`` manifest (local, ``gs://`` or ``http(s)://``) of
  ``uri,label[,split]`` rows; ``uri`` is a local path (relative to the manifest's
  folder), ``gs://`` or ``http(s)://``.

Every item carries a *fingerprint* (etag/generation for objects, size+mtime for
files) that lets a rerun skip whatever did not change.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from cvpipe.core import storage
from cvpipe.core.errors import ParamsError, StageError

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
JUNK_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", ".ds_store"}
JUNK_DIRS = {"__macosx", "@eadir", ".ipynb_checkpoints"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class SourceItem:
    uri: str  # stable identity of the file in its source (recorded in the manifest)
    local_path: Optional[str]  # where to read the bytes from, when local
    label: Optional[str]  # None: no class folder -> quarantined
    split_hint: Optional[str] = None
    junk: bool = False
    fingerprint: str = ""  # etag / generation / size+mtime; "" = unknown, always reprocessed
    remote: Optional[str] = None  # fsspec URL to fetch the bytes from, when not local
    size: int = 0


@dataclass(frozen=True)
class SourceOptions:
    gcs_token: Optional[str] = None  # None: gcsfs default chain (GOOGLE_APPLICATION_CREDENTIALS, ADC, metadata)
    max_archive_bytes: int = 2 * 1024**3
    cache_dir: Optional[str] = None


def is_junk_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_FILES


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_DIRS


def _walk_files(root: Path) -> Iterator[tuple[str, str]]:
    """``(path, posix path relative to root)`` of every file under *root*, sorted, hidden folders skipped.

    Plain strings, not Path objects: a listing of 100k files should cost the stat calls, not pathlib.
    """
    top = str(root)
    for dirpath, dirnames, filenames in os.walk(top):
        # hidden and OS-metadata folders (.git, __MACOSX) are not data
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
        base = "" if rel_dir == "." else rel_dir + "/"
        for name in sorted(filenames):
            yield os.path.join(dirpath, name), base + name


def _is_split_layout(top_dirs: Iterable[str]) -> bool:
    subdirs = [d.lower() for d in top_dirs if not d.startswith(".")]
    return bool(subdirs) and all(d in SPLIT_NAMES for d in subdirs)


def _layout(rel_paths: list[str], split_layout: bool, rel: str) -> tuple[Optional[str], Optional[str]]:
    """(label, split_hint) of the relative posix path *rel*."""
    parts = rel.split("/")
    split_hint = None
    if split_layout and len(parts) > 1:
        split_hint, parts = SPLIT_NAMES[parts[0].lower()], parts[1:]
    label = parts[0] if len(parts) > 1 else None
    return label, split_hint


def _top_dirs(rel_paths: Iterable[str]) -> set[str]:
    return {r.split("/", 1)[0] for r in rel_paths if "/" in r}


def _items_from_tree(
    files: list[tuple[str, Optional[str], Optional[str], str, int]], prefix: str
) -> Iterator[SourceItem]:
    """Items of a tree given ``(relpath, local_path, remote, fingerprint, size)`` rows."""
    rels = [f[0] for f in files]
    split_layout = _is_split_layout(_top_dirs(rels))
    for rel, local_path, remote, fp, size in sorted(files):
        label, split_hint = _layout(rels, split_layout, rel)
        yield SourceItem(
            uri=f"{prefix.rstrip('/')}/{rel}",
            local_path=local_path,
            label=label,
            split_hint=split_hint,
            junk=is_junk_name(rel.rsplit("/", 1)[-1]),
            fingerprint=fp,
            remote=remote,
            size=size,
        )


def _stat_fp(path: str) -> tuple[str, int]:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}", st.st_size


def iter_local_folder(root: Path, uri_prefix: Optional[str] = None) -> Iterator[SourceItem]:
    """Items of a class-folder tree. *uri_prefix* replaces the folder's path in URIs."""
    root = root.resolve()
    prefix = uri_prefix if uri_prefix is not None else root.as_posix()
    files = []
    for path, rel in _walk_files(root):
        try:
            fp, size = _stat_fp(path)
        except OSError:
            fp, size = "", 0
        files.append((rel, path, None, fp, size))
    yield from _items_from_tree(files, prefix)


# -- object stores ---------------------------------------------------------------------------


def gcs_filesystem(token: Optional[str] = None) -> Any:
    """A gcsfs filesystem; honours ``STORAGE_EMULATOR_HOST`` (tests, the benchmark)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs otherwise asks a gRPC API for the bucket type and stalls ~60 s per call
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import gcsfs
    except ImportError:  # pragma: no cover - the ingest category installs it
        raise ParamsError("ingest.source: gs:// needs the gcsfs package (pipenv install --categories ingest)") from None
    kwargs: dict[str, Any] = {}
    if token is not None:
        kwargs["token"] = token
    return gcsfs.GCSFileSystem(**kwargs)


def filesystem_for(url: str, opts: SourceOptions) -> Any:
    proto = storage.protocol(url)
    if proto in ("gs", "gcs"):
        return gcs_filesystem(opts.gcs_token)
    fs, _ = storage.get_fs(url)
    return fs


def _object_fp(info: dict[str, Any]) -> str:
    for key in ("generation", "etag", "ETag", "md5Hash", "Content-MD5"):
        if info.get(key):
            parts = [str(info.get(k, "")) for k in ("generation", "etag", "ETag", "md5Hash") if info.get(k)]
            return "|".join(parts) + f"|{info.get('size', '')}"
    if info.get("size") is not None and (info.get("mtime") or info.get("updated") or info.get("Last-Modified")):
        return f"{info.get('size')}:{info.get('mtime') or info.get('updated') or info.get('Last-Modified')}"
    return ""


def iter_gcs(source: str, opts: SourceOptions) -> Iterator[SourceItem]:
    fs = gcs_filesystem(opts.gcs_token)
    base = source[len("gs://") :].rstrip("/")
    try:
        listing = fs.find(base, detail=True)
    except FileNotFoundError:
        listing = {}
    except Exception as exc:  # credentials, network, permissions: one line, not a traceback
        raise StageError(f"ingest.source {source}: cannot list the bucket: {type(exc).__name__}: {exc}") from None
    files = []
    for path, info in listing.items():
        if info.get("type") == "directory" or path.endswith("/"):
            continue
        rel = path[len(base) :].lstrip("/") if path.startswith(base) else path
        if not rel or any(_skip_dir(p) for p in rel.split("/")[:-1]):
            continue
        files.append((rel, None, f"gs://{path}", _object_fp(info), int(info.get("size") or 0)))
    if not files:
        raise ParamsError(f"ingest.source: no objects under {source!r}")
    yield from _items_from_tree(files, f"gs://{base}")


# -- archives ---------------------------------------------------------------------------------


def _cache_root(opts: SourceOptions) -> Path:
    return Path(opts.cache_dir or os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe"))


def _reject(archive: str, why: str) -> StageError:
    return StageError(f"ingest.source {archive}: archive rejected: {why}; nothing was extracted")


def _check_member_name(archive: str, name: str) -> str:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise _reject(archive, f"member {name!r} has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _reject(archive, f"member {name!r} escapes the extraction folder (..)")
    return "/".join(parts)


def _check_link(archive: str, name: str, target: str, *, relative_to_member: bool) -> None:
    t = target.replace("\\", "/")
    if t.startswith("/") or (len(t) > 1 and t[1] == ":"):
        raise _reject(archive, f"link {name!r} points outside the archive (to {target!r})")
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, t))
    if resolved == ".." or resolved.startswith("../"):
        raise _reject(archive, f"link {name!r} points outside the archive (to {target!r})")


def _copy_limited(src: io.BufferedIOBase, dest: Path, budget: list[int], archive: str, limit: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            budget[0] += len(chunk)
            if budget[0] > limit:  # the headers lied about the sizes
                raise _reject(archive, f"unpacks to more than ingest.max_archive_bytes={limit}")
            out.write(chunk)


def safe_extract(archive_path: Path, dest: Path, archive: str, max_bytes: int) -> int:
    """Extract a zip or tar into *dest* (which must be empty), refusing anything unsafe.

    Every member is checked *before* anything is written: absolute paths, ``..``,
    symlinks and hard links pointing outside the archive, device files, and a total
    unpacked size above *max_bytes* reject the whole archive with a
    :class:`StageError`. Links that stay inside are not materialized (the file they
    point to is extracted anyway). Returns the number of bytes written.
    """
    budget = [0]
    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as zf:
            infos = zf.infolist()
            plan = []
            total = 0
            for info in infos:
                rel = _check_member_name(archive, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    target = zf.read(info).decode("utf-8", "replace")
                    _check_link(archive, rel, target, relative_to_member=True)
                    continue
                if info.is_dir() or not rel:
                    continue
                total += info.file_size
                plan.append((info, rel))
            if total > max_bytes:
                raise _reject(archive, f"unpacks to {total} bytes, above ingest.max_archive_bytes={max_bytes}")
            for info, rel in plan:
                with zf.open(info) as src:
                    _copy_limited(src, dest / rel, budget, archive, max_bytes)
        return budget[0]
    try:
        tf = tarfile.open(archive_path, "r:*")
    except tarfile.TarError:
        raise _reject(archive, "not a zip or tar archive") from None
    with tf:
        plan_t = []
        total = 0
        for m in tf.getmembers():
            rel = _check_member_name(archive, m.name)
            if m.issym():
                _check_link(archive, rel, m.linkname, relative_to_member=True)
                continue
            if m.islnk():
                _check_link(archive, rel, m.linkname, relative_to_member=False)
                continue
            if m.isdir() or not rel:
                continue
            if not m.isfile():
                raise _reject(archive, f"member {m.name!r} is a device or special file")
            total += m.size
            plan_t.append((m, rel))
        if total > max_bytes:
            raise _reject(archive, f"unpacks to {total} bytes, above ingest.max_archive_bytes={max_bytes}")
        for m, rel in plan_t:
            src = tf.extractfile(m)
            if src is None:
                continue
            with src:
                _copy_limited(src, dest / rel, budget, archive, max_bytes)
    return budget[0]


def fetch_archive(url: str, opts: SourceOptions, stats: Optional[dict[str, int]] = None) -> tuple[Path, str]:
    """Download and extract *url* once; return (extracted folder, archive fingerprint).

    The extraction is reused while the server reports the same ETag (or size and
    Last-Modified); a changed archive is downloaded and extracted again.
    """
    fs = filesystem_for(url, opts)
    try:
        info = fs.info(url)
    except Exception as exc:
        raise StageError(f"ingest.source {url}: cannot reach the archive: {type(exc).__name__}: {exc}") from None
    fp = _object_fp(info)
    slot = _cache_root(opts) / "archives" / hashlib.sha256(url.encode()).hexdigest()[:16]
    extracted, meta = slot / "extracted", slot / "meta.json"
    if fp and extracted.is_dir() and meta.exists():
        try:
            if json.loads(meta.read_text()).get("fingerprint") == fp:
                return extracted, fp
        except (OSError, ValueError):
            pass
    slot.mkdir(parents=True, exist_ok=True)
    for leftover in slot.iterdir():  # a killed earlier download
        if leftover.name.startswith(storage.TMP_MARKER):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    download = slot / f"{storage.TMP_MARKER}{name}"
    try:
        fs.get_file(url, str(download))
    except Exception as exc:
        download.unlink(missing_ok=True)
        raise StageError(f"ingest.source {url}: download failed: {type(exc).__name__}: {exc}") from None
    if stats is not None:
        stats["bytes"] = stats.get("bytes", 0) + download.stat().st_size
    try:
        if meta.exists():
            meta.unlink()
        with storage.staged_dir(extracted) as tmp:
            safe_extract(download, tmp, url, opts.max_archive_bytes)
    finally:
        download.unlink(missing_ok=True)
    storage.write_text(meta, json.dumps({"url": url, "fingerprint": fp}) + "\n")
    return extracted, fp


def _unwrap(root: Path) -> Path:
    """An archive often wraps its layout in one folder (``data/train/ants/x.jpg``): step into it."""
    while True:
        entries = [p for p in root.iterdir() if not _skip_dir(p.name)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLIT_NAMES:
            return root
        inner = entries[0]
        if not any(p.is_dir() and not _skip_dir(p.name) for p in inner.iterdir()):
            return root  # a single class folder, not a wrapper
        root = inner


def iter_archive(url: str, opts: SourceOptions, stats: Optional[dict[str, int]] = None) -> Iterator[SourceItem]:
    folder, fp = fetch_archive(url, opts, stats)
    root = _unwrap(folder)
    files = []
    for path, rel in _walk_files(root):
        size = os.stat(path).st_size
        files.append((rel, path, None, f"{fp}|{size}" if fp else "", size))
    yield from _items_from_tree(files, f"{url}!")


# -- manifests ----------------------------------------------------------------------------------


def _read_manifest_rows(source: str) -> list[dict[str, str]]:
    try:
        fs, path = storage.get_fs(source)
        text = fs.cat_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise ParamsError(f"ingest.source: manifest not found: {source!r}") from None
    except Exception as exc:
        raise StageError(f"ingest.source {source}: cannot read the manifest: {type(exc).__name__}: {exc}") from None
    rows: list[dict[str, str]] = []
    if source.lower().endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise StageError(f"ingest.source {source}: line {n} is not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise StageError(f"ingest.source {source}: line {n} must be an object with uri and label")
            rows.append({k: ("" if v is None else str(v)) for k, v in obj.items()})
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [dict(r) for r in reader]
        if reader.fieldnames is None or "uri" not in reader.fieldnames:
            raise StageError(f"ingest.source {source}: a CSV manifest needs a header row with uri,label columns")
    for n, row in enumerate(rows, 1):
        if not (row.get("uri") or "").strip():
            raise StageError(f"ingest.source {source}: row {n} has no uri")
    return rows


def iter_manifest(source: str, opts: SourceOptions) -> Iterator[SourceItem]:
    rows = _read_manifest_rows(source)
    if storage.is_remote(source):
        base = source.rsplit("/", 1)[0]
    else:
        base = str(Path(source).resolve().parent)
    items: list[tuple[int, str, Optional[str], Optional[str], Optional[str]]] = []
    for n, row in enumerate(rows):
        uri = row["uri"].strip()
        label = (row.get("label") or "").strip() or None
        split = (row.get("split") or "").strip().lower()
        split_hint = SPLIT_NAMES.get(split) if split else None
        if "://" not in uri:
            p = Path(uri).expanduser()
            if not p.is_absolute() and not storage.is_remote(base):
                p = Path(base) / p
            uri = p.resolve().as_posix() if not storage.is_remote(base) else f"{base}/{uri}"
        items.append((n, uri, label, split_hint, None))

    def describe(entry):
        n, uri, label, split_hint, _ = entry
        name = uri.rsplit("/", 1)[-1]
        if storage.is_remote(uri):
            try:
                fs = filesystem_for(uri, opts)
                info = fs.info(uri)
                fp, size = _object_fp(info), int(info.get("size") or 0)
            except Exception:
                fp, size = "", 0  # fetched (and quarantined if unreadable) by the stage
            return SourceItem(uri, None, label, split_hint, is_junk_name(name), fp, uri, size)
        try:
            fp, size = _stat_fp(uri)
        except OSError:
            fp, size = "", 0
        return SourceItem(uri, uri, label, split_hint, is_junk_name(name), fp, None, size)

    with ThreadPoolExecutor(max_workers=16) as pool:  # metadata requests are round trips: overlap them
        yield from pool.map(describe, items)


# -- dispatch -------------------------------------------------------------------------------------


def source_kind(source: str) -> str:
    low = source.lower().split("?", 1)[0]
    if source.startswith("sample://"):
        return "sample"
    if low.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    proto = storage.protocol(source)
    if proto in ("http", "https"):
        if low.endswith(ARCHIVE_SUFFIXES):
            return "archive"
        raise ParamsError(
            f"ingest.source: an http(s) source must be a .zip/.tar/.tar.gz/.tgz archive or a .csv/.jsonl manifest: {source!r}"
        )
    if proto in ("gs", "gcs"):
        return "gcs"
    if proto == "file":
        return "local"
    raise ParamsError(f"ingest.source: unsupported source scheme {proto!r} in {source!r}")


def iter_source(
    source: str, opts: Optional[SourceOptions] = None, stats: Optional[dict[str, int]] = None
) -> Iterator[SourceItem]:
    opts = opts or SourceOptions()
    kind = source_kind(source)
    if kind == "sample":
        from cvpipe.data import sample

        name = source[len("sample://") :].strip("/")
        root = sample.materialize(name)
        yield from iter_local_folder(root, uri_prefix=f"sample://{name}")
        return
    if kind == "manifest":
        yield from iter_manifest(source, opts)
        return
    if kind == "archive":
        yield from iter_archive(source, opts, stats)
        return
    if kind == "gcs":
        yield from iter_gcs(source.replace("gcs://", "gs://", 1), opts)
        return
    path = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
    if not path.exists():
        raise ParamsError(f"ingest.source: folder not found: {source!r}")
    if not path.is_dir():
        raise ParamsError(f"ingest.source: {source!r} is not a folder of class subfolders")
    yield from iter_local_folder(path)


def list_sources(
    sources: list[str], opts: Optional[SourceOptions] = None, stats: Optional[dict[str, int]] = None
) -> list[SourceItem]:
    """Every item of every source, sorted by URI; a file named by two sources counts once."""
    items: list[SourceItem] = []
    seen: set[str] = set()
    for src in sources:
        for it in iter_source(src, opts, stats):
            if it.uri not in seen:
                seen.add(it.uri)
                items.append(it)
    return sorted(items, key=lambda it: it.uri)


def check_source(source: str) -> None:
    """Fail early (exit 2, nothing written) on a source that cannot be read at all."""
    if source.startswith("sample://"):
        from cvpipe.data import sample

        name = source[len("sample://") :].strip("/")
        if name not in sample.SAMPLES:
            raise ParamsError(f"ingest.source: unknown sample {name!r} (available: {', '.join(sample.SAMPLES)})")
        return
    kind = source_kind(source)
    if kind == "local":
        path = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
        if not path.exists():
            raise ParamsError(f"ingest.source: folder not found: {source!r}")
        if not path.is_dir():
            raise ParamsError(f"ingest.source: {source!r} is not a folder of class subfolders")


def fetch_many(fs: Any, urls: list[str], concurrency: int) -> list[Any]:
    """Bytes of each URL (or the exception), fetched *concurrency* at a time, in order."""
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import _run_coros_in_chunks, sync

        coros = [fs._cat_file(fs._strip_protocol(u)) for u in urls]
        return sync(fs.loop, _run_coros_in_chunks, coros, batch_size=concurrency, return_exceptions=True)

    def one(u: str) -> Any:
        try:
            return fs.cat_file(fs._strip_protocol(u))
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, urls))
