"""The manifest: the file format ingest writes and preprocess (and the audit) read.

``<raw>/manifest.csv`` has one row per stored image, with the columns in :data:`MANIFEST_COLUMNS`
(``path`` is relative to the raw folder); ``<raw>/quarantine.csv`` has one row per rejected file,
with :data:`QUARANTINE_COLUMNS`. Both are plain CSV (``csv`` module, ``\\n`` line ends), written
whole and atomically by :func:`cvpipe.core.storage.write_csv`, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import sys
from typing import Any, Optional

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
# ``<paths.reports>/label_issues.csv``, written by ``cvpipe audit`` (one row per suspected label error, sorted
# by rank) and read by the app's review page: ``path`` is the manifest's, relative to the raw folder; labels are
# class names; ``self_confidence`` is the out-of-sample probability of the given label; ``mixed_label_group``
# (true/false) says the image is in a near-duplicate group whose members carry different labels.
LABEL_ISSUE_COLUMNS = [
    "rank",
    "id",
    "path",
    "source_uri",
    "split",
    "given_label",
    "suggested_label",
    "self_confidence",
    "mixed_label_group",
]
# labels/overrides.csv (ingest.overrides): a reviewer's latest decision per manifest id, written by the review
# API (cvpipe.serve.review) and applied by ingest (cvpipe.ingest.overrides). ``label`` is the new class name of
# a relabel (empty otherwise); ``time`` is ISO 8601 UTC.
OVERRIDE_COLUMNS = ["id", "action", "label", "reviewer", "time"]
OVERRIDE_ACTIONS = ("keep", "relabel", "exclude")
EXCLUDED_BY_REVIEW = "excluded_by_review"  # the quarantine reason of an image a reviewer excluded
# <raw>/label_review.json: ingest's summary of the decisions applied (labels corrected since the previous
# manifest, totals), carried by preprocess into the prepared meta.json and from there to evaluate, the card, W&B
LABEL_REVIEW_NAME = "label_review.json"


# the manifest columns whose few values every row repeats: interned when rows are read back (here, and
# from ingest's journal), where the csv and json modules make a fresh string per field
REPEATED_COLUMNS = ("label", "format", "source_mode", "split_hint")


def read_manifest(raw_dir: str) -> list[dict[str, str]]:
    """The rows of ``<raw_dir>/manifest.csv`` as dicts of strings.

    The columns every row repeats (label, format, mode, split hint) are interned: the csv module makes a
    fresh string per field, and these were ~200 bytes of each row's ~1.2 KB (preprocess holds every row)."""
    path = storage.join(raw_dir, "manifest.csv")
    if not storage.exists(path):
        raise StageError(f"no manifest at {path}: run `cvpipe ingest` first")
    fs, p = storage.get_fs(path)
    with fs.open(p, "r", encoding="utf-8", newline="") as fh:
        rows = []
        for row in csv.DictReader(fh):
            for key in REPEATED_COLUMNS:
                value = row.get(key)
                if value is not None:
                    row[key] = sys.intern(value)
            rows.append(row)
        return rows


def read_overrides(path: str) -> dict[str, dict[str, str]]:
    """The decisions of an overrides file by id (the last row of an id wins); ``{}`` when it does not exist.

    Shared by ingest, which applies them, and the review API, which rewrites the file: one reader,
    one set of rules. A row with an unknown action, a relabel without a label, or a file without the
    :data:`OVERRIDE_COLUMNS` header is a :class:`StageError` naming the file and line, never a guess.
    """
    if not storage.exists(path):
        return {}
    fs, p = storage.get_fs(path)
    try:
        with fs.open(p, "r", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in OVERRIDE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise StageError(f"{path}: the header lacks {', '.join(missing)} (expected {','.join(OVERRIDE_COLUMNS)})")
            out: dict[str, dict[str, str]] = {}
            for row in reader:
                rid, action, label = ((row.get(k) or "").strip() for k in ("id", "action", "label"))
                where = f"{path} line {reader.line_num}"
                if not rid:
                    raise StageError(f"{where}: empty id")
                if action not in OVERRIDE_ACTIONS:
                    raise StageError(f"{where}: action {action!r} is not one of {', '.join(OVERRIDE_ACTIONS)}")
                if action == "relabel" and not label:
                    raise StageError(f"{where}: a relabel needs the new label")
                out[rid] = {c: (row.get(c) or "").strip() for c in OVERRIDE_COLUMNS}
            return out
    except (UnicodeDecodeError, csv.Error) as exc:
        raise StageError(f"{path}: not a readable overrides CSV ({exc})") from None


def read_label_review(raw_dir: str) -> Optional[dict[str, Any]]:
    """``<raw_dir>/label_review.json`` (see :data:`LABEL_REVIEW_NAME`), or None when ingest wrote none or it is unreadable."""
    path = storage.join(raw_dir, LABEL_REVIEW_NAME)
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except (OSError, ValueError):
        return None
