"""Seeded fuzzing of the one image gate, :func:`cvpipe.data.images.decode_image`, and of the app's
``/predict`` (issue #15): mutated real images of every format cvpipe reads must be decoded or
refused with :class:`~cvpipe.data.images.ImageRejected` (never any other exception), and the app
must answer every one of them with 200 or a 4xx (never a 5xx).

* **Seed corpus** (``tests/data/fuzz_corpus/``, committed): small images (32-80 px) drawn by
  :func:`make_corpus` (``python tests/test_fuzz.py --make-corpus``) from seeded synthetic
  "photos" (smooth colour fields, shapes, sensor-like noise: real photos are never committed),
  in JPEG, PNG, GIF, TIFF, WebP, BMP and AVIF: baseline, progressive,
  restart-marker, CMYK, grey and EXIF-rotated JPEGs; RGB, palette+tRNS, 16-bit grey, 48-bit,
  RGBA, bilevel and animated PNGs; single and animated GIFs; raw, LZW, JPEG-in-TIFF, 3-page,
  16-bit, CMYK, float and palette TIFFs; lossy, lossless+alpha, animated and EXIF WebPs; 24-bit,
  32-bit, palette and bilevel BMPs; RGB, alpha, animated and EXIF-rotated AVIFs.
* **Mutations** (Hypothesis, seeded with ``@seed`` per test, ``database=None``, fixed
  ``max_examples``): one to three stacked, each drawn from bit flips, byte replacements with
  boundary bytes, truncation (anywhere, or in the last bytes), range deletion, duplication and
  random insertion, splicing two seeds of one format, *header fields* (every length, size,
  count, offset and dimension field the format parsers below find, set to 0, 1, +-1, x2, the
  field's maximum, signed boundaries, other offsets of the file...), *chunks/segments/boxes/
  frames* dropped, duplicated, swapped, or corrupted inside (PNG chunks with the CRC
  recomputed, so the damage gets past the CRC check), and *frame counts* (GIF frames and WebP
  ANMF chunks duplicated or dropped, APNG ``acTL``, TIFF IFD chains looped or cut, AVIF sample
  tables, a JPEG concatenated with itself).
* **Properties**: per format, ``CASES_PER_FORMAT`` mutated files through ``decode_image`` with
  ingest's limits, then what ingest does with a decoded image (``encoded()``) and what
  preprocess does with the stored bytes (``decode_for_size``); ``APP_CASES`` mutated files of
  all formats through ``/predict`` of an in-process app (an untrained 2-class model: the app's
  behaviour, not the model's, is under test). Every file in ``tests/data/decoder_crashers/``
  and in the corpus goes through both on every run.
* **Memory before the limits**: a GIF whose first frame claims a huge extent (found by the field
  mutations) must be refused without allocating that extent (measured in a fresh interpreter).

A failing case is written to ``$CVPIPE_FUZZ_FAILURES`` (default ``<tmp>/cvpipe-fuzz-failures``)
and named in the error: move it to ``tests/data/decoder_crashers/`` to keep it as a regression.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from cvpipe.data import images
from cvpipe.data.images import DecodedImage, ImageRejected, decode_image

# Pillow warns about every damaged tag it skips: thousands of lines that say nothing here
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")]

HERE = Path(__file__).parent
CORPUS = HERE / "data" / "fuzz_corpus"
CRASHERS = HERE / "data" / "decoder_crashers"
FAILURES = Path(os.environ.get("CVPIPE_FUZZ_FAILURES", Path(tempfile.gettempdir()) / "cvpipe-fuzz-failures"))

FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP", "AVIF")
EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp", "AVIF": "avif"}
# Hypothesis repeats itself now and then (its simplest choices collide): distinct files are what
# is counted and asserted; the examples drawn are a little more
CASES_PER_FORMAT = 720  # distinct mutated files per format, at least: 7 x 720 = 5,040 through the decoder per run
EXAMPLES_PER_FORMAT = 960  # ~780-830 distinct files per format
APP_CASES = 600  # distinct mutated files of all formats through /predict, at least
APP_EXAMPLES = 700
# ingest's limits (IngestParams), except max_pixels: a mutated header may declare up to this many
# pixels and be decoded (12 MB of RGB), which bounds each case's time and memory; larger ones are
# refused as bombs before decoding, as they are with ingest's 89 M
DECODER_LIMITS = {"max_pixels": 1 << 22, "min_size": 8, "max_aspect_ratio": 20.0, "background": (255, 255, 255)}
REASONS = {images.EMPTY, images.NOT_IMAGE, images.LFS_POINTER, images.TRUNCATED, images.CORRUPT, images.BOMB,
           images.TOO_SMALL, images.EXTREME_ASPECT}
MAX_BYTES = 256 * 1024  # a mutation never grows a file past this

FUZZ_SETTINGS = dict(
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# ============================================================================ the corpus


def sniff(data: bytes) -> Optional[str]:
    """The container format from the magic bytes (what the mutators parse), or None."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] in (b"GIF8",):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[4:8] == b"ftyp":
        return "AVIF"
    return None


def load_corpus() -> dict[str, list[tuple[str, bytes]]]:
    seeds: dict[str, list[tuple[str, bytes]]] = {f: [] for f in FORMATS}
    for path in sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []:
        data = path.read_bytes()
        fmt = sniff(data)
        if fmt is not None:
            seeds[fmt].append((path.name, data))
    return seeds


SEEDS = load_corpus()
CRASHER_FILES = sorted(p for p in CRASHERS.iterdir() if p.is_file()) if CRASHERS.is_dir() else []


def synthetic_photo(seed: int, w: int = 160, h: int = 120):
    """A seeded photo-like RGB image: a smooth two-colour field, a few soft shapes and sensor-like noise
    (what the codecs' paths care about: gradients, edges and texture, not content)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (np.cos(rng.uniform(0, np.pi)) * xx / w + np.sin(rng.uniform(0, np.pi)) * yy / h)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 * (1 - t) + c1 * t).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(-w / 4, w), rng.uniform(-h / 4, h)
        box = [x0, y0, x0 + rng.uniform(w / 8, w / 2), y0 + rng.uniform(h / 8, h / 2)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(img, np.float64) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def make_corpus(out: Path = CORPUS) -> None:
    """Write the seed corpus from seeded synthetic photos; run by hand, committed."""
    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    photo = [synthetic_photo(seed) for seed in (1, 2, 3, 4)]

    def fit(i: int, w: int, h: int) -> Image.Image:
        return ImageOps.fit(photo[i], (w, h), Image.Resampling.LANCZOS)

    def exif(orientation: int) -> bytes:
        e = Image.Exif()
        e[0x0112] = orientation
        return e.tobytes()

    def gradient_alpha(img: Image.Image) -> Image.Image:
        w, h = img.size
        a = Image.linear_gradient("L").resize((w, h)).point(lambda v: 40 + v * 215 // 255)
        rgba = img.convert("RGBA")
        rgba.putalpha(a)
        return rgba

    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    rgb, rgb2, rgb3 = fit(0, 64, 48), fit(1, 64, 48), fit(2, 64, 48)
    small = [fit(i, 48, 32) for i in range(3)]
    pal = rgb.quantize(16)
    pal_t = rgb.quantize(16)
    pal_t.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)

    # JPEG
    fit(0, 80, 60).save(out / "jpeg_baseline_420.jpg", quality=85)
    rgb2.save(out / "jpeg_progressive_444.jpg", quality=90, progressive=True, subsampling=0)
    rgb3.save(out / "jpeg_restart_optimized.jpg", quality=80, restart_marker_blocks=2, optimize=True)
    rgb.convert("CMYK").save(out / "jpeg_cmyk.jpg", quality=85)
    rgb2.convert("L").save(out / "jpeg_gray.jpg", quality=85)
    fit(3, 48, 64).save(out / "jpeg_exif_orient6.jpg", quality=85, exif=exif(6))
    # PNG
    rgb.save(out / "png_rgb.png")
    pal_t.save(out / "png_palette_trns.png")
    gray16.save(out / "png_gray16.png")
    gradient_alpha(rgb2).save(out / "png_rgba.png")
    (out / "png_rgb48.png").write_bytes(
        cv2.imencode(".png", (np.asarray(small[0])[..., ::-1].astype(np.uint16) * 257))[1].tobytes())
    small[1].convert("1").save(out / "png_bilevel.png")
    small[0].save(out / "png_apng_3frames.png", save_all=True, append_images=small[1:], duration=100, loop=0)
    rgb3.save(out / "png_exif_orient3.png", exif=exif(3))
    # GIF
    pal.save(out / "gif_single.gif")
    frames = [f.quantize(32) for f in small]
    frames[0].info["transparency"] = 1
    frames[0].save(out / "gif_anim_3frames.gif", save_all=True, append_images=frames[1:], duration=80, loop=0,
                   disposal=2, transparency=1)
    # TIFF
    rgb.save(out / "tiff_rgb_raw.tif")
    rgb2.save(out / "tiff_rgb_lzw.tif", compression="tiff_lzw")
    rgb3.save(out / "tiff_rgb_jpeg.tif", compression="jpeg")
    small[0].save(out / "tiff_3pages.tif", save_all=True, append_images=small[1:])
    Image.fromarray(np.asarray(small[1].convert("L"), np.uint16) * 257).save(out / "tiff_gray16.tif")
    small[2].convert("CMYK").save(out / "tiff_cmyk.tif", compression="tiff_adobe_deflate")
    Image.fromarray(np.asarray(small[0].convert("L"), np.float32) / 255.0).save(out / "tiff_float.tif")
    pal.save(out / "tiff_palette.tif")
    # WebP
    rgb.save(out / "webp_lossy.webp", quality=80)
    gradient_alpha(rgb2).save(out / "webp_lossless_alpha.webp", lossless=True)
    small[0].save(out / "webp_anim_3frames.webp", save_all=True, append_images=small[1:], duration=80, loop=0,
                  quality=70)
    fit(3, 48, 64).save(out / "webp_exif_orient6.webp", quality=80, exif=exif(6))
    # BMP
    rgb.save(out / "bmp_rgb24.bmp")
    gradient_alpha(small[1]).save(out / "bmp_rgba32.bmp")
    pal.save(out / "bmp_palette8.bmp")
    small[2].convert("1").save(out / "bmp_bilevel.bmp")
    # AVIF
    rgb.save(out / "avif_rgb.avif", quality=60)
    gradient_alpha(rgb2).save(out / "avif_alpha.avif", quality=60)
    small[0].save(out / "avif_anim_3frames.avif", save_all=True, append_images=small[1:], duration=80, quality=50)
    fit(3, 48, 64).save(out / "avif_exif_orient6.avif", quality=60, exif=exif(6))


# ============================================================================ format parsers
#
# Each parser walks a (possibly already mutated) file and lists its header *fields* (offset,
# width, byte order: what a field mutation may set) and *spans* (chunks, segments, boxes, IFDs,
# frames: what a span mutation may drop, duplicate, swap or corrupt). They never raise: a
# damaged structure ends the walk with what was found so far.


@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # bytes: 1, 2, 3 or 4
    big: bool  # big-endian
    name: str
    crc: Optional[tuple[int, int]] = None  # PNG: (start of the CRC'd bytes, offset of the CRC) to recompute
    hints: tuple[int, ...] = ()  # values worth trying besides the usual ones (other offsets of the file)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    name: str
    frame: bool = False  # one frame of an animation
    body: Optional[tuple[int, int]] = None  # the payload, corrupted inside by "span_corrupt"
    crc: Optional[tuple[int, int]] = None  # as Field.crc


@dataclass
class Layout:
    fields: list[Field]
    spans: list[Span]


def _u(data: bytes, off: int, size: int, big: bool) -> int:
    return int.from_bytes(data[off:off + size], "big" if big else "little")


def _png(data: bytes) -> Layout:
    fields, spans = [], []
    chunk_fields = {
        b"IHDR": [(0, 4, "width"), (4, 4, "height"), (8, 1, "bit depth"), (9, 1, "colour type"),
                  (10, 1, "compression"), (11, 1, "filter"), (12, 1, "interlace")],
        b"acTL": [(0, 4, "num_frames"), (4, 4, "num_plays")],
        b"fcTL": [(0, 4, "sequence"), (4, 4, "width"), (8, 4, "height"), (12, 4, "x"), (16, 4, "y"),
                  (20, 2, "delay num"), (22, 2, "delay den"), (24, 1, "dispose"), (25, 1, "blend")],
        b"fdAT": [(0, 4, "sequence"), (4, 1, "zlib CMF"), (5, 1, "zlib FLG")],
        b"IDAT": [(0, 1, "zlib CMF"), (1, 1, "zlib FLG"), (2, 1, "deflate block header")],
        b"tRNS": [(0, 1, "alpha 0"), (0, 2, "grey/red key")],
        b"PLTE": [(0, 1, "red 0")],
        b"sBIT": [(0, 1, "bits")],
        b"eXIf": [(0, 2, "byte order"), (4, 4, "IFD offset"), (8, 2, "IFD count")],
    }
    i, n = 8, len(data)
    while i + 12 <= n and len(spans) < 64:
        length, ctype = _u(data, i, 4, True), data[i + 4:i + 8]
        end = i + 12 + length
        if end > n:
            fields.append(Field(i, 4, True, f"{ctype!r} length (past the end)"))
            break
        crc = (i + 4, end - 4)
        fields.append(Field(i, 4, True, f"{ctype!r} length", hints=(length + 1, length - 1, n)))
        fields += [Field(i + 4 + k, 1, True, f"{ctype!r} type byte {k}", crc=crc) for k in range(4)]
        for off, size, name in chunk_fields.get(ctype, []):
            if off + size <= length:
                fields.append(Field(i + 8 + off, size, True, f"{ctype!r} {name}", crc=crc))
        spans.append(Span(i, end, ctype.decode("latin-1"), frame=ctype in (b"fcTL", b"fdAT"),
                          body=(i + 8, end - 4), crc=crc))
        i = end
    return Layout(fields, spans)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> Layout:
    fields, spans = [], []
    i, n = 2, len(data)
    while i + 4 <= n and len(spans) < 64:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xD9:
            spans.append(Span(i, i + 2, "EOI"))
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xFF):
            i += 1 if marker == 0xFF else 2
            continue
        length = _u(data, i + 2, 2, True)
        end = min(i + 2 + length, n)
        name = f"FF{marker:02X}"
        fields.append(Field(i + 2, 2, True, f"{name} length", hints=(length + 1, length - 1, length * 2)))
        fields.append(Field(i + 1, 1, True, f"{name} marker"))
        p = i + 4
        if marker in _SOF and p + 6 <= end:
            fields += [Field(p, 1, True, "SOF precision"), Field(p + 1, 2, True, "SOF height"),
                       Field(p + 3, 2, True, "SOF width"), Field(p + 5, 1, True, "SOF components")]
            for c in range(min(data[p + 5], 4)):
                q = p + 6 + 3 * c
                if q + 3 <= end:
                    fields += [Field(q, 1, True, f"SOF comp {c} id"), Field(q + 1, 1, True, f"SOF comp {c} sampling"),
                               Field(q + 2, 1, True, f"SOF comp {c} quant table")]
        elif marker == 0xDA and p + 1 <= end:
            fields.append(Field(p, 1, True, "SOS components"))
            for c in range(min(data[p], 4)):
                q = p + 1 + 2 * c
                if q + 2 <= end:
                    fields += [Field(q, 1, True, f"SOS comp {c} id"), Field(q + 1, 1, True, f"SOS comp {c} tables")]
            q = p + 1 + 2 * data[p]
            if q + 3 <= end:
                fields += [Field(q, 1, True, "SOS Ss"), Field(q + 1, 1, True, "SOS Se"),
                           Field(q + 2, 1, True, "SOS AhAl")]
        elif marker == 0xDB and p < end:
            fields.append(Field(p, 1, True, "DQT Pq/Tq"))
        elif marker == 0xC4 and p + 17 <= end:
            fields.append(Field(p, 1, True, "DHT Tc/Th"))
            fields += [Field(p + 1 + k, 1, True, f"DHT count {k + 1}") for k in range(16)]
        elif marker == 0xDD and p + 2 <= end:
            fields.append(Field(p, 2, True, "DRI interval"))
        elif marker == 0xE1 and data[p:p + 6] == b"Exif\x00\x00":
            fields += _tiff_walk(data, p + 6, end, prefix="EXIF ").fields
        elif marker == 0xEE and p + 12 <= end:
            fields.append(Field(p + 11, 1, True, "Adobe transform"))
        spans.append(Span(i, end, name, body=(p, end)))
        i = end
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not RSTn
            j = i
            while j + 1 < n:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    j = n
                    break
                if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7 or data[j + 1] == 0xFF:
                    j += 1 if data[j + 1] == 0xFF else 2
                    continue
                break
            spans.append(Span(i, min(j, n), "scan", body=(i, min(j, n))))
            i = min(j, n)
    return Layout(fields, spans)


def _tiff_walk(data: bytes, base: int, end: int, prefix: str = "") -> Layout:
    """A TIFF structure starting at *base* (a whole file, or the TIFF inside a JPEG's EXIF segment)."""
    fields, spans = [], []
    if base + 8 > end or data[base:base + 2] not in (b"II", b"MM"):
        return Layout(fields, spans)
    big = data[base:base + 2] == b"MM"
    off = _u(data, base + 4, 4, big)
    ifd_offsets, nexts, seen = [], [], set()
    fields += [Field(base, 2, big, f"{prefix}byte order"), Field(base + 2, 2, big, f"{prefix}magic")]
    first = Field(base + 4, 4, big, f"{prefix}first IFD offset")
    while off and off not in seen and base + off + 2 <= end and len(seen) < 8:
        seen.add(off)
        ifd_offsets.append(off)
        p = base + off
        count = _u(data, p, 2, big)
        fields.append(Field(p, 2, big, f"{prefix}IFD@{off} entry count", hints=(count + 1, count - 1, count * 2)))
        for k in range(min(count, 40)):
            e = p + 2 + 12 * k
            if e + 12 > end:
                break
            tag = _u(data, e, 2, big)
            fields += [Field(e, 2, big, f"{prefix}tag {tag} id"), Field(e + 2, 2, big, f"{prefix}tag {tag} type"),
                       Field(e + 4, 4, big, f"{prefix}tag {tag} count"),
                       Field(e + 8, 4, big, f"{prefix}tag {tag} value/offset"),
                       Field(e + 8, 2, big, f"{prefix}tag {tag} short value")]
        q = p + 2 + 12 * count
        spans.append(Span(p, min(q + 4, end), f"{prefix}IFD@{off}", frame=True, body=(p, min(q + 4, end))))
        if q + 4 > end:
            break
        nexts.append(q)
        off = _u(data, q, 4, big)
    hints = tuple(ifd_offsets) + (8, 2, end - base)
    fields.append(Field(first.offset, 4, big, first.name, hints=hints))
    # the IFD chain: the next-IFD pointers aimed at any IFD (a loop), the header, the end...
    fields += [Field(q, 4, big, f"{prefix}next IFD pointer", hints=hints) for q in nexts]
    return Layout(fields, spans)


def _tiff(data: bytes) -> Layout:
    return _tiff_walk(data, 0, len(data))


def _gif(data: bytes) -> Layout:
    n = len(data)
    if n < 13:
        return Layout([], [])
    fields = [Field(6, 2, False, "screen width"), Field(8, 2, False, "screen height"),
              Field(10, 1, False, "screen flags"), Field(11, 1, False, "background index"),
              Field(12, 1, False, "aspect")]
    spans = [Span(0, 13, "header")]
    i = 13
    if data[10] & 0x80:
        size = 3 << ((data[10] & 7) + 1)
        spans.append(Span(13, min(13 + size, n), "global colour table"))
        i += size

    def sub_blocks(j: int, label: str) -> int:
        k = 0
        while j < n and data[j] != 0 and k < 300:
            if k < 3:
                fields.append(Field(j, 1, False, f"{label} sub-block {k} length"))
            j += 1 + data[j]
            k += 1
        return min(j + 1, n)

    frame_start = None
    while i < n and len(spans) < 80:
        b = data[i]
        if b == 0x3B:
            spans.append(Span(i, i + 1, "trailer"))
            break
        if b == 0x21 and i + 2 < n:
            label = data[i + 1]
            if label == 0xF9 and i + 8 <= n:
                fields += [Field(i + 2, 1, False, "GCE size"), Field(i + 3, 1, False, "GCE flags"),
                           Field(i + 4, 2, False, "GCE delay"), Field(i + 6, 1, False, "GCE transparent index")]
                frame_start = i
            elif label == 0xFF and data[i + 3:i + 14] == b"NETSCAPE2.0" and i + 19 <= n:
                fields.append(Field(i + 16, 2, False, "loop count"))
            end = sub_blocks(i + 2, f"extension {label:02X}")
            if label != 0xF9:
                spans.append(Span(i, end, f"extension {label:02X}"))
            i = end
            continue
        if b == 0x2C and i + 10 <= n:
            fields += [Field(i + 1, 2, False, "frame left"), Field(i + 3, 2, False, "frame top"),
                       Field(i + 5, 2, False, "frame width"), Field(i + 7, 2, False, "frame height"),
                       Field(i + 9, 1, False, "frame flags")]
            j = i + 10
            if data[i + 9] & 0x80:
                j += 3 << ((data[i + 9] & 7) + 1)
            if j < n:
                fields.append(Field(j, 1, False, "LZW minimum code size"))
            end = sub_blocks(j + 1, "image data")
            start = frame_start if frame_start is not None else i
            spans.append(Span(start, end, "frame", frame=True, body=(j, end)))
            frame_start = None
            i = end
            continue
        break
    return Layout(fields, spans)


def _webp_chunks(data: bytes, start: int, end: int, fields: list, spans: list, depth: int = 0) -> None:
    i = start
    while i + 8 <= end and len(spans) < 64:
        fourcc, size = data[i:i + 4], _u(data, i + 4, 4, False)
        p, chunk_end = i + 8, min(i + 8 + size + (size & 1), end)
        fields.append(Field(i + 4, 4, False, f"{fourcc!r} size", hints=(size + 1, size - 1, end - p)))
        if fourcc == b"VP8X" and p + 10 <= end:
            fields += [Field(p, 1, False, "VP8X flags"), Field(p + 4, 3, False, "canvas width-1"),
                       Field(p + 7, 3, False, "canvas height-1")]
        elif fourcc == b"ANIM" and p + 6 <= end:
            fields += [Field(p, 4, False, "background"), Field(p + 4, 2, False, "loop count")]
        elif fourcc == b"ANMF" and p + 16 <= end:
            fields += [Field(p, 3, False, "frame x"), Field(p + 3, 3, False, "frame y"),
                       Field(p + 6, 3, False, "frame width-1"), Field(p + 9, 3, False, "frame height-1"),
                       Field(p + 12, 3, False, "frame duration"), Field(p + 15, 1, False, "frame flags")]
            if depth == 0:
                _webp_chunks(data, p + 16, chunk_end, fields, spans, depth + 1)
        elif fourcc == b"VP8 " and p + 10 <= end:
            fields += [Field(p, 3, False, "VP8 frame tag"), Field(p + 6, 2, False, "VP8 width"),
                       Field(p + 8, 2, False, "VP8 height")]
        elif fourcc == b"VP8L" and p + 5 <= end:
            fields += [Field(p, 1, False, "VP8L signature"), Field(p + 1, 4, False, "VP8L width/height/alpha")]
        elif fourcc == b"ALPH" and p + 1 <= end:
            fields.append(Field(p, 1, False, "ALPH header"))
        elif fourcc == b"EXIF":
            fields += _tiff_walk(data, p, chunk_end, prefix="EXIF ").fields
        spans.append(Span(i, chunk_end, fourcc.decode("latin-1"), frame=fourcc == b"ANMF", body=(p, chunk_end)))
        i = chunk_end


def _webp(data: bytes) -> Layout:
    fields = [Field(4, 4, False, "RIFF size", hints=(len(data) - 8, len(data)))]
    spans: list[Span] = []
    _webp_chunks(data, 12, len(data), fields, spans)
    return Layout(fields, spans)


def _bmp(data: bytes) -> Layout:
    n = len(data)
    if n < 26:
        return Layout([], [])
    offset, dib = _u(data, 10, 4, False), _u(data, 14, 4, False)
    layout = [(2, 4, "file size"), (10, 4, "pixel offset"), (14, 4, "DIB header size"), (18, 4, "width"),
              (22, 4, "height"), (26, 2, "planes"), (28, 2, "bits per pixel"), (30, 4, "compression"),
              (34, 4, "image size"), (38, 4, "x ppm"), (42, 4, "y ppm"), (46, 4, "colours used"),
              (50, 4, "important colours"), (54, 4, "red mask"), (58, 4, "green mask"), (62, 4, "blue mask"),
              (66, 4, "alpha mask")]
    hints = (14, 14 + dib, n, 40, 12, 108, 124, 64)
    fields = [Field(o, s, False, name, hints=hints) for o, s, name in layout if o + s <= min(n, 14 + max(dib, 40))]
    spans = [Span(0, 14, "file header"), Span(14, min(14 + dib, n), "DIB header")]
    if 14 + dib < offset <= n:
        spans.append(Span(14 + dib, offset, "palette/masks"))
    if offset < n:
        spans.append(Span(offset, n, "pixels", body=(offset, n)))
    return Layout(fields, spans)


_BOX_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"iprp", b"ipco", b"edts", b"grpl"}
_FULL_CONTAINERS = {b"meta": 4, b"iinf": 6, b"iref": 4, b"dref": 8, b"stsd": 8}  # version/flags (+ entry count)


def _isobmff(data: bytes, start: int, end: int, fields: list, spans: list, depth: int) -> None:
    i = start
    while i + 8 <= end and len(spans) < 128:
        size, typ, header = _u(data, i, 4, True), data[i + 4:i + 8], 8
        if size == 1 and i + 16 <= end:
            size, header = _u(data, i + 8, 8, True), 16
        elif size == 0:
            size = end - i
        box_end = i + size if header <= size and i + size <= end else end
        name = typ.decode("latin-1")
        fields.append(Field(i, 4, True, f"{name} size", hints=(size + 1, size - 1, end - i, 8)))
        fields += [Field(i + 4 + k, 1, True, f"{name} type byte {k}") for k in (0, 3)]
        p = i + header
        spans.append(Span(i, box_end, name, body=(p, box_end)))
        if typ in _BOX_CONTAINERS and depth < 8:
            _isobmff(data, p, box_end, fields, spans, depth + 1)
        elif typ in _FULL_CONTAINERS and depth < 8:
            skip = _FULL_CONTAINERS[typ]
            if typ == b"iinf" and p < box_end and data[p] != 0:
                skip = 8  # version 1: a 32-bit entry count
            fields.append(Field(p, 1, True, f"{name} version"))
            if skip > 4:
                fields.append(Field(p + 4, skip - 4, True, f"{name} entry count"))
            if typ == b"stsd" and p + 8 + 8 + 78 <= box_end:
                e = p + 8  # the av01 sample entry: width, height, then its av1C box
                fields += [Field(e, 4, True, "sample entry size"), Field(e + 32, 2, True, "sample entry width"),
                           Field(e + 34, 2, True, "sample entry height")]
                _isobmff(data, e + 8 + 78, min(e + _u(data, e, 4, True), box_end), fields, spans, depth + 1)
            elif typ != b"stsd":
                _isobmff(data, p + skip, box_end, fields, spans, depth + 1)
        else:  # a leaf (ftyp, hdlr, pitm, iloc, infe, ispe, av1C, pixi, ipma, stts, stsz, stco, mdat...)
            payload = min(box_end - p, 40 if typ != b"mdat" else 8)
            fields += [Field(p + k, 4, True, f"{name}+{k} u32") for k in range(0, payload - 3, 4)]
            fields += [Field(p + k, 2, True, f"{name}+{k} u16") for k in range(0, min(payload, 16) - 1, 2)]
            fields += [Field(p + k, 1, True, f"{name}+{k} u8") for k in range(min(payload, 8))]
        i = box_end if box_end > i else end


def _avif(data: bytes) -> Layout:
    fields: list[Field] = []
    spans: list[Span] = []
    _isobmff(data, 0, len(data), fields, spans, 0)
    return Layout(fields, spans)


PARSERS: dict[str, Callable[[bytes], Layout]] = {
    "JPEG": _jpeg, "PNG": _png, "GIF": _gif, "TIFF": _tiff, "WEBP": _webp, "BMP": _bmp, "AVIF": _avif,
}


def layout_of(fmt: str, data: bytes) -> Layout:
    try:
        found = PARSERS[fmt](data)
    except Exception:  # pragma: no cover - the parsers are bounded; a bug here must not hide the decoder's
        found = Layout([], [])
    n = len(data)
    return Layout([f for f in found.fields if 0 <= f.offset and f.offset + f.size <= n],
                  [s for s in found.spans if 0 <= s.start < s.end <= n])


# ============================================================================ mutations

INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x07, 0x08, 0x10, 0x20, 0x3F, 0x40, 0x7E, 0x7F, 0x80, 0x81, 0xC0, 0xFE, 0xFF)


def _fix_crc(buf: bytearray, crc: Optional[tuple[int, int]]) -> None:
    if crc is not None:
        start, at = crc
        if 0 <= start <= at and at + 4 <= len(buf):
            buf[at:at + 4] = struct.pack(">I", zlib.crc32(bytes(buf[start:at])) & 0xFFFFFFFF)


def _field_values(f: Field, orig: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * f.size)) - 1
    half = top >> 1
    pool = {0, 1, 2, 3, 4, 7, 8, 16, 255, orig ^ 1, orig + 1, orig - 1, orig * 2, orig // 2, orig << 4, orig >> 4,
            -orig, top, top - 1, half, half + 1, *f.hints}
    return st.one_of(st.sampled_from(sorted({v & top for v in pool})), st.integers(0, top))


def _set_field(buf: bytearray, f: Field, value: int) -> None:
    buf[f.offset:f.offset + f.size] = value.to_bytes(f.size, "big" if f.big else "little")
    _fix_crc(buf, f.crc)


def _fix_png_crcs(buf: bytearray) -> None:
    i = 8
    while i + 12 <= len(buf):
        end = i + 12 + _u(buf, i, 4, True)
        if end > len(buf):
            break
        _fix_crc(buf, (i + 4, end - 4))
        i = end


def _riff_size_fixed(buf: bytearray) -> None:
    if buf[:4] == b"RIFF" and len(buf) >= 8:
        buf[4:8] = struct.pack("<I", (len(buf) - 8) & 0xFFFFFFFF)


# the magic bytes: most mutations leave them alone (a file without them is "not an image" at once)
MAGIC = {"JPEG": 2, "PNG": 8, "GIF": 6, "TIFF": 4, "WEBP": 12, "BMP": 2, "AVIF": 12}
_UNIFORM = st.binary(min_size=3, max_size=3)  # Hypothesis' integers() favour small values; its bytes do not


def position(draw, fmt: str, n: int, lo: Optional[int] = None) -> int:
    """An offset in ``[lo, n)``: half the time near the start (headers), half uniform over the file.
    *lo* defaults to past the magic bytes, one time in eight to 0."""
    if lo is None:
        lo = 0 if all(draw(st.booleans()) for _ in range(3)) else MAGIC[fmt]
    lo = min(lo, n - 1)
    if draw(st.booleans()):
        return draw(st.integers(lo, n - 1))
    return lo + (int.from_bytes(draw(_UNIFORM), "big") * (n - lo) >> 24)


def m_bit_flips(draw, fmt, buf: bytearray, seeds) -> str:
    flips = [(position(draw, fmt, len(buf)), draw(st.integers(0, 7))) for _ in range(draw(st.integers(1, 8)))]
    for pos, bit in flips:
        buf[pos] ^= 1 << bit
    return f"bit flips {flips}"


def m_bytes(draw, fmt, buf: bytearray, seeds) -> str:
    byte = st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255))
    edits = [(position(draw, fmt, len(buf)), draw(byte)) for _ in range(draw(st.integers(1, 8)))]
    for pos, value in edits:
        buf[pos] = value
    return f"bytes set {edits}"


def m_truncate(draw, fmt, buf: bytearray, seeds) -> str:
    n = len(buf)
    if draw(st.booleans()):
        cut = position(draw, fmt, n)
    else:  # in the last bytes: the end-of-image marker, the last chunk, the trailer
        cut = n - draw(st.integers(1, min(32, n)))
    del buf[cut:]
    return f"truncated to {cut} of {n} bytes"


def m_ranges(draw, fmt, buf: bytearray, seeds) -> str:
    n = len(buf)
    start = position(draw, fmt, n)
    length = draw(st.integers(1, max(1, min(256, n - start))))
    how = draw(st.sampled_from(["delete", "duplicate", "insert random", "insert zeros", "zero", "repeat byte"]))
    if how == "delete":
        del buf[start:start + length]
    elif how == "duplicate":
        buf[start:start] = buf[start:start + length] * draw(st.integers(1, 8))
    elif how == "insert random":
        buf[start:start] = draw(st.binary(min_size=1, max_size=64))
    elif how == "insert zeros":
        buf[start:start] = bytes(length)
    elif how == "zero":
        buf[start:start + length] = bytes(len(buf[start:start + length]))
    else:
        buf[start:start + length] = bytes([buf[start]]) * len(buf[start:start + length])
    return f"{how} {length} bytes at {start}"


def m_splice(draw, fmt, buf: bytearray, seeds) -> str:
    name, other = draw(st.sampled_from(seeds))
    a = position(draw, fmt, len(buf) + 1)
    b = position(draw, fmt, len(other) + 1)
    buf[a:] = other[b:]
    return f"spliced {name}[{b}:] at {a}"


def m_field(draw, fmt, buf: bytearray, seeds) -> str:
    fields = layout_of(fmt, bytes(buf)).fields
    if not fields:
        return m_bytes(draw, fmt, buf, seeds)
    f = draw(st.sampled_from(fields))
    orig = _u(buf, f.offset, f.size, f.big)
    value = draw(_field_values(f, orig))
    _set_field(buf, f, value)
    return f"field {f.name} @{f.offset}: {orig} -> {value}" + (" (CRC fixed)" if f.crc else "")


def m_span(draw, fmt, buf: bytearray, seeds) -> str:
    spans = layout_of(fmt, bytes(buf)).spans
    if not spans:
        return m_ranges(draw, fmt, buf, seeds)
    s = draw(st.sampled_from(spans))
    how = draw(st.sampled_from(["drop", "duplicate", "swap", "corrupt inside", "move to end"]))
    chunk = bytes(buf[s.start:s.end])
    if how == "drop":
        del buf[s.start:s.end]
    elif how == "duplicate":
        k = draw(st.integers(1, max(1, min(16, MAX_BYTES // max(1, len(chunk)) - 1))))
        buf[s.end:s.end] = chunk * k
    elif how == "swap":
        t = draw(st.sampled_from(spans))
        if t.start >= s.end or t.end <= s.start:
            first, second = sorted((s, t), key=lambda x: x.start)
            buf[:] = (buf[:first.start] + buf[second.start:second.end] + buf[first.end:second.start]
                      + buf[first.start:first.end] + buf[second.end:])
    elif how == "corrupt inside":
        lo, hi = s.body or (s.start, s.end)
        if hi > lo:
            edits = [(position(draw, fmt, hi, lo), draw(st.integers(0, 255))) for _ in range(draw(st.integers(1, 6)))]
            for pos, value in edits:
                buf[pos] = value
            _fix_crc(buf, s.crc)
    else:
        del buf[s.start:s.end]
        buf += chunk
    return f"{how} {s.name} [{s.start}:{s.end}]" + (" (CRC fixed)" if s.crc and how == "corrupt inside" else "")


def m_frames(draw, fmt, buf: bytearray, seeds) -> str:
    """Frame-count tampering: more, fewer, looped or mislabelled frames."""
    lay = layout_of(fmt, bytes(buf))
    frames = [s for s in lay.spans if s.frame]
    counters = [f for f in lay.fields if any(k in f.name for k in (
        "num_frames", "sequence", "next IFD", "first IFD", "entry count", "stsz", "stts", "stco", "loop count"))]
    if fmt == "JPEG" and draw(st.booleans()):
        buf += buf[:draw(st.integers(2, len(buf)))]  # a second (maybe partial) image after the first
        return "JPEG concatenated with itself"
    if frames and draw(st.booleans()):
        s = draw(st.sampled_from(frames))
        chunk = bytes(buf[s.start:s.end])
        if draw(st.booleans()):
            k = draw(st.integers(1, max(1, min(40, MAX_BYTES // max(1, len(chunk)) - 1))))
            buf[s.end:s.end] = chunk * k
            what = f"{s.name} [{s.start}:{s.end}] repeated {k} more times"
        else:
            del buf[s.start:s.end]
            what = f"{s.name} [{s.start}:{s.end}] dropped"
        if fmt == "WEBP":
            _riff_size_fixed(buf)
        if fmt == "GIF" and draw(st.booleans()) and buf[-1:] == b";":
            del buf[-1:]
            what += ", trailer dropped"
        return what
    if counters:
        f = draw(st.sampled_from(counters))
        orig = _u(buf, f.offset, f.size, f.big)
        value = draw(_field_values(f, orig))
        _set_field(buf, f, value)
        return f"frame field {f.name} @{f.offset}: {orig} -> {value}"
    return m_field(draw, fmt, buf, seeds)


MUTATORS = [m_bit_flips, m_bytes, m_truncate, m_ranges, m_splice, m_field, m_field, m_span, m_frames]


def mutated(draw, fmt: str) -> tuple[str, bytes, list[str]]:
    """A seed of *fmt* from the corpus, mutated by one to three stacked mutations."""
    seeds = SEEDS[fmt]
    name, data = draw(st.sampled_from(seeds))
    buf = bytearray(data)
    steps = []
    # one mutation half the time (stacked ones mostly break the header, so the decoder sees less)
    count = 1 if draw(st.booleans()) else draw(st.integers(2, 3))
    for mutate in [draw(st.sampled_from(MUTATORS)) for _ in range(count)]:
        if not buf:
            break
        steps.append(mutate(draw, fmt, buf, seeds))
        del buf[MAX_BYTES:]
    # half the time the container's own checks are made to pass, so the damage reaches the decoder
    if fmt == "PNG" and buf and draw(st.booleans()):
        _fix_png_crcs(buf)
        steps.append("every chunk CRC recomputed")
    elif fmt == "WEBP" and buf and draw(st.booleans()):
        _riff_size_fixed(buf)
        steps.append("RIFF size fixed")
    return name, bytes(buf), steps


# ============================================================================ the properties


def keep_failure(data: bytes, label: str) -> Path:
    """Write a failing input where the lead can pick it up (see the module docstring)."""
    FAILURES.mkdir(parents=True, exist_ok=True)
    fmt = sniff(data)
    path = FAILURES / f"{label}-{hashlib.sha256(data).hexdigest()[:12]}.{EXT.get(fmt, 'bin')}"
    path.write_bytes(data)
    return path


def decoder_outcome(data: bytes) -> str:
    """Ingest's path for *data*: decode_image, then the stored bytes and their decode by preprocess.
    Returns "decoded" or the rejection reason; anything else raised is a failure of the property."""
    from cvpipe.data.resize import decode_for_size

    try:
        decoded = decode_image(data, **DECODER_LIMITS)
    except ImageRejected as exc:
        assert exc.reason in REASONS, f"unknown reason {exc.reason!r}"
        return exc.reason
    assert isinstance(decoded, DecodedImage)
    assert decoded.image is None or decoded.image.mode == "RGB"
    assert min(decoded.width, decoded.height) >= DECODER_LIMITS["min_size"]
    payload, ext = decoded.encoded(data)  # what ingest writes
    arr = decode_for_size(payload, 64)  # what preprocess reads back
    assert arr.ndim == 3 and arr.shape[2] == 3 and ext in ("jpg", "png")
    return "decoded"


def checked_decode(data: bytes, label: str) -> str:
    try:
        return decoder_outcome(data)
    except Exception as exc:
        path = keep_failure(data, label)
        raise AssertionError(f"decode_image path raised {type(exc).__name__}: {exc} (input saved as {path})") from exc


def test_corpus_has_every_format_and_decodes():
    """The seeds are valid images of each format (mutations start from real files), multi-frame ones included."""
    assert {f: len(s) for f, s in SEEDS.items() if not s} == {}
    total = sum(p.stat().st_size for p in CORPUS.iterdir())
    assert total < 300 * 1024
    frames = Counter()
    for fmt, seeds in SEEDS.items():
        for name, data in seeds:
            decoded = decode_image(data, **DECODER_LIMITS)
            assert decoded.format == fmt, name
            frames[fmt] = max(frames[fmt], decoded.frames)
    assert all(frames[f] >= 3 for f in ("PNG", "GIF", "TIFF", "WEBP", "AVIF")), frames


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_refuses_mutated_files_only_with_image_rejected(fmt):
    outcomes: Counter = Counter()
    unique: set[bytes] = set()

    @seed(zlib.crc32(f"cvpipe-fuzz-decoder-{fmt}".encode()))
    @settings(max_examples=EXAMPLES_PER_FORMAT, **FUZZ_SETTINGS)
    @given(st.data())
    def one_case(data):
        name, blob, steps = mutated(data.draw, fmt)
        digest = hashlib.sha256(blob).digest()
        note(f"{name}: {'; '.join(steps)}")
        outcome = checked_decode(blob, f"decoder-{fmt}")
        if digest not in unique:
            unique.add(digest)
            outcomes[outcome] += 1

    one_case()
    print(f"\n{fmt}: {len(unique)} distinct mutated files: {dict(outcomes.most_common())}")
    assert len(unique) >= CASES_PER_FORMAT
    # the mutations reach past the first check: some files still decode, others fail in several ways
    assert outcomes["decoded"] > 0 and len(outcomes) >= 3, outcomes


@pytest.mark.parametrize("path", CRASHER_FILES, ids=[p.name for p in CRASHER_FILES])
def test_decoder_crashers_are_rejected(path):
    """Each kept crasher is refused with ImageRejected, never another exception."""
    assert checked_decode(path.read_bytes(), f"crasher-{path.stem}") in REASONS


# ---------------------------------------------------------------------------- memory before the limits


def gif_frame_extent_bomb(width: int, height: int) -> bytes:
    """A 43-byte GIF: a 1x1 screen whose first frame claims *width* x *height* pixels with disposal 2.

    Found by the fuzzer (a spliced 3.4 KB GIF whose frame reached 67060 x 34550 took 1.1 GB):
    Pillow's GIF plugin grows the image to the frame's extent and, for disposal 2, fills a
    background image of that extent in ``Image.open`` itself, before any caller can compare the
    size with its limit. Pillow's own guard (``_decompression_bomb_check``) is there, but cvpipe
    turns it off (``Image.MAX_IMAGE_PIXELS = None`` in cvpipe.data.images).
    """
    return (b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 1, 0) + b"\x00\x00\x00\xff\xff\xff"  # screen, 2 colours
            + b"\x21\xf9\x04" + bytes([2 << 2]) + b"\x00\x00\x00\x00"  # graphic control: disposal 2
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)  # the first frame's extent
            + b"\x02\x02\x44\x01\x00\x3b")  # LZW data for one pixel; trailer


# The peak RSS of this interpreter's own memory (VmHWM): not ru_maxrss, which Linux carries over
# exec from the forked parent (pytest's own peak would hide the growth)
_MEASURE = """
import json, re, sys
from cvpipe.data.images import ImageRejected, decode_image
from cvpipe.serve.model import header_pixels

def peak():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", fh.read()).group(1)) // 1024  # MiB

data = open(sys.argv[1], "rb").read()
base = peak()
out = {"header_pixels": header_pixels(data), "header_mb": peak() - base}
try:
    decode_image(data, max_pixels=int(sys.argv[2]))
    out["outcome"] = "decoded"
except ImageRejected as exc:
    out["outcome"] = exc.reason
out["decode_mb"] = peak() - base
print(json.dumps(out))
"""


def test_an_oversized_gif_frame_is_refused_before_it_is_allocated(tmp_path):
    """A GIF frame 24000 x 24000 (576 M pixels: 6x ingest's max_pixels, 14x the app's) costs 43 bytes;
    the app's pre-check (header_pixels) and the decoder must refuse it without allocating it.
    At 65535 x 65535 the same 43 bytes cost 4.1 GB and ~6 s per request (the app's container has 3 GB).
    Measured in a fresh interpreter: the peak RSS growth of each step."""
    import json
    import subprocess

    if not Path("/proc/self/status").exists():
        pytest.skip("measures VmHWM in /proc (Linux)")
    path = tmp_path / "gif_frame_extent_bomb.gif"
    path.write_bytes(gif_frame_extent_bomb(24_000, 24_000))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), "40000000"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["outcome"] == images.BOMB, got
    assert got["header_mb"] < 100 and got["decode_mb"] < 100, f"peak RSS growth in MiB: {got}"


# ---------------------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The app in-process around an untrained 2-class model (checkpoint layout, 64 px)."""
    import torch
    from fastapi.testclient import TestClient

    from cvpipe.core.config import ServeParams
    from cvpipe.serve.app import create_app
    from cvpipe.serve.model import load_model
    from cvpipe.torchkit.models import create, save_checkpoint

    folder = tmp_path_factory.mktemp("fuzz-model")
    torch.manual_seed(0)
    net = create("mobilenetv3_small_050", num_classes=2)
    save_checkpoint(folder / "model.pt", {
        "arch": "mobilenetv3_small_050", "classes": ["ants", "bees"], "model": net.state_dict(), "image_size": 64,
        "resize_mode": "shorter_side_center_crop",
        "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}})
    served = load_model(str(folder / "model.pt"), metrics_dir=str(folder / "metrics"), plots_dir=str(folder / "plots"))
    # the app's own limits (a mutated header may declare up to 40 M pixels: the one-at-a-time
    # large-decode path is fuzzed too)
    with TestClient(create_app(served, ServeParams()), raise_server_exceptions=False) as c:
        yield c


def checked_predict(client, data: bytes, label: str) -> int:
    r = client.post("/predict", files={"file": ("upload.bin", data, "application/octet-stream")})
    if r.status_code >= 500 or not (r.status_code == 200 or 400 <= r.status_code < 500):
        path = keep_failure(data, label)
        raise AssertionError(f"/predict answered {r.status_code}: {r.text[:500]} (input saved as {path})")
    body = r.json()
    assert ("label" in body) if r.status_code == 200 else ("error" in body), body
    return r.status_code


def test_app_answers_mutated_uploads_with_200_or_4xx(client):
    statuses: Counter = Counter()
    per_format: Counter = Counter()
    unique: set[bytes] = set()

    @seed(zlib.crc32(b"cvpipe-fuzz-app"))
    @settings(max_examples=APP_EXAMPLES, **FUZZ_SETTINGS)
    @given(st.data())
    def one_case(data):
        fmt = data.draw(st.sampled_from(FORMATS))
        name, blob, steps = mutated(data.draw, fmt)
        digest = hashlib.sha256(blob).digest()
        note(f"{name}: {'; '.join(steps)}")
        status = checked_predict(client, blob, f"app-{fmt}")
        if digest not in unique:
            unique.add(digest)
            statuses[status] += 1
            per_format[fmt] += 1

    one_case()
    print(f"\n/predict: {len(unique)} distinct mutated uploads: {dict(statuses)}; per format {dict(per_format)}")
    assert len(unique) >= APP_CASES
    assert statuses[200] > 0 and len(statuses) >= 2, statuses


def test_app_answers_every_crasher_and_seed(client):
    """The regression files and the corpus through /predict: never a 5xx for the crashers, 200 for the seeds."""
    for path in CRASHER_FILES:
        checked_predict(client, path.read_bytes(), f"app-crasher-{path.stem}")
    for fmt, seeds in SEEDS.items():
        for name, data in seeds:
            assert checked_predict(client, data, f"app-seed-{fmt}") == 200, name


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--make-corpus":
        make_corpus()
        for p in sorted(CORPUS.iterdir()):
            print(f"{p.stat().st_size:7d}  {p.name}")
    else:
        sys.exit("usage: python tests/test_fuzz.py --make-corpus")
