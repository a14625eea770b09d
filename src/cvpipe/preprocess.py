"""Preprocess stage: resize every ingested image once, split, and write the training format.

Reads ``preprocess.*``, ``split.*``, ``augment.*`` and the ingest manifest in
``paths.raw``. Writes the prepared dataset (see :mod:`cvpipe.dataset`) to
``paths.prepared`` -- built in a temporary folder and swapped in when complete --
and the dataset card to ``<paths.metrics>/dataset.json``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cvpipe import augment, storage
from cvpipe.config import Params
from cvpipe.console import info, progress
from cvpipe.dataset import SPLITS, SplitWriter, write_meta
from cvpipe.errors import StageError
from cvpipe.images import fit_image, open_for_size
from cvpipe.ingest import read_manifest

# ----------------------------------------------------------------------------- resize workers

_mm_cache: dict[str, np.ndarray] = {}


def _resize_chunk(raw_dir: str, out_path: str, rows: Sequence[tuple[int, str]], size: int, mode: str) -> int:
    """Resize ``rows`` of (output index, relative image path) into the split's memmap."""
    arr = _mm_cache.get(out_path)
    if arr is None:
        arr = np.load(out_path, mmap_mode="r+")
        _mm_cache.clear()
        _mm_cache[out_path] = arr
    for i, rel in rows:
        with open(os.path.join(raw_dir, rel), "rb") as fh:
            img = open_for_size(fh, size)
            arr[i] = np.asarray(fit_image(img, size, mode), dtype=np.uint8)
    arr.flush()
    return len(rows)


def _resize_split(raw_dir: str, writer: SplitWriter, rels: list[str], size: int, mode: str, workers: int, bar, task) -> None:
    rows = list(enumerate(rels))
    if workers <= 1 or len(rows) < 64:
        for start in range(0, len(rows), 32):
            bar.advance(task, _resize_chunk(raw_dir, str(writer.path), rows[start : start + 32], size, mode))
        return
    writer.images.flush()
    chunk = max(8, min(128, len(rows) // (workers * 4)))
    chunks = [rows[s : s + chunk] for s in range(0, len(rows), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_resize_chunk, raw_dir, str(writer.path), c, size, mode) for c in chunks]
        for f in futures:
            bar.advance(task, f.result())


# ----------------------------------------------------------------------------- splits


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int, classes: list[str]) -> dict[str, np.ndarray]:
    """Seeded stratified train/val/test indices (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    counts = Counter(labels.tolist())
    needed = sum(1 for f in fractions.values() if f > 0)
    too_few = {classes[c]: n for c, n in counts.items() if n < needed}
    if too_few:
        raise StageError(
            f"classes with too few images for a {needed}-way split: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(too_few.items()))
        )
    idx = np.arange(len(labels))
    rest_frac = fractions["val"] + fractions["test"]
    try:
        if rest_frac == 0:
            return {"train": idx, "val": idx[:0], "test": idx[:0]}
        train_idx, rest = train_test_split(idx, test_size=rest_frac, stratify=labels, random_state=seed)
        if fractions["val"] == 0 or fractions["test"] == 0:
            other = "test" if fractions["val"] == 0 else "val"
            out = {"train": train_idx, "val": idx[:0], "test": idx[:0]}
            out[other] = rest
            return {k: np.sort(v) for k, v in out.items()}
        val_idx, test_idx = train_test_split(
            rest, test_size=fractions["test"] / rest_frac, stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:
        raise StageError(f"cannot make a stratified split with these fractions: {exc}") from None
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def predefined_split(hints: list[str]) -> dict[str, np.ndarray]:
    """Keep the split recorded by ingest (e.g. ``train/`` and ``val/`` folders) exactly."""
    arr = np.asarray(hints)
    missing = int((arr == "").sum())
    if missing:
        raise StageError(
            f"split.strategy is 'predefined' but {missing} images have no split hint "
            "(ingest a folder laid out as train/<class>/, val/<class>/, test/<class>/)"
        )
    return {s: np.flatnonzero(arr == s) for s in SPLITS}


# ----------------------------------------------------------------------------- stage


def _mean_std(images: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        s += block.sum(axis=(0, 1, 2))
        ss += (block**2).sum(axis=(0, 1, 2))
        n += block.shape[0] * block.shape[1] * block.shape[2]
    if n == 0:
        return [0.0] * 3, [0.0] * 3
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0))
    return [round(float(x), 5) for x in mean], [round(float(x), 5) for x in std]


def run(params: Params) -> dict[str, Any]:
    pp, sp = params.preprocess, params.split
    pipeline = augment.build(params.augment, seed=sp.seed)  # validate before writing anything
    rows = read_manifest(params.paths.raw)
    if not rows:
        raise StageError(f"the manifest in {params.paths.raw} is empty")
    started = time.perf_counter()
    classes = sorted({r["label"] for r in rows})
    cls_index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([cls_index[r["label"]] for r in rows], dtype=np.int64)
    if len(classes) < 2:
        raise StageError(f"need at least 2 classes to train a classifier, found {classes}")

    if sp.strategy == "predefined":
        splits = predefined_split([r["split_hint"] for r in rows])
    else:
        splits = stratified_split(labels, {"train": sp.train, "val": sp.val, "test": sp.test}, sp.seed, classes)
    if len(splits["train"]) == 0:
        raise StageError("the train split is empty")

    workers = pp.workers or max(1, os.cpu_count() or 1)
    raw_dir = str(Path(params.paths.raw))
    size = pp.image_size
    card: dict[str, Any] = {"classes": classes, "splits": {}}
    with storage.staged_dir(params.paths.prepared) as root, progress("img") as bar:
        for name in SPLITS:
            idx = splits[name]
            if len(idx) == 0:
                continue
            task = bar.add_task(f"resize {name}", total=len(idx))
            writer = SplitWriter(root, name, len(idx), size)
            _resize_split(raw_dir, writer, [rows[i]["path"] for i in idx], size, pp.resize_mode, workers, bar, task)
            writer.finish(labels[idx].tolist(), [rows[i] for i in idx])
            card["splits"][name] = {
                "count": int(len(idx)),
                "per_class": {classes[c]: int(n) for c, n in sorted(Counter(labels[idx].tolist()).items())},
            }
        train_images = np.load(Path(root) / "train" / "images.npy", mmap_mode="r")
        mean, std = _mean_std(train_images)
        del train_images
        sizes = np.asarray([[int(r["width"]), int(r["height"])] for r in rows])
        card.update(
            {
                "image_size": size,
                "resize_mode": pp.resize_mode,
                "split_strategy": sp.strategy,
                "mean": mean,
                "std": std,
                "source_size": {
                    "min": sizes.min(axis=0).tolist(),
                    "median": np.median(sizes, axis=0).tolist(),
                    "max": sizes.max(axis=0).tolist(),
                },
            }
        )
        write_meta(root, classes, {k: card[k] for k in ("image_size", "resize_mode", "split_strategy", "mean", "std")},
                   {"splits": {k: v["count"] for k, v in card["splits"].items()}})
        (Path(root) / "augment.json").write_text(augment.to_json(pipeline))
    card["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(storage.join(params.paths.metrics, "dataset.json"), card)
    info(
        f"prepared {len(rows)} images at {size}px into {params.paths.prepared}: "
        + ", ".join(f"{k} {v['count']}" for k, v in card["splits"].items())
        + f" ({card['seconds']:.1f}s)"
    )
    return card
