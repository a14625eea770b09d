"""Paths that may be local or remote (``gs://``, ``http(s)://``), through fsspec.

Every stage reads and writes through these helpers so that any path in
params.yaml can point at a bucket (tables through :func:`write_csv`, figures through
:func:`save_png`). Writes are atomic: a reader never sees a
half-written file under its final name (local files are written to a temporary
sibling and renamed; object stores only publish an object when its upload
completes).
"""

from __future__ import annotations

import contextlib
import csv
import filecmp
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import fsspec

PathLike = Union[str, os.PathLike]

TMP_MARKER = ".cvpipe-tmp-"


def is_remote(uri: PathLike) -> bool:
    s = str(uri)
    return "://" in s and not s.startswith("file://")


def protocol(uri: PathLike) -> str:
    s = str(uri)
    return s.split("://", 1)[0] if "://" in s else "file"


def get_fs(uri: PathLike, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path-within-it)`` for a URI or local path."""
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options)
    return fs, path


def join(base: PathLike, *parts: str) -> str:
    s = str(base)
    if is_remote(s):
        return "/".join([s.rstrip("/")] + [p.strip("/") for p in parts])
    return str(Path(s, *parts))


def exists(uri: PathLike) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{path.name}")


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """A temp sibling of *target* to fill; it replaces *target* (rename) on success and is removed on failure.

    The parent folder is created only when missing (ingest stores thousands of files, and a
    ``mkdir`` plus a ``stat`` per file were a tenth of its per-file bookkeeping).
    """
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(uri: PathLike, mode: str = "wb", durable: bool = True, **kwargs: Any) -> Iterator[IO]:
    """Open *uri* for writing so that it appears complete or not at all.

    The temp-file-and-rename makes the write atomic against a killed process.
    ``durable`` also fsyncs before the rename, so the content survives an OS crash
    or power loss; bulk writes whose loss a rerun detects (content-addressed
    images, checked against the manifest's hash) can skip that cost.
    """
    if "w" not in mode:
        raise ValueError("atomic_open is for writing")
    if is_remote(uri):
        fs, path = get_fs(uri)
        with fs.open(path, mode, **kwargs) as fh:
            yield fh
        return
    with _replacing(Path(uri)) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes(uri: PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_open(uri, "wb", durable=durable) as fh:
        fh.write(data)


def write_text(uri: PathLike, text: str, durable: bool = True, only_if_changed: bool = False) -> None:
    """Write *text* atomically; ``only_if_changed`` leaves a local file that already holds it untouched
    (no write, no fsync, the same mtime: a rerun that changes nothing changes no file)."""
    if only_if_changed and not is_remote(uri):
        try:
            with open(uri, encoding="utf-8", newline="") as fh:
                if fh.read() == text:
                    return
        except (OSError, UnicodeDecodeError):
            pass
    with atomic_open(uri, "w", durable=durable, encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_json(uri: PathLike, obj: Any, indent: int = 2) -> None:
    write_text(uri, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def write_csv(
    uri: PathLike,
    columns: Sequence[str],
    rows: Iterable[Union[Mapping[str, Any], Sequence[Any]]],
    only_if_changed: bool = False,
    durable: bool = True,
) -> None:
    """Write a CSV file atomically: a header of *columns*, then one line per row.

    The one CSV writer of every stage: ``csv`` module defaults (minimal quoting, ``None`` as an
    empty field, numbers through ``str``) with ``\n`` line ends. A row is a mapping (its values
    under *columns*; a missing key is an empty field, other keys are ignored) or a sequence written
    as it is. ``only_if_changed`` and ``durable`` are :func:`write_text`'s.

    A local file is streamed into its temp sibling, row by row, so a million-row manifest never
    sits in memory as text (built in a buffer it was three copies of the file at the write's peak:
    the buffer, its value and the old file read back to compare). A row that raises removes the temp
    file and leaves the target untouched; ``only_if_changed`` compares the finished temp file with the
    target in chunks (:func:`filecmp.cmp`) and drops it when they are equal. A remote object is
    built in memory first: fsspec publishes an upload when its file closes, even on an exception.
    """
    if is_remote(uri):
        buf = io.StringIO()
        _write_rows(buf, columns, rows)
        write_text(uri, buf.getvalue(), durable=durable, only_if_changed=only_if_changed)
        return
    target = Path(uri)
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            _write_rows(fh, columns, rows)
        if only_if_changed and _same_bytes(tmp, target):
            os.unlink(tmp)
            return
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_rows(fh: IO[str], columns: Sequence[str], rows: Iterable[Union[Mapping[str, Any], Sequence[Any]]]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row)


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two local files hold the same bytes (sizes first, then chunk by chunk); False if *b* is unreadable."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False
    finally:
        filecmp.clear_cache()


def png_bytes(fig: Any, **savefig_kwargs: Any) -> bytes:
    """A matplotlib figure as PNG bytes (rendered in memory); the figure is closed.

    matplotlib is the caller's import (this module never imports it): a figure made through
    ``pyplot`` is released from it here.
    """
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig_kwargs)
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)
    return buf.getvalue()


def save_png(fig: Any, uri: PathLike, dpi: Optional[float] = None, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure as a PNG at *uri*, atomically (see :func:`png_bytes`); the figure is closed.

    ``dpi`` (and any other ``savefig`` keyword) goes to ``savefig``; ``None`` leaves matplotlib's default.
    """
    if dpi is not None:
        savefig_kwargs["dpi"] = dpi
    write_bytes(uri, png_bytes(fig, **savefig_kwargs))


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Atomically make *dst* a copy of *src*: a hard link when both are local on one filesystem
    (no bytes written; safe because every writer here replaces files by rename, never in place),
    else a durable byte copy, or the object store's server-side copy."""
    if is_remote(src) or is_remote(dst):
        if protocol(src) == protocol(dst):
            fs, s_path = get_fs(src)
            fs.copy(s_path, get_fs(dst)[1])
        else:
            write_bytes(dst, read_bytes(src))
        return
    try:
        with _replacing(Path(dst)) as tmp:
            os.link(src, tmp)
    except OSError:  # another filesystem, or one without hard links
        with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def remove(uri: PathLike) -> None:
    """Delete a file, local or remote; a missing one is not an error."""
    fs, path = get_fs(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def read_json(uri: PathLike) -> Any:
    fs, path = get_fs(uri)
    with fs.open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def read_bytes(uri: PathLike) -> bytes:
    fs, path = get_fs(uri)
    return fs.cat_file(path)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def staged_dir(final: PathLike) -> Iterator[Path]:
    """Build a directory output in a temporary sibling and swap it in on success.

    For a remote *final*, the directory is built locally and uploaded at the end.
    On failure nothing at *final* changes.
    """
    if is_remote(final):
        with tempfile.TemporaryDirectory(prefix="cvpipe-") as tmp:
            yield Path(tmp)
            fs, path = get_fs(final)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(str(tmp).rstrip("/") + "/", path, recursive=True)
        return
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = _tmp_sibling(target)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def local_copy(uri: PathLike, cache_root: PathLike | None = None) -> Path:
    """Return a local path for *uri*, copying a remote file or folder down once."""
    if not is_remote(uri):
        return Path(uri)
    import hashlib

    root = Path(cache_root or os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe"))
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    dest = root / "remote" / key
    if dest.exists():
        return dest
    fs, path = get_fs(uri)
    with staged_dir(dest) as tmp:
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        else:
            fs.get(path, str(tmp / Path(path).name))
    return dest
