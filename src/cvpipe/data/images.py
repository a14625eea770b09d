"""Decode and validate one image from bytes: the single gate every image passes.

Used by ingest (to decide manifest vs quarantine) and by the app (to refuse bad
uploads). The rules:

* the format is sniffed from the content (Pillow's decoders), never the extension;
* the header's pixel count is checked against ``max_pixels`` *before* decoding,
  so decompression bombs cost nothing;
* the whole image is decoded (truncated or corrupt data is caught here, not in
  the middle of training);
* EXIF orientation is applied; CMYK, 16-bit, float, palette, bilevel and
  alpha (composited on ``background``) images become 8-bit RGB; animations
  keep their first frame.

Rejections raise :class:`ImageRejected` with a stable reason code; so does any
other exception a decoder raises on malformed data (Pillow's plugins raise
``TypeError``, ``IndexError``, ``SyntaxError``, ``RuntimeError``... from header
fields such as ``n_frames``): a file's outcome never depends on where in the
decoder its damage is found. Only ``MemoryError`` passes through (the machine's
state, not the file's).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard stays on: some plugins allocate inside ``Image.open`` (a GIF frame with
# disposal 2 fills a background of the frame's size before we can read the header), and only
# Pillow's check runs before that. It refuses past 2x ``MAX_IMAGE_PIXELS`` and warns past 1x; the
# limit follows the largest ``max_pixels`` asked for (:func:`allow_pixels`), so Pillow never refuses
# what our own check (below) would accept, and the warning is silenced once here, at import
# (``warnings.catch_warnings`` per call is not thread-safe; ingest decodes in threads).
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default, ingest.max_pixels' default
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Reason codes written to quarantine.csv (stable: tests and users match on them).
EMPTY = "empty_file"
NOT_IMAGE = "not_an_image"
LFS_POINTER = "git_lfs_pointer"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect_ratio"

CLEAN_FORMATS = {"JPEG": "jpg", "PNG": "png"}

# Markers that may legitimately follow a JPEG scan (tables, next scan, comments,
# APPn, EOI, DNL): 0xFFC0..0xFFFE except the restart markers handled in-scan, and TEM.
_JPEG_RST = range(0xD0, 0xD8)
_SCAN_FF = re.compile(rb"\xff[\x01-\xff]")  # in scan data: a 0xFF that is not a stuffed 0xFF00


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    image: Optional[Image.Image]  # RGB, orientation applied; None when clean (the original bytes are the image)
    format: str  # sniffed container format, e.g. "JPEG"
    source_mode: str  # mode before conversion, e.g. "CMYK"
    width: int
    height: int
    frames: int
    clean: bool  # original bytes are already a plain RGB JPEG/PNG, upright, single frame

    def encoded(self, original: bytes) -> tuple[bytes, str]:
        """Bytes to store and their extension: the original when clean, else a normalized re-encode."""
        if self.clean:
            return original, CLEAN_FORMATS[self.format]
        buf = io.BytesIO()
        if self.format == "JPEG":
            # already lossy: keep it JPEG rather than inflating it to PNG
            self.image.save(buf, format="JPEG", quality=95, subsampling=0)
            return buf.getvalue(), "jpg"
        self.image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


def jpeg_structure(data: bytes) -> tuple[Optional[str], bool]:
    """Walk a JPEG's marker segments and entropy-coded scans:
    ``(first structural defect or None, whether the end-of-image marker was reached)``.

    A file cut short is not a defect here (Pillow's decoder reports it); it just
    never reaches the end-of-image marker.

    libjpeg *recovers* from garbage inside scan data (it prints "Corrupt JPEG
    data: ..." and keeps going, filling the damage with grey), and Pillow does not
    surface those warnings, so a fully decoded image can still be silently
    damaged. Garbage almost always breaks the byte-stuffing rule (every 0xFF in
    scan data is followed by 0x00 or a restart marker) or the restart-marker
    sequence; this walk catches exactly those. Damage that stays inside
    well-formed entropy data (a flipped bit that still decodes) is undetectable
    without a reference copy, by libjpeg too.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "missing JPEG start-of-image marker", False
    i = 2
    while i < n:
        if data[i] != 0xFF:
            return f"expected a marker at byte {i}, found 0x{data[i]:02X}", False
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None, False
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI: anything after it is trailing data cameras often append
            return None, True
        if marker in _JPEG_RST or marker == 0x01:
            continue
        if marker < 0xC0:
            return f"invalid marker 0xFF{marker:02X} at byte {i - 2}", False
        if i + 2 > n:
            return None, False  # cut short: the decoder reports truncation
        length = (data[i] << 8) | data[i + 1]
        if length < 2:
            return f"marker 0xFF{marker:02X} at byte {i - 2} has invalid length {length}", False
        i += length
        if marker != 0xDA:  # not start-of-scan: a plain segment
            continue
        expected_rst = 0
        while True:  # entropy-coded data up to the next real marker
            m = _SCAN_FF.search(data, i)  # skips the stuffed 0xFF00 pairs in C
            if m is None:
                return None, False  # no EOI: truncation, reported by the decoder
            j = m.start()
            nxt = data[j + 1]
            if nxt == 0xFF:  # a fill byte before a marker
                i = j + 1
                continue
            if nxt in _JPEG_RST:
                if nxt - 0xD0 != expected_rst:
                    return f"restart marker RST{nxt - 0xD0} out of sequence at byte {j} (expected RST{expected_rst})", False
                expected_rst = (expected_rst + 1) % 8
                i = j + 2
                continue
            if nxt < 0xC0 and nxt != 0x01:
                return f"invalid marker 0xFF{nxt:02X} inside scan data at byte {j}", False
            i = j
            break
    return None, False


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    max_aspect_ratio: Optional[float] = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> DecodedImage:
    """Fully decode *data* into an upright RGB image or raise :class:`ImageRejected`.

    Never raises anything else for any content (``MemoryError`` aside): an exception of any type
    from the decoders becomes ``ImageRejected(CORRUPT or TRUNCATED, "<type>: <message>")``.
    """
    try:
        return _decode_image(data, max_pixels, min_size, max_aspect_ratio, background)
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # a decoder bug on malformed data (e.g. n_frames of a damaged TIFF/GIF)
        msg = " ".join(str(exc).split())[:200]
        reason = TRUNCATED if ("truncat" in msg.lower() or isinstance(exc, EOFError)) else CORRUPT
        raise ImageRejected(reason, f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__) from None


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's bomb limit to *max_pixels* if it is lower (it only ever grows, so concurrent
    callers with different limits never make it stricter than what one of them allows). Readers of
    images ingest already validated (preprocess) call it with ``ingest.max_pixels``."""
    if (Image.MAX_IMAGE_PIXELS or 0) < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode_image(
    data: bytes,
    max_pixels: int,
    min_size: int,
    max_aspect_ratio: Optional[float],
    background: tuple[int, int, int],
) -> DecodedImage:
    if not data:
        raise ImageRejected(EMPTY, "0 bytes")
    if data.startswith(b"version https://git-lfs"):
        raise ImageRejected(LFS_POINTER, "a Git LFS pointer, not the file it points to")
    allow_pixels(max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = "text/HTML content" if _looks_like_text(data) else "unrecognized content"
        raise ImageRejected(NOT_IMAGE, kind) from None
    except Image.DecompressionBombError as exc:  # past 2x the largest max_pixels: refused before allocating
        raise ImageRejected(BOMB, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports a header cut short as OSError("Truncated File Read") and
        # malformed headers as SyntaxError/ValueError
        msg = str(exc)
        reason = TRUNCATED if "runcat" in msg else CORRUPT
        raise ImageRejected(reason, f"header: {msg}") from None

    fmt = img.format or "UNKNOWN"
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(BOMB, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")
    frames = int(getattr(img, "n_frames", 1) or 1)
    source_mode = img.mode
    # 48-bit PNGs open as mode "RGB" but are stored 16 bits per channel: not "clean"
    raw_modes = {t[3][0] if isinstance(t[3], tuple) else t[3] for t in (img.tile or []) if len(t) > 3}
    wide = any(isinstance(m, str) and "16" in m for m in raw_modes)
    walk = jpeg_structure(data) if fmt in ("JPEG", "MPO") else None  # once, for both paths
    if fmt == "JPEG" and source_mode == "RGB" and frames == 1 and _clean_jpeg_decodes(data, img, walk):
        # the common case, checked without Pillow's slower decoder; the bytes are stored as they are
        rgb, exif_orientation = None, 1
        w, h = width, height
    else:
        rgb, exif_orientation = _decode_with_pillow(img, frames, background, walk)
        w, h = rgb.size
    if min(w, h) < min_size:
        raise ImageRejected(TOO_SMALL, f"{w}x{h} is below min_size={min_size}")
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        raise ImageRejected(EXTREME_ASPECT, f"{w}x{h} exceeds max_aspect_ratio={max_aspect_ratio:g}")
    clean = (
        fmt in CLEAN_FORMATS
        and source_mode == "RGB"
        and not wide
        and frames == 1
        and exif_orientation in (1, None)
        and "transparency" not in img.info
    )
    return DecodedImage(
        image=rgb, format=fmt, source_mode=source_mode, width=w, height=h, frames=frames, clean=clean
    )


def _clean_jpeg_decodes(data: bytes, img: Image.Image, walk: tuple[Optional[str], bool]) -> bool:
    """True when an RGB, upright JPEG fully decodes with OpenCV and its structure is sound.

    The fast path for what most datasets are made of. The whole image is still
    decoded at full resolution (OpenCV's libjpeg-turbo call, ~1.2x faster than
    Pillow's chunked decoder here), so any fatal libjpeg error is caught; the
    marker walk catches the garbage libjpeg would conceal and a missing
    end-of-image marker (a cut-short file, which libjpeg silently pads where
    Pillow raises). Anything else returns False and Pillow decides, so the
    outcome for a damaged file is the same as without this path.
    """
    try:
        if img.getexif().get(0x0112, 1) not in (1, None):  # EXIF rotation: stored re-encoded upright
            return False
    except Exception:  # a malformed EXIF block: Pillow's path decides what it means
        return False
    problem, complete = walk  # jpeg_structure(data)
    if problem is not None or not complete:
        return False
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return arr is not None and arr.shape[:2] == (img.size[1], img.size[0])


def _decode_with_pillow(img: Image.Image, frames: int, background: tuple[int, int, int],
                        walk: Optional[tuple[Optional[str], bool]]) -> tuple[Image.Image, Optional[int]]:
    """Full decode by Pillow: ``(upright RGB image, EXIF orientation)``, or :class:`ImageRejected`.

    ``walk`` is :func:`jpeg_structure` of a JPEG's bytes (None for other formats):
    a structural defect is reported after the decode, so a truncation Pillow finds wins.
    """
    try:
        if frames > 1:
            img.seek(0)
        img.load()
        exif_orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
        # exif_transpose returns a full copy even when there is nothing to turn
        upright = img if exif_orientation in (1, None) else ImageOps.exif_transpose(img)
        rgb = _to_rgb(upright, background)
        rgb.load()
    except Image.DecompressionBombError as exc:  # pragma: no cover
        raise ImageRejected(BOMB, str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        msg = str(exc)
        reason = TRUNCATED if ("truncat" in msg.lower() or isinstance(exc, EOFError)) else CORRUPT
        raise ImageRejected(reason, msg) from None
    if walk is not None and walk[0]:
        raise ImageRejected(CORRUPT, f"damaged JPEG data ({walk[0]}); libjpeg would conceal it")
    return rgb, exif_orientation


def _resized(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """``arr`` resized to ``width x height``: area averaging when shrinking, bilinear when growing."""
    h, w = arr.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(arr)
    interp = cv2.INTER_AREA if width <= w and height <= h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(arr), (width, height), interpolation=interp)


def fit_array(arr: np.ndarray, size: int, mode: str = "shorter_side_center_crop") -> np.ndarray:
    """Resize an (H, W, 3) uint8 RGB array to ``(size, size, 3)``: the one resize used everywhere.

    Preprocess and the app both call this, so training and serving see the same pixels.

    * ``shorter_side_center_crop``: the centred square of the shorter side, scaled to *size*;
    * ``pad_to_square``: scale the longer side to *size*, pad with black;
    * ``stretch``: scale both sides to *size*, ignoring the aspect ratio.

    OpenCV's ``INTER_AREA`` (exact area averaging, antialiased) does the shrinking:
    about 2x faster than Pillow's bilinear with ``reducing_gap`` here, the same
    quality class. Only the region that survives a crop is resized.
    """
    h, w = arr.shape[:2]
    if mode == "stretch":
        return _resized(arr, size, size)
    if mode == "shorter_side_center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return _resized(arr[top : top + side, left : left + side], size, size)
    if mode == "pad_to_square":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top : top + nh, left : left + nw] = _resized(arr, nw, nh)
        return canvas
    raise ValueError(f"unknown resize mode {mode!r}")


def open_for_size(path_or_bytes, size: int) -> Image.Image:
    """Open an already-validated image as upright RGB, letting JPEG decode at reduced scale.

    Pillow's draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale directly
    (DCT scaling), which is several times faster for large photos. Pillow picks
    the smallest scale whose result is still at least ``size`` on *both* sides,
    so every resize mode (crop, pad, stretch) still downsamples and quality is
    unaffected. Non-JPEG images decode at full size (``fit_array`` then
    area-averages them down).
    """
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    img = Image.open(src)
    if img.format == "JPEG" and min(img.size) >= 2 * size:
        img.draft("RGB", (size, size))
    img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")
