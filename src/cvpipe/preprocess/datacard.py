"""Dataset card pictures (class histogram, per-class samples, augmented samples) and their W&B logging.

Rendered with matplotlib's Agg backend to PNG bytes; the caller writes them
atomically with :mod:`cvpipe.core.storage` (``<paths.plots>/dataset/*.png``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.data import augment, prepared

MAX_CLASSES_SHOWN = 12
SAMPLES_PER_CLASS = 8
AUGMENTED_ROWS = 4
AUGMENTED_COLS = 6
PNG_OPTIONS = {"dpi": 100, "bbox_inches": "tight"}  # savefig keywords of every card picture


def _grid(images: list[list[np.ndarray]], row_titles: list[str], col_titles: list[str] | None, title: str) -> bytes:
    import matplotlib.pyplot as plt

    rows, cols = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 1.3 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(images[r]):
                ax.imshow(images[r][c], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return storage.png_bytes(fig, **PNG_OPTIONS)


def class_histogram(card: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = card["classes"]
    splits = list(card["splits"])
    x = np.arange(len(classes))
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(classes) + 2), 3.2))
    for k, name in enumerate(splits):
        counts = [card["splits"][name]["per_class"][c] for c in classes]
        ax.bar(x + (k - (len(splits) - 1) / 2) * width, counts, width, label=f"{name} ({sum(counts)})")
    ax.set_xticks(x, [str(c) for c in classes], rotation=45 if len(classes) > 8 else 0)
    ax.set_ylabel("images")
    ax.set_title("images per class and split")
    ax.legend(fontsize=8)
    return storage.png_bytes(fig, **PNG_OPTIONS)


def render(ds, card: dict[str, Any], pipeline, seed: int = 0) -> dict[str, bytes]:
    """The three card PNGs from a prepared dataset: {file name: PNG bytes}."""
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(seed)
    train = ds.split("train")
    original = np.array([not r.get("augmented_from") for r in train.index], dtype=bool)
    shown = list(range(min(len(ds.classes), MAX_CLASSES_SHOWN)))
    samples, names = [], []
    for c in shown:
        members = np.flatnonzero((train.labels == c) & original)
        pick = np.sort(rng.choice(members, size=min(SAMPLES_PER_CLASS, len(members)), replace=False)) if len(members) else []
        samples.append([np.asarray(train.images[i]) for i in pick] or [np.zeros((ds.image_size, ds.image_size, 3), np.uint8)])
        names.append(str(ds.classes[c]))
    more = f" (first {MAX_CLASSES_SHOWN} of {len(ds.classes)} classes)" if len(ds.classes) > MAX_CLASSES_SHOWN else ""
    out = {
        "class_histogram.png": class_histogram(card),
        "samples.png": _grid(samples, names, None, f"train samples per class{more}"),
    }
    aug = augment.from_dict(augment.to_dict(pipeline))
    aug.set_random_seed(seed)
    pool = np.flatnonzero(original)
    picks = np.sort(rng.choice(pool, size=min(AUGMENTED_ROWS, len(pool)), replace=False))
    rows = []
    for i in picks:
        img = np.asarray(train.images[i])
        rows.append([img] + [aug(image=img)["image"] for _ in range(AUGMENTED_COLS)])
    titles = ["original"] + [f"augmented {k + 1}" for k in range(AUGMENTED_COLS)]
    out["augmented.png"] = _grid(rows, [str(ds.classes[train.labels[i]]) for i in picks], titles,
                                 "training augmentation (augment.train)")
    return out


def _numeric(d: Any, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            flat.update(_numeric(v, f"{prefix}{k}/"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        flat[prefix.rstrip("/")] = d
    return flat


def log_to_wandb(params: Params, card: dict[str, Any], pngs: dict[str, bytes], root: Path) -> None:
    """One ``preprocess`` W&B run: params + augmentation as config, card as summary, PNGs, augment.json artifact."""
    aug_dict = json.loads((Path(root) / "augment.json").read_text())
    config = {**params.resolved(), "augmentation": aug_dict, "dataset": {k: card[k] for k in ("classes", "image_size", "resize_mode")}}
    tracker = tracking.start(params, job_type="preprocess", name="preprocess", config=config)
    if not tracker.enabled:
        return
    with tempfile.TemporaryDirectory(prefix="cvpipe-card-") as tmp, tracker:
        images = {}
        for name, data in pngs.items():
            path = os.path.join(tmp, name)
            Path(path).write_bytes(data)
            images[f"dataset/{Path(name).stem}"] = tracker.image(path, caption=name)
        tracker.log({k: v for k, v in images.items() if v is not None})
        tracker.summary({f"dataset/{k}": v for k, v in _numeric({k: v for k, v in card.items() if k != "seconds"}).items()})
        for fname in ("augment.json", "eval_transform.json"):
            tracker.log_artifact(Path(root) / fname, name=Path(fname).stem.replace("_", "-"), type="augmentation")
        tracker.log_artifact(Path(root) / "near_duplicates.csv", name="near-duplicates", type="dataset-report")
        log_dataset_artifact(tracker, root, card)


def log_dataset_artifact(tracker: tracking.Tracker, root: Path, card: dict[str, Any]):
    """The prepared dataset as the W&B ``dataset`` artifact, where the lineage starts: its identifying files
    (:func:`cvpipe.data.prepared.lineage_files`: meta.json with the fingerprint of every array, classes,
    augmentation, each split's index of ingest ids = content hashes). train records using it."""
    meta = json.loads((Path(root) / "meta.json").read_text())
    metadata = {"fingerprint": meta.get("fingerprint"), "classes": card.get("classes"), "image_size": card.get("image_size"),
                "splits": {name: s.get("count") for name, s in (card.get("splits") or {}).items()}}
    return tracker.log_artifact(prepared.lineage_files(root), name=prepared.ARTIFACT, type="dataset", metadata=metadata)
