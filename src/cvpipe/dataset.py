"""The prepared dataset format, shared by preprocess (writer) and train/evaluate (readers).

Layout of ``<paths.prepared>/`` (format version 1)::

    classes.json            ["ants", "bees", ...]  (index = label id)
    meta.json               format version, image size, resize mode, per-split counts,
                            RGB mean/std of the train split (0..1 scale)
    <split>/images.npy      uint8 array (N, H, W, 3), NumPy .npy, read memory-mapped
    <split>/labels.npy      int64 array (N,)
    <split>/index.csv       row -> id, label, source_uri (traceability back to ingest)

Why this format: an epoch is a walk over a memory-mapped uint8 array, so random
access costs a page-cache read with no JPEG decode; the whole sample set fits
in RAM and in the OS cache; the files are plain NumPy that any tool can open.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cvpipe import storage
from cvpipe.errors import StageError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split, memory-mapped. ``images[i]`` is an (H, W, 3) uint8 array."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    index: list[dict[str, str]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class PreparedDataset:
    def __init__(self, root: str | Path):
        local = storage.local_copy(root)
        self.root = Path(local)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise StageError(f"no prepared dataset at {root} (missing meta.json): run `cvpipe preprocess` first")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise StageError(
                f"{root} has dataset format {self.meta.get('format_version')}, this cvpipe reads {FORMAT_VERSION}: "
                "rerun `cvpipe preprocess`"
            )
        self.classes: list[str] = json.loads((self.root / "classes.json").read_text())

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def has_split(self, name: str) -> bool:
        return (self.root / name / "labels.npy").exists()

    def split(self, name: str) -> Split:
        d = self.root / name
        if not (d / "labels.npy").exists():
            raise StageError(f"prepared dataset {self.root} has no '{name}' split")
        images = np.load(d / "images.npy", mmap_mode="r")
        labels = np.load(d / "labels.npy")
        with open(d / "index.csv", newline="", encoding="utf-8") as fh:
            index = list(csv.DictReader(fh))
        if images.shape[0] != labels.shape[0]:
            raise StageError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels")
        return Split(name, images, labels, index)


class SplitWriter:
    """Write one split's arrays into a (staged) dataset folder."""

    def __init__(self, root: Path, name: str, n: int, image_size: int):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images = np.lib.format.open_memmap(
            self.dir / "images.npy", mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3)
        )
        self.path = self.dir / "images.npy"

    def finish(self, labels: Sequence[int], index_rows: Sequence[dict[str, Any]]) -> None:
        self.images.flush()
        del self.images
        np.save(self.dir / "labels.npy", np.asarray(labels, dtype=np.int64))
        with open(self.dir / "index.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["row", "id", "label", "source_uri"], lineterminator="\n")
            w.writeheader()
            for i, r in enumerate(index_rows):
                w.writerow({"row": i, "id": r["id"], "label": r["label"], "source_uri": r["source_uri"]})


def write_meta(root: Path, classes: list[str], meta: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
    (root / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    full = {"format_version": FORMAT_VERSION, **meta, **(extra or {})}
    (root / "meta.json").write_text(json.dumps(full, indent=2) + "\n")
