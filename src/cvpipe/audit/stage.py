"""Audit stage: find mislabelled train and val images with confident learning (cleanlab).

Reads the prepared dataset (``<paths.prepared>``: train and val arrays, their index, the
near-duplicate groups) and the manifest (``<paths.raw>/manifest.csv``, for each image's stored path).
Every train and val image gets out-of-sample class probabilities (:mod:`cvpipe.audit.learner`),
cleanlab's ``find_label_issues`` picks the likely label errors, ranked by self-confidence. Writes::

    <paths.reports>/label_issues.csv       one row per suspect, best first (LABEL_ISSUE_COLUMNS)
    <paths.plots>/audit/suspects.png       the top audit.gallery_size suspects, given vs suggested label
    <paths.reports>/audit.json             counts overall and per class, cleanlab's estimated noise rate,
                                           out-of-sample accuracy, learner, folds, timing (versioned in git)
    <paths.metrics>/audit.json             its headline: images, issues, seconds (DVC metrics)

and a W&B run (job type ``audit``) with the suspects table (image, labels, self-confidence).
Oversampled copies (``preprocess.oversample``) are left out: they repeat an original's label.
"""

from __future__ import annotations

import csv
import math
import time
from typing import Any

import numpy as np

from cvpipe.audit import embeddings
from cvpipe.audit.learner import fold_count, out_of_sample_probs, pixel_features
from cvpipe.audit.neighbors import knn_index
from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import info, warn
from cvpipe.core.errors import StageError
from cvpipe.data.manifest import LABEL_ISSUE_COLUMNS, read_manifest
from cvpipe.data.prepared import PreparedDataset

AUDITED_SPLITS = ("train", "val")


class AuditImages:
    """The audited images (train then val, oversampled copies left out) as one sequence over the
    memory-mapped split arrays: a slice reads only its rows, so the features are computed chunk by
    chunk and the dataset is never held in memory whole (the gallery reads its few images by index)."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]]):
        self.parts = parts  # (split images, kept row numbers)
        self.starts = np.cumsum([0] + [len(rows) for _, rows in parts])
        self.shape = (int(self.starts[-1]),) + tuple(parts[0][0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            p = int(np.searchsorted(self.starts, key, side="right")) - 1
            images, rows = self.parts[p]
            return np.asarray(images[int(rows[key - self.starts[p]])])
        start, stop, _ = key.indices(len(self))
        out = []
        for (images, rows), lo in zip(self.parts, self.starts[:-1]):
            a, b = max(start - lo, 0), min(stop - lo, len(rows))
            if a < b:
                sel = rows[a:b]
                contiguous = sel[-1] - sel[0] == len(sel) - 1
                out.append(np.asarray(images[sel[0] : sel[-1] + 1] if contiguous else images[sel]))
        return np.concatenate(out) if out else np.empty((0,) + self.shape[1:], dtype=np.uint8)


def _load(ds: PreparedDataset) -> tuple[AuditImages, np.ndarray, list[dict[str, str]]]:
    """Images, labels and index rows of train+val, oversampled copies dropped."""
    parts, labels, index = [], [], []
    for name in AUDITED_SPLITS:
        if not ds.has_split(name):
            continue
        sp = ds.split(name)
        keep = np.asarray([not r.get("augmented_from") for r in sp.index], dtype=bool)
        if keep.any():
            parts.append((sp.images, np.flatnonzero(keep)))
        labels.append(sp.labels[keep])
        index += [dict(r, split=name) for r, k in zip(sp.index, keep) if k]
    if not index:
        raise StageError(f"{ds.source} has no train or val images to audit")
    return AuditImages(parts), np.concatenate(labels), index


def features_of(params: Params, images: AuditImages, num_classes: int) -> tuple[np.ndarray, str, dict[str, Any]]:
    """(features, model kind for :func:`out_of_sample_probs`, the learner's description for audit.json)."""
    ap = params.audit
    if not embeddings.wants_embeddings(params):
        return pixel_features(images, ap.pixel_size), "pixels", {
            "features": f"pixels {ap.pixel_size}x{ap.pixel_size}", "pca_components": ap.pca_components,
            "model": "knn_distance_weighted", "neighbors": ap.neighbors}
    t = time.perf_counter()
    model, norm, desc = embeddings.load_backbone(params, num_classes)
    feats = embeddings.embed(model, images, norm, ap.device, ap.batch_size)
    info(f"audit: {feats.shape[1]}-d embeddings of {len(feats)} images in {time.perf_counter() - t:.1f}s ({desc})")
    learner = {"features": f"embeddings {feats.shape[1]}-d", "backbone": desc, "model": ap.embedding_head}
    learner.update({"neighbors": ap.neighbors} if ap.embedding_head == "knn" else {"regularization": ap.regularization})
    return feats, ap.embedding_head, learner


def _groups(ds: PreparedDataset, ids: list[str]) -> tuple[np.ndarray, set[str]]:
    """A group number per image (near-duplicates share one, every other image has its own) and the ids
    of images in a near-duplicate group whose members carry more than one label."""
    members: dict[str, int] = {}
    labels_of: dict[int, set[str]] = {}
    path = ds.root / "near_duplicates.csv"
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                g = int(row["group"])
                members[row["id"]] = g
                labels_of.setdefault(g, set()).add(row["label"])
    offset = max(labels_of, default=-1) + 1
    groups = np.asarray([members.get(id_, offset + i) for i, id_ in enumerate(ids)], dtype=np.int64)
    mixed = {id_ for id_, g in members.items() if len(labels_of[g]) > 1}
    return groups, mixed


def find_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """cleanlab's ranked label issues, every image's self-confidence (``cleanlab.rank``), the noise rate
    estimated from the confident joint (1 - its trace) and that joint, (given, true) classes."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    joint = estimate_joint(labels, probs)
    return np.asarray(ranked, dtype=np.int64), quality, float(1.0 - np.trace(joint)), joint


def issue_rows(ranked, labels, probs, quality, index, classes, paths_by_id, mixed) -> list[dict[str, Any]]:
    """The label_issues.csv rows, rank 1 = least confident in its given label."""
    rows = []
    for r, i in enumerate(ranked.tolist(), 1):
        id_ = index[i]["id"]
        rows.append({
            "rank": r, "id": id_, "path": paths_by_id.get(id_, ""), "source_uri": index[i]["source_uri"],
            "split": index[i]["split"], "given_label": classes[int(labels[i])],
            "suggested_label": classes[int(np.argmax(probs[i]))], "self_confidence": round(float(quality[i]), 6),
            "mixed_label_group": "true" if id_ in mixed else "false",
        })
    return rows


def run(params: Params) -> dict[str, Any]:
    ap = params.audit
    t0 = time.perf_counter()
    ds = PreparedDataset(params.paths.prepared)
    images, labels, index = _load(ds)
    ids = [r["id"] for r in index]
    groups, mixed = _groups(ds, ids)
    folds = fold_count(labels, ds.classes, groups, ap.folds)
    paths_by_id = {r["id"]: r["path"] for r in read_manifest(params.paths.raw)}
    missing = sum(1 for id_ in ids if id_ not in paths_by_id)
    if missing:
        warn(f"{missing} audited images are not in {params.paths.raw}/manifest.csv (rerun ingest and preprocess); path left empty")

    info(f"audit: {len(labels)} train+val images, {ds.num_classes} classes, {folds}-fold cross-fitting")
    feats, kind, learner = features_of(params, images, ds.num_classes)
    search = "exact"
    if kind != "logistic":  # a k-NN: its neighbour search, recorded with the learner
        search = learner["knn_index"] = knn_index(ap.knn_index, len(labels))
    probs = out_of_sample_probs(feats, labels, groups, ap, ds.num_classes, folds, kind, search)
    ranked, quality, noise_rate, joint = find_issues(labels, probs, ap.filter_by)
    _warn_if_uninformative(labels, probs, learner["features"])
    rows = issue_rows(ranked, labels, probs, quality, index, ds.classes, paths_by_id, mixed)
    storage.write_csv(storage.join(params.paths.reports, "label_issues.csv"), LABEL_ISSUE_COLUMNS, rows)
    gallery = storage.join(params.paths.plots, "audit", "suspects.png")
    plot_suspects(images, rows[: ap.gallery_size], [int(i) for i in ranked[: ap.gallery_size]], gallery)
    metrics = _metrics(params, labels, probs, ranked, noise_rate, joint, ds.classes, rows, folds, time.perf_counter() - t0)
    metrics["learner"] = learner
    storage.write_json(storage.join(params.paths.reports, "audit.json"), metrics)
    storage.write_json(storage.join(params.paths.metrics, "audit.json"), headline(metrics))
    _log_wandb(params, ds, metrics, rows, images, ranked, gallery)
    info(f"audit: {len(rows)} suspected label errors of {len(labels)} ({metrics['issue_fraction']:.1%}); "
         f"estimated noise rate {noise_rate:.1%}; see {params.paths.reports}/label_issues.csv")
    return metrics


def _warn_if_uninformative(labels: np.ndarray, probs: np.ndarray, features: str) -> None:
    """Confident learning trusts the probabilities: when the cross-fitted model is barely better than always
    guessing the largest class (here: closer to that than to perfect), its suspects are mostly hard images,
    not label errors. Measured: the digits reach 0.91-0.93 against a 0.10 majority; hymenoptera photos
    0.55 against 0.51, where all top-10 suspects were correctly labelled bees."""
    majority = float(np.bincount(labels).max() / len(labels))
    accuracy = float((probs.argmax(1) == labels).mean())
    if accuracy < (1.0 + majority) / 2:
        warn(f"audit: the model on {features} predicts only {accuracy:.0%} of train+val right out of sample (largest class "
             f"alone: {majority:.0%}); its suspects are mostly hard images, review them with care"
             + ("; on photos, set audit.backbone (learner.py)" if features.startswith("pixels") else ""))


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file of the audit: images audited, suspects, seconds (keys shared with the other stages'
    metrics files, so ``dvc metrics show`` stays one narrow table); the rest stays in the report."""
    return {k: report[k] for k in ("images", "issues", "seconds")}


def _metrics(params, labels, probs, ranked, noise_rate, joint, classes, rows, folds, seconds) -> dict[str, Any]:
    ap = params.audit
    given = np.bincount(labels, minlength=len(classes))
    flagged = np.bincount(labels[ranked], minlength=len(classes)) if len(ranked) else np.zeros(len(classes), np.int64)
    n = len(labels)
    return {
        "images": n,
        "issues": len(ranked),
        "issue_fraction": len(ranked) / n,
        "estimated_noise_rate": noise_rate,
        "out_of_sample_accuracy": float((probs.argmax(1) == labels).mean()),
        "mixed_label_group_issues": sum(r["mixed_label_group"] == "true" for r in rows),
        "per_class": {c: {"images": int(given[k]), "issues": int(flagged[k]),
                          "estimated_noise_rate": float(1.0 - joint[k, k] / joint[k].sum()) if joint[k].sum() > 0 else None}
                      for k, c in enumerate(classes)},
        "learner": {},  # filled by run()
        "folds": folds,
        "filter_by": ap.filter_by,
        "seconds": round(seconds, 2),
    }


def plot_suspects(images: np.ndarray, rows: list[dict[str, Any]], positions: list[int], path: str) -> None:
    """A grid of the top suspects, each titled rank, given -> suggested label and self-confidence.

    Always written (dvc.yaml declares it, and a stale gallery from an earlier run must not survive): with no
    suspect, or ``audit.gallery_size: 0``, it is a small figure that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        fig, ax = plt.subplots(figsize=(5, 1), dpi=100)
        ax.axis("off")
        ax.text(0.5, 0.5, "no suspected label errors to show", ha="center", va="center")
        storage.save_png(fig, path)
        plt.close(fig)
        return
    cols = min(8, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.6 * nrows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row, i in zip(axes.ravel(), rows, positions):
        ax.imshow(np.asarray(images[i]))
        ax.set_title(f"#{row['rank']} {row['given_label']} -> {row['suggested_label']}\np={row['self_confidence']:.2f}",
                     fontsize=8, color="tab:red" if row["mixed_label_group"] == "true" else "black")
    fig.suptitle("Suspected label errors: given -> suggested (p = out-of-sample prob. of the given label; "
                 "red: in a near-duplicate group with mixed labels)", fontsize=9)
    fig.tight_layout()
    storage.save_png(fig, path)
    plt.close(fig)


def _log_wandb(params, ds, metrics, rows, images, ranked, gallery) -> None:
    tracker = tracking.start(params, job_type="audit", name="audit", config={"audit": params.audit.model_dump()},
                             group=tracking.group_name(params, ds.meta.get("fingerprint")), tags=["audit"])
    with tracker:
        tracker.summary({f"audit/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        try:
            import wandb

            table = wandb.Table(columns=["rank", "id", "image", "split", "given_label", "suggested_label",
                                         "self_confidence", "mixed_label_group"])
            for row, i in list(zip(rows, ranked.tolist()))[: params.audit.table_images]:
                table.add_data(row["rank"], row["id"], wandb.Image(np.asarray(images[i])), row["split"], row["given_label"],
                               row["suggested_label"], row["self_confidence"], row["mixed_label_group"] == "true")
            log: dict[str, Any] = {"audit/label_issues": table}
            if rows and params.audit.gallery_size and storage.exists(gallery):
                log["audit/suspects"] = tracker.image(gallery)
            tracker.log(log)
        except Exception as exc:  # tracking never fails the stage
            info(f"W&B table skipped: {exc}")
