"""Where raw images come from: each source kind lists :class:`SourceItem` records.

A source is a URI in ``ingest.source``. Supported now:

* ``sample://digits`` -- the built-in sample (see :mod:`cvpipe.sample`);
* a local folder in class-subfolder layout (``root/<class>/*``), or split layout
  (``root/<train|val|test>/<class>/*``), whose split is kept as a hint for preprocess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cvpipe.errors import ParamsError

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


@dataclass(frozen=True)
class SourceItem:
    uri: str  # stable identity of the file in its source (recorded in the manifest)
    local_path: Optional[str]  # where to read the bytes from, when local
    label: Optional[str]  # None: no class folder -> quarantined
    split_hint: Optional[str] = None
    junk: bool = False


def is_junk_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_FILES


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden and OS-metadata folders (.git, __MACOSX) are not data
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in JUNK_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath, name)


def _is_split_layout(root: Path) -> bool:
    subdirs = [p.name.lower() for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subdirs) and all(d in SPLIT_NAMES for d in subdirs)


def iter_local_folder(root: Path, uri_prefix: Optional[str] = None) -> Iterator[SourceItem]:
    """Items of a class-folder tree. *uri_prefix* replaces the folder's path in URIs."""
    root = root.resolve()
    prefix = uri_prefix if uri_prefix is not None else root.as_posix()
    split_layout = _is_split_layout(root)
    for path in _walk_files(root):
        rel = path.relative_to(root).parts
        split_hint = None
        if split_layout and len(rel) > 1:
            split_hint, rel = SPLIT_NAMES[rel[0].lower()], rel[1:]
        elif split_layout:  # a loose file next to train/ val/ (README, checksums): no class
            rel = ()
        label = rel[0] if len(rel) > 1 else None
        uri = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}"
        yield SourceItem(
            uri=uri, local_path=str(path), label=label, split_hint=split_hint, junk=is_junk_name(path.name)
        )


def iter_source(source: str) -> Iterator[SourceItem]:
    if source.startswith("sample://"):
        from cvpipe import sample

        name = source[len("sample://") :].strip("/")
        root = sample.materialize(name)
        yield from iter_local_folder(root, uri_prefix=f"sample://{name}")
        return
    if "://" in source and not source.startswith("file://"):
        scheme = source.split("://", 1)[0]
        raise ParamsError(f"ingest.source: unsupported source scheme {scheme!r} in {source!r}")
    path = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
    if not path.exists():
        raise ParamsError(f"ingest.source: folder not found: {source!r}")
    if not path.is_dir():
        raise ParamsError(f"ingest.source: {source!r} is not a folder of class subfolders")
    yield from iter_local_folder(path)


def check_source(source: str) -> None:
    """Fail early (exit 2, nothing written) on a source that cannot be read at all."""
    if source.startswith("sample://"):
        from cvpipe import sample

        name = source[len("sample://") :].strip("/")
        if name not in sample.SAMPLES:
            raise ParamsError(f"ingest.source: unknown sample {name!r} (available: {', '.join(sample.SAMPLES)})")
        return
    next(iter(iter_source(source)), None)
