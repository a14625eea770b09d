"""Fast decode for preprocessing: JPEGs decoded at reduced scale by OpenCV, then the shared ``fit_array``.

Decoding dominates preprocessing time. libjpeg can decode at 1/2, 1/4 or 1/8
scale (DCT scaling, the same mechanism as Pillow's draft mode); OpenCV's
``IMREAD_REDUCED_COLOR_*`` reaches it with less per-call overhead than Pillow's
chunked decoder (about 1.3x faster on the hymenoptera photos). The scale is the
smallest that keeps the *shorter* side >= the target size, so every resize mode
still downsamples. The resize itself is :func:`cvpipe.data.images.fit_array`, the
one resize the app uses too, so training and serving see the same pixels.
Pixels stay NumPy arrays from decode to the output row (no PIL round trips).

OpenCV applies EXIF orientation like Pillow's ``exif_transpose`` (stored
images are upright anyway: ingest re-encodes EXIF-rotated files); non-JPEG
images and anything OpenCV cannot read go through Pillow (:func:`cvpipe.data.images.open_for_size`).

:func:`resize_all` runs decode + resize + perceptual hash over worker
processes. This module imports OpenCV at import time, before any pool forks,
so forked workers start with it loaded (importing it costs each worker ~40 ms,
a tenth of a 400-image pass; its only thread at import is OpenBLAS's server,
fork-safe like NumPy's).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from cvpipe.core.errors import StageError
from cvpipe.data.images import DEFAULT_MAX_PIXELS, allow_pixels, fit_array, open_for_size

_JPEG_MAGIC = b"\xff\xd8\xff"
HASH_MIN_SIDE = 64  # perceptual hashes of resized/recompressed copies stay within ~4 bits from here up


_DCT8 = np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)  # DCT-II rows 0..7, N=32


def phash(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB (H, W, 3) or grayscale (H, W) uint8 array, as an int.

    The algorithm of ``imagehash.phash`` (grayscale, 32x32, 2-D DCT-II, the 8x8
    lowest frequencies compared with their median; bit order row-major) with
    two speed-ups that matter when hashing every image of a dataset: the
    32x32 thumbnail is an area average (OpenCV's ``INTER_AREA``, several times
    cheaper than LANCZOS and just as antialiased), and only the 8x8 DCT
    coefficients that are used are computed (two small matrix products). On the
    same 32x32 grayscale input the bits equal ``imagehash.phash``'s.
    """
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    if gray.shape != (32, 32):
        gray = cv2.resize(np.ascontiguousarray(gray), (32, 32), interpolation=cv2.INTER_AREA)
    x = gray.astype(np.float64)
    low = _DCT8 @ x @ _DCT8.T
    bits = (low > np.median(low)).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _reduced_flag(factor: int) -> tuple[int, bool]:
    """imdecode flags for a 1/factor decode, and whether they already give RGB.

    OpenCV >= 4.11 decodes straight to RGB (``IMREAD_COLOR_RGB``), which saves a
    full-image channel-swap copy (about 10% of the decode here).
    """
    reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[factor]
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if rgb is not None:
        return reduced | rgb, True
    return reduced | cv2.IMREAD_COLOR, False


def scale_factor(width: int, height: int, size: int) -> int:
    """Largest of 1, 2, 4, 8 that keeps the shorter side at least ``size`` after decoding."""
    factor = 1
    while factor < 8 and min(width, height) // (factor * 2) >= size:
        factor *= 2
    return factor


def decode_for_size(data: bytes, size: int, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Upright RGB (H, W, 3) uint8 array from encoded bytes, decoded at the coarsest scale that covers ``size``.

    ``shape`` is the image's (width, height) when already known (ingest's
    manifest has it), which saves parsing the header again; only the shorter
    side matters, so EXIF rotation does not change the scale.
    """
    if data[:3] == _JPEG_MAGIC:
        try:
            trusted = shape is not None
            if shape is None:
                with Image.open(io.BytesIO(data)) as header:  # header only: no pixels decoded
                    shape = header.size
            # OpenCV applies EXIF orientation itself (stored images are upright anyway)
            factor = scale_factor(shape[0], shape[1], size)
            flags, is_rgb = _reduced_flag(factor)
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
            if arr is not None and arr.ndim == 3:
                if trusted and factor > 1 and min(arr.shape[:2]) < size:  # the given shape was wrong
                    return decode_for_size(data, size)
                return arr if is_rgb else np.ascontiguousarray(arr[..., ::-1])  # BGR -> RGB
        except (OSError, ValueError):
            pass
    return np.asarray(open_for_size(data, size))


# ----------------------------------------------------------------------------- parallel resize

_mm_cache: dict[str, np.ndarray] = {}


def _open_out(out_path: str) -> np.ndarray:
    arr = _mm_cache.get(out_path)
    if arr is None:
        arr = np.load(out_path, mmap_mode="r+")
        _mm_cache.clear()
        _mm_cache[out_path] = arr
    return arr


def _resize_chunk(base_dir: str, out_path: str, rows: Sequence[tuple[int, str, Optional[tuple[int, int]]]],
                  size: int, mode: str, want_hash: bool) -> list[tuple[int, int]]:
    """Decode, resize and (optionally) hash ``rows`` of (output index, path, (width, height) or None) into the memmap.

    Returns ``(index, 64-bit perceptual hash)`` pairs (hash 0 when not asked for).
    """
    arr = _open_out(out_path)
    hashes = []
    for i, rel, shape in rows:
        path = os.path.join(base_dir, rel)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            # the hash needs a little detail: decode at >= HASH_MIN_SIDE even for tiny targets
            img = decode_for_size(data, max(size, HASH_MIN_SIDE) if want_hash else size, shape)
            fitted = fit_array(img, size, mode)
            arr[i] = fitted
            if want_hash:  # hash what training sees (the fitted image): a 4x area-average away from 32x32
                hashes.append((i, phash(fitted if size >= HASH_MIN_SIDE else fit_array(img, HASH_MIN_SIDE, mode))))
            else:
                hashes.append((i, 0))
        except (OSError, ValueError, SyntaxError) as exc:
            raise StageError(f"cannot read {path}: {exc} (rerun `cvpipe ingest`)") from None
    # no msync: the mapping is shared, so the parent sees these pages through the page cache
    return hashes


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1 << 30  # unknown: never fork


_BASELINE_THREADS = _thread_count()  # at import: the interpreter plus NumPy's and OpenCV's BLAS servers (fork-safe)


def _pool_context():
    """``fork`` (fast start) unless threads were started since import; then ``forkserver``.

    Forking while other threads hold locks can deadlock the children (seen with
    OpenCV's pool after an augmentation ran, when a child then called into
    OpenCV's threading). Workers run OpenCV single-threaded
    (:func:`_worker_init`), so they never start OpenCV's pool either.
    """
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    if "fork" in methods and _thread_count() <= _BASELINE_THREADS:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _worker_init(max_pixels: int) -> None:
    """One OpenCV thread per worker (the pool already runs one process per core); Pillow's bomb
    guard at ingest's limit (a forkserver worker does not inherit the parent's)."""
    cv2.setNumThreads(1)
    allow_pixels(max_pixels)


def resize_all(base_dir: str, rels: Sequence[str], out_path: str | Path, size: int, mode: str, workers: int,
               want_hash: bool = True, on_progress=None,
               shapes: Optional[Sequence[tuple[int, int]]] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize every image in ``rels`` (relative to ``base_dir``) into a new ``(N, size, size, 3)`` uint8 .npy.

    ``shapes`` are the images' (width, height) if known (from ingest's manifest),
    so JPEG headers are not parsed a second time.

    Runs over ``workers`` processes (each writes its rows straight into the
    shared memory-mapped file, so no pixels travel between processes).
    Returns the perceptual hashes (uint64, zeros when ``want_hash`` is false). ``max_pixels``
    (ingest's limit, which the stored images passed) keeps Pillow's bomb guard from refusing them.
    """
    allow_pixels(max_pixels)
    n = len(rels)
    out = np.lib.format.open_memmap(str(out_path), mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    out.flush()
    del out
    rows = [(i, rel, shapes[i] if shapes is not None else None) for i, rel in enumerate(rels)]
    hashes = np.zeros(n, dtype=np.uint64)
    step = on_progress or (lambda k: None)
    if workers <= 1 or n < 64:
        for s in range(0, n, 32):
            for i, h in _resize_chunk(base_dir, str(out_path), rows[s : s + 32], size, mode, want_hash):
                hashes[i] = h
            step(len(rows[s : s + 32]))
        _mm_cache.clear()
        return hashes
    chunk = max(8, min(64, n // (workers * 8)))
    chunks = [rows[s : s + chunk] for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_worker_init,
                             initargs=(max_pixels,)) as pool:
        futures = [pool.submit(_resize_chunk, base_dir, str(out_path), c, size, mode, want_hash) for c in chunks]
        for f, c in zip(futures, chunks):
            for i, h in f.result():
                hashes[i] = h
            step(len(c))
    return hashes
