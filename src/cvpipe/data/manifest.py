"""The manifest: the file format ingest writes and preprocess (and the audit) read.

``<raw>/manifest.csv`` has one row per stored image, with the columns in :data:`MANIFEST_COLUMNS`
(``path`` is relative to the raw folder); ``<raw>/quarantine.csv`` has one row per rejected file,
with :data:`QUARANTINE_COLUMNS`. Both are plain CSV (``csv`` module, ``\\n`` line ends), written
whole and atomically by :func:`cvpipe.core.storage.write_csv`, so a reader never sees half a file.
"""

from __future__ import annotations

import csv

from cvpipe.core import storage
from cvpipe.core.errors import StageError

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


def read_manifest(raw_dir: str) -> list[dict[str, str]]:
    """The rows of ``<raw_dir>/manifest.csv`` as dicts of strings."""
    path = storage.join(raw_dir, "manifest.csv")
    if not storage.exists(path):
        raise StageError(f"no manifest at {path}: run `cvpipe ingest` first")
    fs, p = storage.get_fs(path)
    with fs.open(p, "r", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
