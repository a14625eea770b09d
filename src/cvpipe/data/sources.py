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

No listed path is dropped silently: symlinked folders are followed (a link back to
one of its own ancestors is a ``symlink_loop``), and a folder that cannot be read,
a file that is not a regular file (FIFO, socket, device) or a broken link becomes an
item with :attr:`SourceItem.rejected` set, which the stage quarantines unread. A URI
listed twice under different labels is :data:`CONFLICTING_LABELS`, every copy.

Credentials in URLs (user:password@, ``token=``/``X-Amz-Signature=``... query
parameters) never leave memory: every :attr:`SourceItem.uri`, stored file and
message carries :func:`redact_url`'s form; only :attr:`SourceItem.remote`, used to
fetch, holds the full URL. params.yaml names them as ``${NAME}`` environment
variables (:func:`resolve_sources` expands them; ``cvpipe init`` writes them so).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from cvpipe.core import storage
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.core.urls import expand_env_refs, redact_text, redact_url

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

# Reasons of the items rejected while listing (quarantined unread; never journaled: listing them is free).
UNREADABLE = "unreadable"  # a broken link (also the stage's code for read and fetch failures)
UNREADABLE_FOLDER = "unreadable_folder"
NOT_REGULAR = "not_a_regular_file"
SYMLINK_LOOP = "symlink_loop"
CONFLICTING_LABELS = "conflicting_labels"


@dataclass(frozen=True, slots=True)  # one per listed file: no per-object __dict__
class SourceItem:
    uri: str  # stable identity of the file in its source (recorded in the manifest)
    local_path: Optional[str]  # where to read the bytes from, when local
    label: Optional[str]  # None: no class folder -> quarantined
    split_hint: Optional[str] = None
    junk: bool = False
    fingerprint: str = ""  # etag / generation / size+mtime; "" = unknown, always reprocessed
    remote: Optional[str] = None  # fsspec URL to fetch the bytes from, when not local (may hold credentials: memory only)
    size: int = 0
    rejected: Optional[tuple[str, str]] = None  # (reason, detail) found while listing: quarantined, never read


@dataclass(frozen=True)
class SourceOptions:
    gcs_token: Optional[str] = None  # None: gcsfs default chain (GOOGLE_APPLICATION_CREDENTIALS, ADC, metadata)
    max_archive_bytes: int = 2 * 1024**3
    cache_dir: Optional[str] = None


def is_junk_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_FILES


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_DIRS


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _os_error(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _special_kind(mode: int) -> str:
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


Walked = tuple[str, str, Any]  # (path, posix path relative to root, os.stat_result or (reason, detail))


def _walk_files(root: Path) -> Iterator[Walked]:
    """Every file under *root*: ``(path, posix path relative to root, stat result)``, hidden folders skipped.

    Nothing is skipped silently: a symlinked folder is followed (one that links back to a folder it
    is inside of yields ``(path, "rel/", (SYMLINK_LOOP, detail))`` instead of recursing), a folder
    that cannot be read yields ``(path, "rel/", (UNREADABLE_FOLDER, detail))``, a file that is not
    a regular file (a FIFO would block the reader forever) ``(NOT_REGULAR, detail)`` and a broken
    link ``(UNREADABLE, detail)``: where a stat result is expected, a ``(reason, detail)`` pair.
    Folder entries end in ``/``. Plain strings and ``os.scandir``, not Path objects: a listing of
    100k files should cost the stat calls, not pathlib. Unsorted (the callers sort).
    """
    top = str(root)
    try:
        st = os.stat(top)
        with os.scandir(top) as it:
            entries = list(it)
    except OSError as exc:
        raise StageError(f"ingest.source: cannot read the folder {top}: {_os_error(exc)}") from None
    # (folder path, its relative path with a trailing "/" or "", (dev, inode) of it and its ancestors, entries)
    stack: list[tuple[str, str, frozenset[tuple[int, int]], Optional[list[os.DirEntry]]]] = [
        (top, "", frozenset({(st.st_dev, st.st_ino)}), entries)
    ]
    while stack:
        path, base, ancestors, listed = stack.pop()
        if listed is None:
            try:
                with os.scandir(path) as it:
                    listed = list(it)
            except OSError as exc:
                yield path, base, (UNREADABLE_FOLDER, f"cannot list the folder: {_os_error(exc)}")
                continue
        for e in listed:
            rel = base + e.name
            try:
                est = e.stat()  # follows links
            except OSError as exc:
                if e.is_symlink():
                    target = _readlink(e.path)
                    yield e.path, rel, (UNREADABLE, f"broken symbolic link (to {target!r}): {_os_error(exc)}")
                else:
                    yield e.path, rel, (UNREADABLE, _os_error(exc))
                continue
            if stat.S_ISDIR(est.st_mode):
                if _skip_dir(e.name):  # hidden and OS-metadata folders (.git, __MACOSX) are not data
                    continue
                key = (est.st_dev, est.st_ino)
                if key in ancestors:
                    yield e.path, rel + "/", (SYMLINK_LOOP, f"links back to a folder it is inside of ({_readlink(e.path)!r})")
                    continue
                stack.append((e.path, rel + "/", ancestors | {key}, None))
            elif stat.S_ISREG(est.st_mode):
                yield e.path, rel, est
            else:
                yield e.path, rel, (NOT_REGULAR, f"{_special_kind(est.st_mode)}, not a regular file")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


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


Row = tuple[str, Optional[str], Optional[str], str, int, Optional[tuple[str, str]]]


def _items_from_tree(files: list[Row], prefix: str) -> Iterator[SourceItem]:
    """Items of a tree given ``(relpath, local_path, remote, fingerprint, size, rejected)`` rows."""
    rels = [f[0] for f in files]
    split_layout = _is_split_layout(_top_dirs(rels))
    for rel, local_path, remote, fp, size, rejected in sorted(files, key=lambda f: f[0]):
        label, split_hint = _layout(rels, split_layout, rel)
        yield SourceItem(
            uri=f"{prefix.rstrip('/')}/{rel}",
            local_path=None if rejected else local_path,
            label=label,
            split_hint=split_hint,
            junk=is_junk_name(rel.rsplit("/", 1)[-1]),
            fingerprint=fp,
            remote=remote,
            size=size,
            rejected=rejected,
        )


def _tree_rows(root: Path, fingerprint: Any = None) -> list[Row]:
    """The rows of :func:`_items_from_tree` for a local tree; ``fingerprint(stat) -> str`` (default size:mtime)."""
    rows: list[Row] = []
    for path, rel, st in _walk_files(root):
        if isinstance(st, os.stat_result):
            fp = fingerprint(st) if fingerprint else f"{st.st_size}:{st.st_mtime_ns}"
            rows.append((rel, path, None, fp, st.st_size, None))
        else:  # (reason, detail)
            rows.append((rel, path, None, "", 0, st))
    return rows


def iter_local_folder(root: Path, uri_prefix: Optional[str] = None) -> Iterator[SourceItem]:
    """Items of a class-folder tree. *uri_prefix* replaces the folder's path in URIs."""
    root = root.resolve()
    prefix = uri_prefix if uri_prefix is not None else root.as_posix()
    yield from _items_from_tree(_tree_rows(root), prefix)


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
        raise StageError(
            f"ingest.source {redact_url(source)}: cannot list the bucket: {type(exc).__name__}: {redact_text(str(exc), [source])}"
        ) from None
    files: list[Row] = []
    for path, info in listing.items():
        if info.get("type") == "directory" or path.endswith("/"):
            continue
        rel = path[len(base) :].lstrip("/") if path.startswith(base) else path
        if not rel or any(_skip_dir(p) for p in rel.split("/")[:-1]):
            continue
        files.append((rel, None, f"gs://{path}", _object_fp(info), int(info.get("size") or 0), None))
    if not files:
        raise ParamsError(f"ingest.source: no objects under {redact_url(source)!r}")
    yield from _items_from_tree(files, f"gs://{base}")


# -- archives ---------------------------------------------------------------------------------


def _cache_root(opts: SourceOptions) -> Path:
    return Path(opts.cache_dir or os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe"))


def _reject(archive: str, why: str) -> StageError:
    return StageError(f"ingest.source {redact_url(archive)}: archive rejected: {why}; nothing was extracted")


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
    shown = redact_url(url)  # what is stored (the cache metadata) and printed; *url* itself stays in memory
    fs = filesystem_for(url, opts)
    try:
        info = fs.info(url)
    except Exception as exc:
        raise StageError(f"ingest.source {shown}: cannot reach the archive: {type(exc).__name__}: {redact_text(str(exc), [url])}") from None
    fp = _object_fp(info)
    slot = _cache_root(opts) / "archives" / hashlib.sha256(shown.encode()).hexdigest()[:16]
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
    name = shown.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
    download = slot / f"{storage.TMP_MARKER}{name}"
    try:
        fs.get_file(url, str(download))
    except Exception as exc:
        download.unlink(missing_ok=True)
        raise StageError(f"ingest.source {shown}: download failed: {type(exc).__name__}: {redact_text(str(exc), [url])}") from None
    if stats is not None:
        stats["bytes"] = stats.get("bytes", 0) + download.stat().st_size
    try:
        if meta.exists():
            meta.unlink()
        with storage.staged_dir(extracted) as tmp:
            safe_extract(download, tmp, url, opts.max_archive_bytes)
    finally:
        download.unlink(missing_ok=True)
    storage.write_text(meta, json.dumps({"url": shown, "fingerprint": fp}) + "\n")
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
    rows = _tree_rows(root, lambda st: f"{fp}|{st.st_size}" if fp else "")
    yield from _items_from_tree(rows, f"{redact_url(url)}!")


# -- manifests ----------------------------------------------------------------------------------


def _jsonl_field(shown: str, n: int, key: str, value: Any) -> str:
    """A JSONL row's ``uri``/``label``/``split`` as text: a string (or an integer label); anything else
    (a list, an object, a bool, a float) is refused with the line number rather than turned into a name."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if key == "label" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = {list: "a list", dict: "an object", bool: "a boolean", float: "a number"}.get(type(value), type(value).__name__)
    raise ParamsError(f"ingest.source {shown}: line {n}: {key!r} must be a string, not {kind} ({json.dumps(value)[:80]})")


def _read_manifest_rows(source: str) -> list[dict[str, str]]:
    shown = redact_url(source)
    try:
        fs, path = storage.get_fs(source)
        text = fs.cat_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise ParamsError(f"ingest.source: manifest not found: {shown!r}") from None
    except Exception as exc:
        raise StageError(f"ingest.source {shown}: cannot read the manifest: {type(exc).__name__}: {redact_text(str(exc), [source])}") from None
    rows: list[dict[str, str]] = []
    if source.lower().split("?", 1)[0].endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise StageError(f"ingest.source {shown}: line {n} is not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise StageError(f"ingest.source {shown}: line {n} must be an object with uri and label")
            known = {k: _jsonl_field(shown, n, k, obj.get(k)) for k in ("uri", "label", "split")}
            rows.append({**{k: ("" if v is None else str(v)) for k, v in obj.items()}, **known})
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [dict(r) for r in reader]
        if reader.fieldnames is None or "uri" not in reader.fieldnames:
            raise StageError(f"ingest.source {shown}: a CSV manifest needs a header row with uri,label columns")
    for n, row in enumerate(rows, 1):
        if not (row.get("uri") or "").strip():
            raise StageError(f"ingest.source {shown}: row {n} has no uri")
    return rows


def iter_manifest(source: str, opts: SourceOptions) -> Iterator[SourceItem]:
    rows = _read_manifest_rows(source)
    if storage.is_remote(source):
        base = source.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[0]  # a relative row does not inherit the query
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
        name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
        if storage.is_remote(uri):
            try:
                fs = filesystem_for(uri, opts)
                info = fs.info(uri)
                fp, size = _object_fp(info), int(info.get("size") or 0)
            except Exception:
                fp, size = "", 0  # fetched (and quarantined if unreadable) by the stage
            # the URI stored and shown is redacted; the full one (credentials) is only used to fetch
            return SourceItem(redact_url(uri), None, label, split_hint, is_junk_name(name), fp, uri, size)
        try:
            st = os.stat(uri)
        except OSError:
            # read (and quarantined as unreadable, with the reason) by the stage
            return SourceItem(uri, uri, label, split_hint, is_junk_name(name), "", None, 0)
        if not stat.S_ISREG(st.st_mode):
            rejected = (NOT_REGULAR, f"{_special_kind(st.st_mode)}, not a regular file")
            return SourceItem(uri, None, label, split_hint, is_junk_name(name), "", None, 0, rejected)
        return SourceItem(uri, uri, label, split_hint, is_junk_name(name), f"{st.st_size}:{st.st_mtime_ns}", None, st.st_size)

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
            "ingest.source: an http(s) source must be a .zip/.tar/.tar.gz/.tgz archive or a .csv/.jsonl manifest: "
            f"{redact_url(source)!r}"
        )
    if proto in ("gs", "gcs"):
        return "gcs"
    if proto == "file":
        return "local"
    raise ParamsError(f"ingest.source: unsupported source scheme {proto!r} in {redact_url(source)!r}")


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
    """Every item of every source, sorted by URI; a file named twice (by two sources, or two manifest
    rows) under the same label counts once (the first naming, with its split hint).

    A URI named under different labels is never settled by order: every naming of it
    comes back, each rejected as :data:`CONFLICTING_LABELS` (so the same URI can appear more than
    once, only ever with ``rejected`` set). Two different URLs that are the same once redacted
    (they differ only in a credential) are rejected alike, as ``ambiguous_uri``.
    """
    by_uri: dict[str, list[SourceItem]] = {}
    for src in sources:
        for it in iter_source(src, opts, stats):
            group = by_uri.setdefault(it.uri, [])
            if not any((g.label, g.remote) == (it.label, it.remote) for g in group):
                group.append(it)
    items: list[SourceItem] = []
    for uri, group in by_uri.items():
        if len(group) == 1:
            items.append(group[0])
            continue
        group.sort(key=lambda it: (it.label or "", it.remote or ""))
        if len({it.remote for it in group}) > 1:
            why = ("ambiguous_uri", f"{len(group)} different URLs are {uri!r} once their credentials are removed")
        else:
            why = (CONFLICTING_LABELS, f"listed {len(group)} times with different labels: {[it.label or '' for it in group]}")
        items += [replace(it, rejected=why, local_path=None, remote=None) for it in group]
    return sorted(items, key=lambda it: it.uri)


def source_location(source: str) -> Optional[tuple[str, str]]:
    """Where *source* lives, to compare with an output: ``("file", real path)`` for a local folder or
    manifest (symlinks resolved), ``("gs", "bucket/prefix")`` for a bucket or a manifest in one, None
    for what is only ever read into the cache (archives, http manifests, samples)."""
    if source.startswith("sample://"):
        return None
    proto = storage.protocol(source)
    if proto == "file":
        local = source[len("file://") :] if source.startswith("file://") else source
        return "file", os.path.realpath(os.path.expanduser(local))
    if proto in ("gs", "gcs"):
        return "gs", source.split("://", 1)[1].split("?", 1)[0].strip("/")
    return None


def overlaps(a: Optional[tuple[str, str]], b: Optional[tuple[str, str]]) -> bool:
    """Whether one location (:func:`source_location`) contains the other, or both are the same."""
    if a is None or b is None or a[0] != b[0]:
        return False
    sep = os.sep if a[0] == "file" else "/"

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent.rstrip(sep) + sep)

    return inside(a[1], b[1]) or inside(b[1], a[1])


def resolve_sources(sources: list[str]) -> list[str]:
    """*sources* (``ingest.source``) with their ``${NAME}`` environment variables expanded, in memory only;
    an unset one is a :class:`ParamsError` that names it (exit 2, nothing read or written)."""
    out = []
    for src in sources:
        try:
            out.append(expand_env_refs(src))
        except KeyError as exc:
            raise ParamsError(
                f"ingest.source: {redact_url(src)} names the environment variable {exc.args[0]}, which is not set "
                f"(export it before the stage runs; ./docker-shell.sh passes every CVPIPE_SOURCE_* variable on)"
            ) from None
    return out


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
