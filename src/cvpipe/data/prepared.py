"""The prepared dataset format, shared by preprocess (writer) and train/evaluate (readers).

Layout of ``<paths.prepared>/`` (format version 1)::

    classes.json            ["ants", "bees", ...]  (index = label id)
    meta.json               format version, image size, resize mode, per-split counts,
                            RGB mean/std of the train split (0..1 scale), and a
                            ``fingerprint`` (SHA-256 over every other file)
    augment.json            training augmentation (albumentations ``to_dict``)
    eval_transform.json     derived eval transform (resize only; albumentations ``to_dict``)
    near_duplicates.csv     group, id, label, split, source_uri of every near-duplicate group
    <split>/images.npy      uint8 array (N, H, W, 3), NumPy .npy, read memory-mapped
    <split>/labels.npy      int64 array (N,)
    <split>/shards/, shards.json, offsets.npy   instead of images.npy with ``preprocess.format: shards``
                            (WebDataset tar shards: :mod:`cvpipe.data.shards`)
    <split>/index.csv       row -> id, label, source_uri, augmented_from (traceability back
                            to ingest; ``augmented_from`` names the source image of rows
                            added by ``preprocess.oversample``, empty otherwise)

A ``gs://`` (any fsspec URL) root is copied down once into
``$CVPIPE_CACHE/prepared/<fingerprint>/`` and read locally from there; a new
preprocess run has a new fingerprint, so a stale copy is never read. Shards are
the exception: only the small files come down, and the shards are read (streamed)
where they are.

Why this format: an epoch is a walk over a memory-mapped uint8 array, so random
access costs a page-cache read with no JPEG decode; the whole sample set fits
in RAM and in the OS cache; the files are plain NumPy that any tool can open.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cvpipe.core import storage
from cvpipe.core.errors import StageError
from cvpipe.data import shards

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ["row", "id", "label", "source_uri", "augmented_from"]


class Split:
    """One split, memory-mapped (or :class:`~cvpipe.data.shards.ShardImages` for shards, with the same
    indexing). ``images[i]`` is an (H, W, 3) uint8 array; ``index`` (index.csv's rows)
    is read on first use: training needs only images and labels, and the rows cost about half a
    kilobyte of Python objects per image (half a gigabyte at a million)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray,
                 index: Optional[list[dict[str, str]]] = None, index_path: Optional[Path] = None):
        self.name, self.images, self.labels = name, images, labels
        self.shards = images if not isinstance(images, np.ndarray) else None  # ShardImages of a sharded split
        self._index, self._index_path = index, index_path

    @property
    def index(self) -> list[dict[str, str]]:
        if self._index is None:
            if self._index_path is None:
                raise StageError(f"split {self.name} has no index.csv")
            with open(self._index_path, newline="", encoding="utf-8") as fh:
                self._index = list(csv.DictReader(fh))
            if len(self._index) != len(self):
                raise StageError(f"{self._index_path}: {len(self._index)} rows but {len(self)} labels")
        return self._index

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class PreparedDataset:
    def __init__(self, root: str | Path):
        self.source = str(root)
        self.root = Path(fetch(root)) if storage.is_remote(root) else Path(root)
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
        base = storage.join(self.source, name) if storage.is_remote(self.source) else str(d)
        images = shards.load_split(base, d, self.image_size)
        if images is None:
            images = np.load(d / "images.npy", mmap_mode="r")
        labels = np.load(d / "labels.npy")
        if images.shape[0] != labels.shape[0]:
            raise StageError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels")
        if not (d / "index.csv").exists():
            raise StageError(f"prepared dataset {self.root}: '{name}' has no index.csv (rerun `cvpipe preprocess`)")
        return Split(name, images, labels, index_path=d / "index.csv")


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
        storage.write_csv(  # inside a staged folder: no fsync, the folder's swap publishes it
            self.dir / "index.csv", INDEX_COLUMNS,
            ([i, r["id"], r["label"], r["source_uri"], r.get("augmented_from", "")] for i, r in enumerate(index_rows)),
            durable=False,
        )


def fingerprint(root: Path) -> str:
    """SHA-256 over every file of a dataset folder except meta.json (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != "meta.json"):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


ARTIFACT = "dataset"  # the W&B artifact of the prepared dataset (type dataset): logged by preprocess, used by train
LINEAGE_FILES = ("meta.json", "classes.json", "augment.json", "eval_transform.json")


def lineage_files(root: str | Path) -> dict[str, Path]:
    """The small files that identify a prepared dataset, by their name inside it: meta.json (with the
    fingerprint of every array), the classes, the augmentation and every split's index.csv (each row's
    ingest id, i.e. the image's content hash). Preprocess logs them as the W&B ``dataset`` artifact and
    train, which reads the same folder, names the same files when it records using it (equal content,
    equal digest). The arrays stay out: the fingerprint pins them and uploading them would double the data."""
    root = Path(root)
    files = {name: root / name for name in LINEAGE_FILES if (root / name).is_file()}
    for index in sorted(root.glob("*/index.csv")):
        files[index.relative_to(root).as_posix()] = index
    return files


def write_meta(root: Path, classes: list[str], meta: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
    """Write classes.json and, last, meta.json with the fingerprint of everything else."""
    (root / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    full = {"format_version": FORMAT_VERSION, **meta, **(extra or {}), "fingerprint": fingerprint(root)}
    (root / "meta.json").write_text(json.dumps(full, indent=2) + "\n")


def fetch(uri: str | Path, cache_root: Optional[Path] = None) -> Path:
    """Copy a remote prepared dataset down once, keyed by its fingerprint; return the local folder."""
    meta_uri = storage.join(uri, "meta.json")
    if not storage.exists(meta_uri):
        raise StageError(f"no prepared dataset at {uri} (missing meta.json): run `cvpipe preprocess` first")
    meta = storage.read_json(meta_uri)
    key = meta.get("fingerprint") or hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    root = Path(cache_root or os.environ.get("CVPIPE_CACHE", Path.home() / ".cache" / "cvpipe"))
    dest = root / "prepared" / key[:32]
    if (dest / "meta.json").exists():
        return dest
    fs, path = storage.get_fs(uri)
    base = path.rstrip("/") + "/"
    with storage.staged_dir(dest) as tmp:
        for remote in fs.find(base):  # every file but the shards, which are streamed from where they are
            rel = remote[len(base):]
            if "/shards/" in "/" + rel:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(tmp / rel))
    return dest
