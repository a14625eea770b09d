"""decode_image: the JPEG structure check that catches damage libjpeg would conceal."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from cvpipe.data.images import CORRUPT, ImageRejected, decode_image, jpeg_structure


def _jpeg(progressive: bool = False, restart: bool = False) -> bytes:
    img = Image.radial_gradient("L").convert("RGB").resize((320, 240))
    buf = io.BytesIO()
    kwargs = {"quality": 90, "progressive": progressive}
    if restart:
        kwargs["restart_marker_blocks"] = 4
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("progressive,restart", [(False, False), (True, False), (False, True)])
def test_valid_jpegs_pass_the_structure_check(progressive, restart):
    data = _jpeg(progressive, restart)
    assert jpeg_structure(data)[0] is None
    assert decode_image(data).width == 320


def test_garbage_in_scan_data_is_rejected():
    data = bytearray(_jpeg())
    mid = len(data) // 2
    data[mid : mid + 512] = bytes((i * 37) & 0xFF for i in range(512))  # as in bad_inputs
    assert "inside scan data" in (jpeg_structure(bytes(data))[0] or "")
    with pytest.raises(ImageRejected) as err:
        decode_image(bytes(data))
    assert err.value.reason == CORRUPT


def test_concealed_damage_in_real_file_is_rejected(real_data):
    data = (real_data / "bad_inputs" / "corrupted_middle_bytes.jpg").read_bytes()
    Image.open(io.BytesIO(data)).load()  # libjpeg conceals the damage: Pillow alone accepts it
    with pytest.raises(ImageRejected) as err:
        decode_image(data)
    assert err.value.reason == CORRUPT and "inside scan data" in err.value.detail


def test_restart_markers_out_of_sequence_are_rejected():
    data = _jpeg(restart=True)
    first = data.find(b"\xff\xd0")
    assert first > 0
    swapped = data[:first] + b"\xff\xd3" + data[first + 2 :]
    assert "out of sequence" in (jpeg_structure(swapped)[0] or "")


def test_trailing_bytes_after_eoi_are_fine():
    assert jpeg_structure(_jpeg() + b"\x00camera trailer\xff\x12") == (None, True)


def test_real_photos_have_no_false_positives(real_data):
    for path in sorted((real_data / "hymenoptera_data").rglob("*.jp*g")):
        assert jpeg_structure(path.read_bytes()) == (None, True), path


# ----------------------------------------------------------------------------- OpenCV fast path == Pillow


def _outcome(data: bytes) -> tuple:
    try:
        d = decode_image(data, min_size=8)
    except ImageRejected as rej:
        return ("rejected", rej.reason)
    return ("accepted", d.format, d.source_mode, d.width, d.height, d.clean, d.encoded(data)[0] == data)


def test_clean_jpeg_takes_the_opencv_path_and_keeps_its_bytes():
    data = _jpeg()
    d = decode_image(data)
    assert d.clean and d.image is None and (d.width, d.height) == (320, 240)
    assert d.encoded(data) == (data, "jpg")


def test_jpeg_cut_short_is_truncated_on_both_paths(monkeypatch):
    from cvpipe.data import images

    data = _jpeg()
    cut = data[: len(data) * 2 // 3]  # libjpeg would pad it with grey; Pillow raises
    fast = _outcome(cut)
    monkeypatch.setattr(images, "_clean_jpeg_decodes", lambda *a: False)
    assert fast == _outcome(cut) == ("rejected", images.TRUNCATED)


def test_fast_path_gives_pillows_outcome_on_every_real_file(real_data, monkeypatch):
    """The OpenCV fast path only speeds up success: every real photo and every bad input ends the same."""
    from cvpipe.data import images

    paths = sorted(p for p in (real_data / "hymenoptera_data").rglob("*") if p.is_file())
    paths += sorted(p for p in (real_data / "bad_inputs").iterdir() if p.is_file())
    datas = [p.read_bytes() for p in paths]
    took_fast_path = []
    real = images._clean_jpeg_decodes
    monkeypatch.setattr(images, "_clean_jpeg_decodes", lambda *a: took_fast_path.append(real(*a)) or took_fast_path[-1])
    fast = [_outcome(d) for d in datas]
    monkeypatch.setattr(images, "_clean_jpeg_decodes", lambda *a: False)
    slow = [_outcome(d) for d in datas]
    assert [p.name for p, a, b in zip(paths, fast, slow) if a != b] == []
    assert sum(took_fast_path) >= 390  # the fast path did the work for the real photos


def test_preprocess_raises_pillows_bomb_guard_to_ingests_limit(tmp_path):
    """preprocess reads images ingest already validated against ``ingest.max_pixels``: resize_all lifts
    Pillow's guard to that limit (it only grows), so a user's larger limit is not refused a second time."""
    import numpy as np

    from cvpipe.data.resize import resize_all

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "a.png")
    limit = 3 * 10**9  # far above Pillow's default (89 MP) and anything an earlier test set
    out = resize_all(str(tmp_path), ["a.png"], tmp_path / "out.npy", 16, "shorter_side_center_crop", 1,
                     max_pixels=limit)
    assert Image.MAX_IMAGE_PIXELS >= limit
    assert out.shape == (1,) and np.load(tmp_path / "out.npy").shape == (1, 16, 16, 3)
