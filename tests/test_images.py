"""decode_image: the JPEG structure check that catches damage libjpeg would conceal."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from cvpipe.images import CORRUPT, ImageRejected, decode_image, jpeg_structure_error


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
    assert jpeg_structure_error(data) is None
    assert decode_image(data).width == 320


def test_garbage_in_scan_data_is_rejected():
    data = bytearray(_jpeg())
    mid = len(data) // 2
    data[mid : mid + 512] = bytes((i * 37) & 0xFF for i in range(512))  # as in bad_inputs
    assert "inside scan data" in (jpeg_structure_error(bytes(data)) or "")
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
    assert "out of sequence" in (jpeg_structure_error(swapped) or "")


def test_trailing_bytes_after_eoi_are_fine():
    assert jpeg_structure_error(_jpeg() + b"\x00camera trailer\xff\x12") is None


def test_real_photos_have_no_false_positives(real_data):
    for path in sorted((real_data / "hymenoptera_data").rglob("*.jp*g")):
        assert jpeg_structure_error(path.read_bytes()) is None, path
