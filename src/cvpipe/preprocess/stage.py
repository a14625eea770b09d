"""Preprocess stage: resize every ingested image once, split without leakage, write the training format.

Reads ``preprocess.*``, ``split.*``, ``augment.*`` and the ingest manifest in
``paths.raw``. Writes (see ``preprocess/README.md``):

* the prepared dataset (format in :mod:`cvpipe.data.prepared`) to ``paths.prepared``,
  built in a temporary folder and swapped in when complete, including the
  augmentation pipeline (``augment.json``), the derived eval transform
  (``eval_transform.json``) and the near-duplicate groups (``near_duplicates.csv``);
* the dataset card: ``<paths.reports>/dataset.json`` (versioned in git: per split and class counts, source
  sizes, near-duplicates, mean/std), its headline ``<paths.metrics>/dataset.json`` (DVC metrics: images,
  seconds, throughput_img_s) and ``<paths.plots>/dataset/*.png`` (DVC plots), also logged to W&B.

Work order: one parallel pass decodes (JPEG at reduced scale, :mod:`cvpipe.data.resize`), resizes and hashes
every image into a staging array; the split is then decided from labels, hints
and perceptual hashes; each split's rows are copied out of the staging array.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.core import storage
from cvpipe.core.config import Params
from cvpipe.core.console import info, progress, warn
from cvpipe.core.errors import StageError
from cvpipe.data import augment, manifest, shards
from cvpipe.data.prepared import SPLITS, SplitWriter, write_meta
from cvpipe.data.resize import resize_all
from cvpipe.preprocess.near_duplicates import near_duplicate_groups
from cvpipe.preprocess.splits import groups_report, predefined_split, straddling_groups, stratified_split

# ----------------------------------------------------------------------------- statistics


def mean_std(images: np.ndarray, pixels_per_chunk: int = 1 << 22) -> tuple[list[float], list[float]]:
    """Per-channel RGB mean and std on the 0..1 scale, streamed over the uint8 (n, h, w, 3) array.

    Counted as a histogram of each channel's 256 values (``np.bincount``), so the sums are exact and a
    chunk costs its own bytes. Chunks of 512 images converted to float64 held two float copies at once,
    1.2 GB at 224 px whatever the dataset's size (a 2k-image preprocess peaked at 2.15 GB, now 0.54 GB)."""
    hist = np.zeros((3, 256), dtype=np.int64)
    chunk = max(1, pixels_per_chunk // max(1, int(np.prod(images.shape[1:3]))))
    for start in range(0, images.shape[0], chunk):
        block = np.asarray(images[start : start + chunk])
        for c in range(3):
            hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    n = int(hist[0].sum())
    if n == 0:
        return [0.0] * 3, [0.0] * 3
    v = np.arange(256) / 255.0
    mean = hist @ v / n
    std = np.sqrt(np.maximum(hist @ (v * v) / n - mean**2, 0))
    return [round(float(x), 5) for x in mean], [round(float(x), 5) for x in std]


def size_distribution(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Source image sizes: percentiles of width/height/aspect and a histogram of the shorter side."""
    wh = np.asarray([[int(r["width"]), int(r["height"])] for r in rows], dtype=np.float64)
    short = wh.min(axis=1)
    aspect = wh.max(axis=1) / np.maximum(short, 1)
    pct = [0, 5, 50, 95, 100]
    names = ["min", "p5", "median", "p95", "max"]
    edges = [0, 32, 64, 128, 256, 512, 1024, 2048]
    bins = {}
    for lo, hi in zip(edges, edges[1:] + [None]):
        sel = (short >= lo) & (short < hi) if hi is not None else (short >= lo)
        bins[f"{lo}-{hi - 1}" if hi else f">={lo}"] = int(sel.sum())
    return {
        "width": {k: float(v) for k, v in zip(names, np.percentile(wh[:, 0], pct))},
        "height": {k: float(v) for k, v in zip(names, np.percentile(wh[:, 1], pct))},
        "aspect_ratio": {k: round(float(v), 3) for k, v in zip(names, np.percentile(aspect, pct))},
        "shorter_side_histogram": bins,
    }


# ----------------------------------------------------------------------------- oversampling


def oversample_plan(train_labels: np.ndarray, minimum: int, seed: int) -> np.ndarray:
    """Positions (into the train split) to copy with augmentation so each class reaches ``minimum``."""
    rng = np.random.default_rng(seed)
    extra = []
    for c in np.unique(train_labels):
        members = np.flatnonzero(train_labels == c)
        short = minimum - len(members)
        if short > 0:
            extra.append(np.sort(rng.choice(members, size=short, replace=True)))
    return np.concatenate(extra) if extra else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- stage


def _split(params: Params, rows: list[dict[str, str]], labels: np.ndarray, classes: list[str],
           groups: np.ndarray) -> dict[str, np.ndarray]:
    sp = params.split
    fractions = {"train": sp.train, "val": sp.val, "test": sp.test}
    if sp.strategy == "predefined":
        return predefined_split([r.get("split_hint", "") or "" for r in rows], labels, classes, fractions=fractions,
                                seed=sp.seed, groups=groups, test_from=sp.test_from)
    return stratified_split(labels, fractions, sp.seed, classes, groups)


def run(params: Params) -> dict[str, Any]:
    pp, sp = params.preprocess, params.split
    pipeline = augment.build(params.augment, seed=sp.seed)  # validate before reading or writing anything
    rows = _read_rows(params)
    started = time.perf_counter()
    classes, labels = _classes_and_labels(rows)
    workers = pp.workers or max(1, os.cpu_count() or 1)
    raw_dir = str(storage.local_copy(params.paths.raw))
    size = pp.image_size
    want_hash = sp.near_duplicate_distance is not None

    card: dict[str, Any] = {"classes": classes}
    with storage.staged_dir(params.paths.prepared) as root, progress("img") as bar:
        root = Path(root)
        staging = root / ".all-images.npy"
        task = bar.add_task("decode+resize", total=len(rows))
        t0 = time.perf_counter()
        hashes = resize_all(raw_dir, [r["path"] for r in rows], staging, size, pp.resize_mode, workers, want_hash,
                            on_progress=lambda k: bar.advance(task, k),
                            shapes=[(int(r["width"]), int(r["height"])) for r in rows], max_pixels=params.ingest.max_pixels)
        resize_seconds = time.perf_counter() - t0

        splits, leaks, dup_groups = _split_without_leaks(params, rows, labels, classes, hashes, root)
        extra = _write_splits(root, staging, params, pipeline, rows, labels, splits)
        mean, std = _train_mean_std(root, len(splits["train"]))
        if pp.format == "shards":
            _shard_splits(root, params)
        card.update(_card(params, rows, labels, classes, splits, extra, dup_groups, mean, std))
        card["near_duplicates"]["straddling_splits"] = len(leaks)
        (root / "augment.json").write_text(augment.to_json(pipeline))
        (root / "eval_transform.json").write_text(augment.to_json(augment.eval_pipeline(size)))
        meta = {"image_size": size, "format": pp.format, "resize_mode": pp.resize_mode, "split_strategy": sp.strategy, "mean": mean, "std": std,
                "label_review": manifest.read_label_review(raw_dir)}  # ingest's review summary, for the model card
        write_meta(root, classes, meta, {"splits": {k: v["count"] for k, v in card["splits"].items()}})
        card["seconds"] = {"decode_resize": round(resize_seconds, 3), "total": round(time.perf_counter() - started, 3)}
        card["images_per_second"] = round(len(rows) / max(resize_seconds, 1e-9), 1)
        pngs = _report(params, card, pipeline, dup_groups, leaks, root)

    plot_dir = storage.join(params.paths.plots, "dataset")
    for name, data in pngs.items():
        storage.write_bytes(storage.join(plot_dir, name), data)
    storage.write_json(storage.join(params.paths.reports, "dataset.json"), card)
    storage.write_json(storage.join(params.paths.metrics, "dataset.json"), headline(card))
    info(
        f"prepared {card['images']} images at {card['image_size']}px into {params.paths.prepared}: "
        + ", ".join(f"{k} {v['count']}" for k, v in card["splits"].items())
        + f" ({card['seconds']['total']:.1f}s, {card['images_per_second']:.0f} img/s decode+resize)"
    )
    return card


def _classes_and_labels(rows: list[dict[str, str]]) -> tuple[list[str], np.ndarray]:
    """The sorted class names (at least two) and each row's class index."""
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise StageError(f"need at least 2 classes to train a classifier, found {classes}")
    cls_index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([cls_index[r["label"]] for r in rows], dtype=np.int64)


def _split_without_leaks(params: Params, rows: list[dict[str, str]], labels: np.ndarray, classes: list[str],
                         hashes: np.ndarray, root: Path) -> tuple[dict[str, np.ndarray], list[int], list[dict]]:
    """Group near-duplicates, split over the groups, write near_duplicates.csv; the splits, the groups
    straddling splits (predefined folders only) and the groups report."""
    sp = params.split
    groups = near_duplicate_groups(hashes, sp.near_duplicate_distance)
    splits = _split(params, rows, labels, classes, groups)
    if len(splits["train"]) == 0:
        raise StageError("the train split is empty")
    leaks = straddling_groups(groups, {k: v for k, v in splits.items() if len(v)})
    if leaks and sp.strategy == "stratified":  # cannot happen by construction; guard the invariant
        raise StageError(f"internal error: {len(leaks)} near-duplicate groups straddle splits")
    split_of = np.full(len(rows), "", dtype=object)
    for name, idx in splits.items():
        split_of[idx] = name
    dup_groups = groups_report(groups, [r["id"] for r in rows], labels, classes)
    _write_groups(root / "near_duplicates.csv", groups, dup_groups, rows, split_of)
    return splits, leaks, dup_groups


def _write_splits(root: Path, staging: Path, params: Params, pipeline, rows: list[dict[str, str]], labels: np.ndarray,
                  splits: dict[str, np.ndarray]) -> np.ndarray:
    """Each split's images (copied out of the staging array, then deleted) and index, the train split topped
    up with oversampled copies; the oversampled train positions."""
    pp, sp = params.preprocess, params.split
    all_images = np.load(staging, mmap_mode="r")
    extra = np.zeros(0, dtype=np.int64)
    for name in SPLITS:
        idx = splits[name]
        if len(idx) == 0:
            continue
        if name == "train" and pp.oversample:
            extra = oversample_plan(labels[idx], pp.oversample, sp.seed)
        writer = SplitWriter(root, name, len(idx) + len(extra) * (name == "train"), pp.image_size)
        for s in range(0, len(idx), 1024):
            block = idx[s : s + 1024]
            writer.images[s : s + len(block)] = all_images[block]
        index_rows = [rows[i] for i in idx]  # the manifest rows themselves: finish() only reads them
        split_labels = labels[idx].tolist()
        if name == "train" and len(extra):
            _add_oversampled(writer, idx, extra, rows, labels, pipeline, sp.seed, index_rows, split_labels)
        writer.finish(split_labels, index_rows)
    del all_images
    staging.unlink()
    return extra


def _add_oversampled(writer: SplitWriter, idx: np.ndarray, extra: np.ndarray, rows: list[dict[str, str]],
                     labels: np.ndarray, pipeline, seed: int, index_rows: list[dict], split_labels: list[int]) -> None:
    """Augmented copies of the train images at positions *extra*, after the originals; their rows and labels appended."""
    aug = augment.from_dict(augment.to_dict(pipeline))
    aug.set_random_seed(seed)
    for j, pos in enumerate(extra.tolist()):
        src = np.asarray(writer.images[pos])
        writer.images[len(idx) + j] = aug(image=src)["image"]
        base = rows[idx[pos]]
        index_rows.append({**base, "id": f"{base['id']}~oversample{j}", "augmented_from": base["id"]})
        split_labels.append(int(labels[idx[pos]]))


def _train_mean_std(root: Path, n_train: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train split's own images (not its oversampled copies)."""
    train_images = np.load(root / "train" / "images.npy", mmap_mode="r")[:n_train]
    return mean_std(train_images)


def _shard_splits(root: Path, params: Params) -> None:
    """Re-encode every written split's array as WebDataset shards (``preprocess.format: shards``), then drop
    the array. Preprocess needs the arrays' disk once while it writes; the machines that train need none."""
    import csv

    pp = params.preprocess
    for name in SPLITS:
        d = root / name
        if not (d / "images.npy").exists():
            continue
        images = np.load(d / "images.npy", mmap_mode="r")
        with open(d / "index.csv", newline="", encoding="utf-8") as fh:
            ids = [r["id"] for r in csv.DictReader(fh)]
        written = shards.write_split(d, images, np.load(d / "labels.npy"), ids, pp.shard_size, pp.shard_encoding,
                                     pp.shard_quality)
        del images
        (d / "images.npy").unlink()
        info(f"{name}: {len(ids)} images in {len(written['shards'])} {pp.shard_encoding} shards")


def _read_rows(params: Params) -> list[dict[str, str]]:
    from cvpipe.data.manifest import read_manifest

    rows = read_manifest(params.paths.raw)
    if not rows:
        raise StageError(f"the manifest in {params.paths.raw} is empty")
    return rows


def _write_groups(path: Path, groups: np.ndarray, dup_groups: list[dict], rows, split_of) -> None:
    by_id = {r["id"]: i for i, r in enumerate(rows)}
    members = ((g, id_, by_id[id_]) for g, grp in enumerate(dup_groups) for id_ in grp["ids"])
    storage.write_csv(  # inside the staged dataset folder: no fsync, the folder's swap publishes it
        path, ["group", "id", "label", "split", "source_uri"],
        ([g, id_, rows[i]["label"], split_of[i], rows[i]["source_uri"]] for g, id_, i in members),
        durable=False,
    )


def headline(card: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file of the dataset card: what a person compares across data versions. Keys shared
    with the other stages' metrics files (``images``, ``seconds``, ``throughput_img_s``) keep ``dvc metrics
    show`` one narrow table; per split and class, source sizes and near-duplicates stay in the card."""
    return {"images": card["images"], "seconds": card["seconds"]["total"],
            "throughput_img_s": card["images_per_second"]}


def _card(params, rows, labels, classes, splits, extra, dup_groups, mean, std) -> dict[str, Any]:
    pp, sp = params.preprocess, params.split
    out_splits: dict[str, Any] = {}
    for name in SPLITS:
        idx = splits[name]
        if len(idx) == 0:
            continue
        counts = Counter(labels[idx].tolist())
        if name == "train" and len(extra):
            train_labels = labels[idx]
            counts = Counter(train_labels.tolist() + train_labels[extra].tolist())
        per_class = {c: int(counts.get(i, 0)) for i, c in enumerate(classes)}
        total = sum(per_class.values())
        nonzero = [v for v in per_class.values() if v]
        out_splits[name] = {
            "count": int(total),
            "per_class": per_class,
            "fraction_per_class": {c: round(v / total, 4) for c, v in per_class.items()},
            "imbalance_ratio": round(max(nonzero) / min(nonzero), 3) if nonzero else 0.0,
            "missing_classes": [c for c, v in per_class.items() if v == 0],
        }
        if name == "train" and len(extra):
            out_splits[name]["oversampled"] = int(len(extra))
    return {
        "image_size": pp.image_size,
        "resize_mode": pp.resize_mode,
        "split_strategy": sp.strategy,
        "images": len(rows),
        "splits": out_splits,
        "per_class": {c: int(n) for c, n in zip(classes, np.bincount(labels, minlength=len(classes)))},
        "mean": mean,
        "std": std,
        "source_size": size_distribution(rows),
        "near_duplicates": {
            "max_distance": sp.near_duplicate_distance,
            "groups": len(dup_groups),
            "images_in_groups": int(sum(len(g["ids"]) for g in dup_groups)),
            "largest_group": max((len(g["ids"]) for g in dup_groups), default=1),
            "mixed_label_groups": sum(1 for g in dup_groups if g["mixed_labels"]),
            "examples": [g["ids"] for g in dup_groups[:10]],
        },
    }


def _report(params: Params, card: dict[str, Any], pipeline, dup_groups: list[dict], leaks: list[int],
            root: Path) -> dict[str, bytes]:
    """Warnings, dataset-card PNGs, and the W&B run (config, card, plots, augmentation)."""
    from cvpipe.data.prepared import PreparedDataset
    from cvpipe.preprocess import datacard

    for name, s in card["splits"].items():
        if s["missing_classes"]:
            warn(f"the {name} split has no images of: {', '.join(s['missing_classes'])}")
    nd = card["near_duplicates"]
    if dup_groups:
        info(f"near-duplicates: {nd['groups']} groups, {nd['images_in_groups']} images "
             f"(phash distance <= {nd['max_distance']}), kept within one split; listed in near_duplicates.csv")
    if leaks:
        warn(f"{len(leaks)} near-duplicate groups straddle the predefined split folders "
             "(kept as given; see near_duplicates.csv in the prepared dataset)")
    if nd["mixed_label_groups"]:
        warn(f"{nd['mixed_label_groups']} near-duplicate groups mix labels (see near_duplicates.csv)")
    ds = PreparedDataset(root)
    pngs = datacard.render(ds, card, pipeline, seed=params.split.seed)
    datacard.log_to_wandb(params, card, pngs, root)
    return pngs
