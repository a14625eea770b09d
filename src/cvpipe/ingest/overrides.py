"""Reviewers' decisions applied by ingest: ``ingest.overrides`` (``labels/overrides.csv``).

The review API (:mod:`cvpipe.serve.review`) writes one row per manifest id: ``keep``, ``relabel``
(with the new class name) or ``exclude``. Ingest applies them on every run, after listing and
duplicate resolution and before the manifest is written:

* ``relabel``: the manifest row gets the new label (the old one is listed in ``reports/ingest.json``);
* ``exclude``: the image leaves the manifest for ``quarantine.csv`` with reason ``excluded_by_review``;
* ``keep``: nothing changes (counted);
* an id that is in no manifest row (the image left the source, or the file names another data set)
  is reported, never fatal.

Why here and not in preprocess: the manifest is the data version DVC tracks; a correction belongs in
it (and in the quarantine) so every later reader -- preprocess, the audit, a person reading
``manifest.csv`` -- sees the same labels. The incremental journal cannot defeat a decision: it stores
what a *file* is (hash, decode outcome), never the decision, which is applied afresh on each run.

``<raw>/label_review.json`` summarises the run for the stages downstream (preprocess copies it into the
prepared ``meta.json``, evaluate into its metrics, the model card and W&B): totals of the decisions
applied, and how many labels changed since the previous manifest. It is rewritten only when the
manifest's labels change, so a rerun that changes no label changes no file and retrains nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from cvpipe.core import storage
from cvpipe.core.console import warn
from cvpipe.core.config import IngestParams
from cvpipe.core.errors import StageError
from cvpipe.data.manifest import EXCLUDED_BY_REVIEW, LABEL_REVIEW_NAME, read_manifest, read_overrides

_SHOWN = 5  # unknown ids named in the warning


def load(p: IngestParams) -> dict[str, dict[str, str]]:
    """The decisions by manifest id; none when ``ingest.overrides`` is null or the file does not exist yet."""
    return read_overrides(p.overrides) if p.overrides else {}


def previous_labels(raw_dir: Path) -> Optional[dict[str, str]]:
    """``id -> label`` of the manifest a previous run left, or None when there is none (a first run)."""
    try:
        return {row["id"]: row["label"] for row in read_manifest(str(raw_dir)) if row.get("id")}
    except (StageError, OSError, UnicodeDecodeError, csv.Error, KeyError):  # StageError: no manifest yet
        return None


def apply(resolved: Iterable[Any], decisions: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Apply *decisions* to ingest's outcomes in place; the counts for ``reports/ingest.json``
    (``labels_relabelled`` is also a headline of ``metrics/ingest.json``).

    *resolved* holds :class:`cvpipe.ingest.stage.Outcome` objects (duck-typed here: ``record``,
    ``reason``, ``detail``), accepted ones with a manifest ``record``. A relabel gets a new record dict
    (the journal's stays as it was: it describes the file, not the decision).
    """
    counts: dict[str, Any] = {"labels_relabelled": 0, "images_excluded": 0, "labels_kept": 0,
                              "decisions": len(decisions), "unknown_ids": [], "relabelled": [], "excluded": []}
    if not decisions:
        return counts
    seen: set[str] = set()
    for o in resolved:
        rec = o.record
        d = decisions.get(rec["id"]) if rec is not None else None
        if d is None:
            continue
        seen.add(rec["id"])
        who = f" by {d['reviewer']}" if d["reviewer"] else ""
        if d["action"] == "relabel" and d["label"] != rec["label"]:
            counts["relabelled"].append({"id": rec["id"], "from": rec["label"], "to": d["label"]})
            o.record = dict(rec, label=d["label"])
            counts["labels_relabelled"] += 1
        elif d["action"] == "exclude":
            o.record, o.reason = None, EXCLUDED_BY_REVIEW
            o.detail = f"excluded in review{who} at {d['time'] or 'an unrecorded time'} (id {rec['id']}, label {rec['label']})"
            counts["images_excluded"] += 1
            counts["excluded"].append(rec["id"])
        else:  # keep, or a relabel to the label it already has
            counts["labels_kept"] += 1
    unknown = sorted(set(decisions) - seen)
    counts["unknown_ids"] = unknown
    if unknown:
        shown = ", ".join(unknown[:_SHOWN]) + (f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else "")
        warn(f"{len(unknown)} decision(s) in the overrides file name no image of this source (ignored): {shown}")
    return counts


def write_summary(raw_dir: Path, counts: dict[str, Any], previous: Optional[dict[str, str]],
                  accepted: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``<raw>/label_review.json`` when the manifest's labels changed (or it is missing); return what it holds.

    ``labels_corrected`` counts images present in both the previous and this manifest whose label
    changed (a review relabel, or its undo); ``images_excluded_since_previous`` those of the previous
    manifest that review excluded now.
    """
    path = raw_dir / LABEL_REVIEW_NAME
    now = {r["id"]: r["label"] for r in accepted}
    if previous == now and path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable: written again below
    before = previous or {}
    excluded = set(counts["excluded"])
    summary = {
        "labels_corrected": sum(1 for i, label in now.items() if i in before and before[i] != label),
        "images_excluded_since_previous": sum(1 for i in before if i not in now and i in excluded),
        "labels_relabelled": counts["labels_relabelled"],
        "images_excluded": counts["images_excluded"],
        "decisions": counts["decisions"],
        "previous_images": len(before),
        "images": len(now),
    }
    storage.write_text(path, json.dumps(summary, indent=2) + "\n", only_if_changed=True)
    return summary

