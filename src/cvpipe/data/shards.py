"""The sharded prepared format (``preprocess.format: shards``): WebDataset tar shards.

Layout of one split (beside the arrays format's ``labels.npy`` and ``index.csv``, which stay)::

    <split>/shards/000000.tar   WebDataset samples: <row>.jpg (or .png, .npy), <row>.cls, <row>.id.txt
    <split>/shards.json          encoding, and each shard's name, first row and count
    <split>/offsets.npy          int64 (N, 2): byte offset and size of each image inside its shard

Why WebDataset (compared with MosaicML streaming's MDS and LitData): its shards are plain POSIX tar
files that ``tar``, ``gsutil`` and any language read, with no index or server needed to stream them;
it is the reader timm and OpenCLIP stream with (``webdataset.WebDataset(urls)`` reads cvpipe's shards
as they are, tested); everything is a byte stream, so ``gs://`` comes through fsspec (as every other
cvpipe path) rather than a per-cloud client. cvpipe writes with WebDataset's ``TarWriter`` and shuffles
with its buffer shuffle, but slices each image out of sequential reads by ``offsets.npy`` rather than
parsing tar headers (:meth:`ShardImages.stream` says why). MDS and LitData resume a
deterministic order across a changed world size on their own, but only through their own writers,
cache daemons and index formats. cvpipe keeps that part here, where it is small: the epoch's order is a
pure function of (seed, epoch, number of shards and of loader slots), see :func:`slot_plan`, so a
restarted run, on any world size, reads the same stream from its start.

``offsets.npy`` gives random access too (evaluate, the audit and the dataset card read a few images
or the split in order): one ranged read per run of rows in a shard, no tar scan.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from cvpipe.core import storage
from cvpipe.core.errors import StageError

ENCODINGS = ("png", "jpg", "npy")
MANIFEST = "shards.json"
NPY_MAGIC = b"\x93NUMPY"


def encode(image: np.ndarray, encoding: str, quality: int) -> bytes:
    """RGB uint8 -> PNG (lossless: decodes to the same pixels) or JPEG bytes, by OpenCV; or ``npy``: the
    pixels themselves in NumPy's ``.npy`` format (WebDataset's extension for arrays), no decode at all."""
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
        return buf.getvalue()
    import cv2

    bgr = np.ascontiguousarray(image[..., ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode("." + encoding, bgr, params)
    if not ok:
        raise StageError(f"could not encode an image as {encoding}")
    return buf.tobytes()


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes (JPEG, PNG or ``.npy``, told apart by their magic bytes) -> RGB uint8 (H, W, 3).
    An ``.npy`` image is a read-only view of *data*, as a row of the arrays format's memory map is."""
    if data[:6] == NPY_MAGIC:
        return _npy_pixels(data)
    import cv2

    rgb = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise StageError("a shard holds an image that does not decode: rerun `cvpipe preprocess`")
    return rgb


_NPY_HEADERS: dict[bytes, tuple[int, tuple[int, ...]]] = {}


def _npy_pixels(data: bytes) -> np.ndarray:
    """The uint8 (H, W, 3) array of ``.npy`` bytes, without ``np.load``'s per-call header parse (a
    ``literal_eval``, as long as the copy of a 128 px image): the images of a split share one header,
    so each distinct header is parsed once, by NumPy's own reader, and remembered."""
    fmt = np.lib.format
    width = 2 if data[6:7] == b"\x01" else 4  # header length field: 2 bytes in version 1.0, 4 after
    start = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    header = bytes(data[:start])
    known = _NPY_HEADERS.get(header)
    if known is None:
        fh = io.BytesIO(header)
        try:
            version = fmt.read_magic(fh)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
        except ValueError:
            raise StageError("a shard holds an .npy image whose header does not parse: rerun `cvpipe preprocess`") from None
        if dtype != np.uint8 or fortran or len(shape) != 3 or shape[2] != 3:
            raise StageError(f"a shard holds a {dtype} array of shape {shape}, not an RGB uint8 image: "
                             "rerun `cvpipe preprocess`")
        known = _NPY_HEADERS.setdefault(header, (start, tuple(shape)))
    start, shape = known
    if len(data) - start != int(np.prod(shape)):
        raise StageError("a shard holds a truncated image: rerun `cvpipe preprocess`")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def write_split(split_dir: Path, images: np.ndarray, labels: Sequence[int], ids: Sequence[str],
                shard_size: int, encoding: str, quality: int) -> dict[str, Any]:
    """Write *images* (N, H, W, 3) as WebDataset shards of *shard_size* samples under ``split_dir/shards``,
    with ``offsets.npy`` and ``shards.json``; returns the manifest. Tars are reproducible (fixed mtime)."""
    import tarfile

    from webdataset import TarWriter

    out = split_dir / "shards"
    out.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    offsets = np.zeros((n, 2), dtype=np.int64)
    shards = []
    for first in range(0, n, shard_size):
        name = f"shards/{first // shard_size:06d}.tar"
        last = min(first + shard_size, n)
        with open(split_dir / name, "wb") as fh, TarWriter(fh, encoder=False, mtime=0) as sink:
            for row in range(first, last):
                sink.write({"__key__": f"{row:09d}", encoding: encode(np.asarray(images[row]), encoding, quality),
                            "cls": str(int(labels[row])).encode(), "id.txt": str(ids[row]).encode()})
        with tarfile.open(split_dir / name) as tar:  # headers only: where each image's bytes sit
            for member in tar.getmembers():
                if member.name.endswith("." + encoding):
                    row = int(member.name.split(".", 1)[0])
                    offsets[row] = (member.offset_data, member.size)
        shards.append({"name": name, "first": first, "count": last - first})
    np.save(split_dir / "offsets.npy", offsets)
    manifest = {"encoding": encoding, "quality": quality if encoding == "jpg" else None, "shards": shards}
    (split_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class ShardImages:
    """Random access to a sharded split's images, like the arrays format's memory map: ``images[i]``,
    ``images[a:b]`` and ``images[list_of_rows]`` decode to uint8 (..., H, W, 3). *base* is the split's
    folder, local or any fsspec URL; a run of consecutive rows in one shard is one ranged read."""

    def __init__(self, base: str, manifest: dict[str, Any], offsets: np.ndarray, image_size: int):
        self.base, self.manifest, self.offsets = base, manifest, offsets
        self.firsts = np.asarray([s["first"] for s in manifest["shards"]], dtype=np.int64)
        self.shape = (len(offsets), image_size, image_size, 3)
        self.dtype = np.dtype(np.uint8)
        self._fs, self._root = storage.get_fs(base)

    def __len__(self) -> int:
        return self.shape[0]

    def url(self, shard: int) -> str:
        return storage.join(self.base, self.manifest["shards"][shard]["name"])

    def open(self, shard: int):
        return self._fs.open(self._root.rstrip("/") + "/" + self.manifest["shards"][shard]["name"], "rb")

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            row = int(key) + len(self) if key < 0 else int(key)
            return self.read(np.asarray([row]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self.read(rows.astype(np.int64))

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a split of {len(self)} images")
        shard_of = np.searchsorted(self.firsts, rows, side="right") - 1
        order = np.lexsort((rows, shard_of))
        for run in np.split(order, np.flatnonzero(np.diff(shard_of[order])) + 1):  # one shard's rows: one byte range
            if len(run):
                self._read_run(int(shard_of[run[0]]), rows, run, out)
        return out

    def stream(self, shard: int, every: int = 1, keep: int = 0, window: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
        """(row, encoded image) of one shard in row order, every *every*-th from position *keep*: sequential
        reads of at most *window* bytes (or one image), each image's bytes located by ``offsets.npy``.

        Written here rather than through WebDataset's tar iterator (which wrote the shards, and reads them
        the same): that iterator parses every 512-byte member header in Python's ``tarfile``, three members
        per sample, measured at 84 us per image, two thirds of a 128 px JPEG's decode; the offsets make it
        a slice. Memory stays at one window however large the shard."""
        info = self.manifest["shards"][shard]
        rows = np.arange(info["first"], info["first"] + info["count"], dtype=np.int64)[keep::every]
        starts = self.offsets[rows, 0]
        ends = starts + self.offsets[rows, 1]
        with self.open(shard) as fh:
            i = 0
            while i < len(rows):
                lo = int(starts[i])
                j = max(i + 1, int(np.searchsorted(ends, lo + window, side="right")))
                fh.seek(lo)
                blob = fh.read(int(ends[j - 1]) - lo)
                for k in range(i, j):
                    yield int(rows[k]), blob[starts[k] - lo : ends[k] - lo]
                i = j

    def _read_run(self, shard: int, rows: np.ndarray, picks: np.ndarray, out: np.ndarray) -> None:
        spans = self.offsets[rows[picks]]
        lo, hi = int(spans[:, 0].min()), int((spans[:, 0] + spans[:, 1]).max())
        if hi - lo > 64 << 20:  # scattered rows: one read each rather than the whole range
            with self.open(shard) as fh:
                for p, (off, size) in zip(picks, spans):
                    fh.seek(int(off))
                    out[p] = decode(fh.read(int(size)))
            return
        with self.open(shard) as fh:
            fh.seek(lo)
            blob = fh.read(hi - lo)
        for p, (off, size) in zip(picks, spans):
            out[p] = decode(blob[off - lo : off - lo + size])


def load_split(base: str, local_dir: Path, image_size: int) -> Optional[ShardImages]:
    """The split's :class:`ShardImages` when *local_dir* holds a sharded split (its shards at *base*), else None."""
    path = local_dir / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    offsets = np.load(local_dir / "offsets.npy")
    return ShardImages(base, manifest, offsets, image_size)


# ----------------------------------------------------------------------------- the streaming order


def slot_plan(counts: Sequence[int], seed: int, epoch: int, slots: int) -> list[list[tuple[int, int, int]]]:
    """Which samples each of *slots* loader slots (``world_size x workers``, slot = rank x workers + worker)
    reads in *epoch*, as (shard, keep_every, keep_offset) triples in reading order.

    The shards are permuted by (seed, epoch). With at least as many shards as slots, slot s reads
    shards ``perm[s::slots]`` whole: each shard is read by one slot, so I/O scales out. With fewer (a
    small split, many ranks), every slot reads every shard and keeps the samples whose running position
    is s modulo *slots*. Either way, every sample of the split is read by exactly one slot per epoch.
    """
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(counts)).tolist()
    if len(counts) >= slots:
        return [[(shard, 1, 0) for shard in perm[s::slots]] for s in range(slots)]
    return [[(shard, slots, s) for shard in perm] for s in range(slots)]


def slot_length(total: int, slots: int, batch: int, drop_last: bool) -> int:
    """Samples every slot yields per epoch: the same for all, so every rank takes the same number of
    steps (DDP needs it), a whole number of batches. A slot short of it starts its stream again (as
    PyTorch's DistributedSampler pads); one with more stops early (its rest comes first another epoch)."""
    per = -(-total // slots)
    whole = (total // slots) // batch * batch
    if drop_last and whole:
        return whole
    return -(-per // batch) * batch


def iter_samples(images: "ShardImages", labels: np.ndarray, plan: list[tuple[int, int, int]]
                 ) -> Iterator[tuple[int, bytes, int]]:
    """(row, encoded image, label) of one slot's plan, in shard order (:meth:`ShardImages.stream`)."""
    for shard, every, keep in plan:
        for row, data in images.stream(shard, every, keep):
            yield row, data, int(labels[row])


def shuffled(samples: Iterator, buffer: int, seed: int, epoch: int, slot: int) -> Iterator:
    """WebDataset's buffer shuffle with a generator fixed by (seed, epoch, slot): the same order on every rerun."""
    from webdataset.filters import shuffle

    if buffer <= 1:
        return samples
    rng = random.Random(int(np.random.default_rng([seed, epoch, slot, 0xB0F]).integers(1 << 62)))
    return shuffle(bufsize=buffer, initial=buffer, rng=rng)(samples)
