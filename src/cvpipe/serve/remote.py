"""Remote models (``gs://``, ``http(s)://``, any fsspec URL): fetched again whenever the object changed.

:func:`fetch_model` keys the local copy by the remote object's *version*, read with fsspec's
``info()`` (one listing for a folder): GCS ``generation``, an ``ETag``/``md5Hash``/``crc32c``,
``Last-Modified``/``mtime``, with the size. Same version -> the cached copy; a re-uploaded
model -> a new key, so it is fetched again (issue #15: the old cache was keyed by the URL
alone and served a stale model for good). An object whose listing carries nothing but a size
is fetched on every start: nothing would tell a change. The last two versions of each URL
are kept; older ones are removed.

Credentials in a model URL (``http://user:pass@host/m.pt?token=...``) are used for the fetch
only: :func:`cvpipe.core.urls.redact_url` gives the form that is shown (``/model``, the API docs, the start-up
line, error messages) and the cache's folder and file names never contain them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from cvpipe.core import storage
from cvpipe.core.urls import redact_url

# what identifies one version of an object, in the listings of gcsfs, s3fs, adlfs, fsspec's http and local
VERSION_FIELDS = ("generation", "etag", "ETag", "md5Hash", "crc32c", "Content-MD5", "Digest", "Last-Modified",
                  "LastModified", "last_modified", "mtime", "updated", "version_id", "VersionId")
KEEP_VERSIONS = 2

def _cache_root() -> Path:
    return Path(os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe")) / "models"


def _local_name(remote_path: str) -> str:
    """The file name of a remote path, without a query string (an http URL's path is the whole URL)."""
    path = urlsplit(remote_path).path if "://" in remote_path else remote_path
    return PurePosixPath(path).name or "model.pt"


def _listing(fs, path: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``("file" | "directory", {name relative to the model: info})`` from one ``info`` (+ ``find`` for a folder)."""
    fs.invalidate_cache()
    info = fs.info(path)
    if info.get("type") != "directory":
        return "file", {_local_name(path): info}
    base = str(info.get("name", path)).rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return "directory", {name[len(base):] if name.startswith(base) else _local_name(name): i
                         for name, i in found.items() if i.get("type") != "directory"}


def version_of(entries: dict[str, dict[str, Any]]) -> tuple[str, bool]:
    """``(digest of every entry's version fields and size, whether any field beyond the size was there)``."""
    rows, versioned = [], bool(entries)
    for name in sorted(entries):
        info = entries[name]
        fields = {k: str(info[k]) for k in VERSION_FIELDS if info.get(k) not in (None, "")}
        versioned = versioned and bool(fields)
        rows.append([name, info.get("size"), fields])
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16], versioned


def fetch_model(uri: str) -> Path:
    """A local copy of the remote file or folder *uri*, fetched unless this very version is cached."""
    fs, path = storage.get_fs(uri)
    kind, entries = _listing(fs, path)
    version, versioned = version_of(entries)
    home = _cache_root() / hashlib.sha256(redact_url(uri).encode()).hexdigest()[:16]
    dest = home / version
    done = dest / ".complete"
    if not (versioned and done.is_file()):
        with storage.staged_dir(dest) as tmp:
            for rel, info in entries.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                # get_file: one object, no glob expansion (a "?" in an http URL is a query, not a wildcard)
                fs.get_file(info.get("name", path) if kind == "directory" else path, str(target))
            (tmp / ".complete").write_text(json.dumps({"source": redact_url(uri), "version": version}))
    _prune(home, keep=dest)
    return dest if kind == "directory" else dest / next(iter(entries))


def _prune(home: Path, keep: Path) -> None:
    """Remove all but the newest KEEP_VERSIONS versions of one URL (*keep* always stays)."""
    try:
        versions = sorted((p for p in home.iterdir() if p.is_dir() and p != keep and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in versions[KEEP_VERSIONS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
