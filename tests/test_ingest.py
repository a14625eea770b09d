"""Ingest stage against real files and real servers on 127.0.0.1 (GCS emulator, http.server)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import cvpipe, write_params
from PIL import Image
from servers import gcs_emulator, http_server, upload_tree

from cvpipe.core import storage
from cvpipe.core.config import load_params
from cvpipe.core.errors import StageError
from cvpipe.ingest.stage import run as ingest_run

# What must become of each of the 40 files in bad_inputs (all in one class folder).
# "ok:<source mode>" = in the manifest as a valid RGB image; anything else = quarantine reason.
BAD_INPUTS_EXPECTED = {
    ".DS_Store": "junk_file",
    "Thumbs.db": "junk_file",
    "UPPERCASE_EXT.JPEG": "ok:RGB",
    "alpha.webp": "ok:RGBA",
    "animated_4frames.gif": "ok:P",
    "bilevel_1bit.png": "ok:1",
    "cmyk.jpg": "ok:CMYK",
    "corrupted_middle_bytes.jpg": "corrupt",  # garbage in scan data: see images.jpeg_structure
    "decompression_bomb_14000x14000.png": "decompression_bomb",
    "exif_orientation_3.jpg": "ok:RGB",
    "exif_orientation_6.jpg": "ok:RGB",
    "exif_orientation_8.jpg": "ok:RGB",
    "extreme_aspect_12x2000.jpg": "extreme_aspect_ratio",
    "extreme_aspect_2000x12.jpg": "extreme_aspect_ratio",
    "float32_mode_F.tiff": "ok:F",
    "git_lfs_pointer.jpg": "git_lfs_pointer",
    "gray_16bit.png": "ok:I;16",
    "gray_alpha_LA.png": "ok:LA",
    "grayscale_L.jpg": "ok:L",
    "grayscale_L.png": "ok:L",
    "html_error_page.jpg": "not_an_image",
    "image.bmp": "ok:RGB",
    "image.tiff": "ok:RGB",
    "jpeg_content_named.png": "ok:RGB",
    "lossy.webp": "ok:RGB",
    "name with spaces (1).jpg": "duplicate",  # same bytes as UPPERCASE_EXT.JPEG
    "no_extension": "duplicate",  # same bytes as jpeg_content_named.png
    "not_an_image.jpg": "not_an_image",
    "palette.gif": "ok:P",
    "palette_with_transparency.png": "ok:P",
    "png_content_named.jpg": "ok:RGB",
    "progressive.jpg": "ok:RGB",
    "rgb_48bit_16bpc.png": "ok:RGB",
    "rgba_alpha.png": "ok:RGBA",
    "tiny_1x1.png": "too_small",
    "tiny_7x5.jpg": "too_small",
    "truncated_half.jpg": "truncated",
    "truncated_header_only.jpg": "truncated",
    "zero_bytes.jpg": "empty_file",
    "ünïcødé_名前.jpg": "duplicate",  # same bytes as UPPERCASE_EXT.JPEG
}
SNIFFED_FORMAT = {"jpeg_content_named.png": "JPEG", "png_content_named.jpg": "PNG", "UPPERCASE_EXT.JPEG": "JPEG"}
ROTATED = {"exif_orientation_6.jpg": (512, 768), "exif_orientation_8.jpg": (512, 768), "exif_orientation_3.jpg": (768, 512)}


def _params(tmp: Path, source, **ingest):
    write_params(tmp, {"ingest.source": source, "paths.raw": str(tmp / "raw"), "paths.metrics": str(tmp / "metrics"),
                       "paths.reports": str(tmp / "reports"),
                       "ingest.state_dir": str(tmp / "state"), **{f"ingest.{k}": v for k, v in ingest.items()}})
    return load_params(tmp / "params.yaml")


def _read(raw: Path, name: str) -> list[dict]:
    with open(raw / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _without_uri(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "source_uri"} for r in rows), key=lambda r: (r["label"], r["path"], r["split_hint"]))


def _rel(uri: str, marker: str) -> str:
    return uri.split(marker, 1)[1]


def _two_classes(folder: Path, per_class: int, name: str = "{i}.png") -> None:
    """Class folders a and b under *folder*, each with *per_class* small PNGs of distinct colours."""
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 24), (i * 40, 100 if label == "a" else 200, 7)).save(folder / label / name.format(i=i))


def _no_temp_files(*folders: Path) -> list[str]:
    return [str(p) for f in folders if f.exists() for p in f.rglob("*") if p.name.startswith(storage.TMP_MARKER)]


@pytest.fixture(scope="module")
def local_hymenoptera(real_data, tmp_path_factory):
    """One uninterrupted local ingest of hymenoptera_data, shared by the comparisons."""
    tmp = tmp_path_factory.mktemp("local")
    report = ingest_run(_params(tmp, str(real_data / "hymenoptera_data")))
    return tmp, report


# -- validation of every file ------------------------------------------------------------------------


def test_bad_inputs_each_file_has_the_expected_outcome(real_data, tmp_path):
    src = tmp_path / "src" / "things"
    src.mkdir(parents=True)
    files = sorted(p.name for p in (real_data / "bad_inputs").iterdir())
    assert sorted(BAD_INPUTS_EXPECTED) == files, "bad_inputs changed: update the expectations"
    for name in files:
        (src / name).symlink_to(real_data / "bad_inputs" / name)
    report = ingest_run(_params(tmp_path, str(tmp_path / "src"), max_aspect_ratio=20.0, min_size=8))

    manifest = {r["source_uri"].rsplit("/", 1)[1]: r for r in _read(tmp_path / "raw", "manifest.csv")}
    quarantine = {r["source_uri"].rsplit("/", 1)[1]: r for r in _read(tmp_path / "raw", "quarantine.csv")}
    assert set(manifest) | set(quarantine) == set(files) and not set(manifest) & set(quarantine)
    for name, expected in BAD_INPUTS_EXPECTED.items():
        if expected.startswith("ok:"):
            row = manifest.get(name)
            assert row is not None, f"{name}: expected in the manifest, quarantined as {quarantine[name]['reason']}: {quarantine[name]['detail']}"
            assert row["source_mode"] == expected[3:], name
            with Image.open(tmp_path / "raw" / row["path"]) as img:
                img.load()
                assert img.mode == "RGB" and getattr(img, "n_frames", 1) == 1, name
                assert (img.width, img.height) == (int(row["width"]), int(row["height"])), name
        else:
            assert name in quarantine, f"{name}: expected quarantine ({expected}), found in the manifest"
            assert quarantine[name]["reason"] == expected, f"{name}: {quarantine[name]}"
    for name, fmt in SNIFFED_FORMAT.items():
        assert manifest[name]["format"] == fmt
    for name, size in ROTATED.items():
        assert (int(manifest[name]["width"]), int(manifest[name]["height"])) == size
    assert report.accepted == len(manifest) and report.quarantined == len(quarantine)


def test_decode_thread_count_does_not_change_any_outcome(real_data, tmp_path):
    """Decoding runs in threads: 1 and 4 of them over the 40 bad inputs give byte-identical outputs."""
    src = tmp_path / "src" / "things"
    src.mkdir(parents=True)
    for p in (real_data / "bad_inputs").iterdir():
        (src / p.name).symlink_to(p)
    outputs = []
    for workers in (1, 4):
        run_dir = tmp_path / f"w{workers}"
        run_dir.mkdir()
        ingest_run(_params(run_dir, str(tmp_path / "src"), workers=workers))
        raw = run_dir / "raw"
        stored = sorted(p.relative_to(raw).as_posix() for p in (raw / "images").rglob("*") if p.is_file())
        outputs.append(((raw / "manifest.csv").read_bytes(), (raw / "quarantine.csv").read_bytes(), stored))
    assert outputs[0] == outputs[1]


# -- incremental and crash-safe ---------------------------------------------------------------------


def test_rerun_transfers_nothing_and_is_fast(real_data, local_hymenoptera, tmp_path):
    first_dir, first = local_hymenoptera
    assert first.transferred == first.listed - 0 and first.decoded == first.listed and first.reused == 0
    params = _params(first_dir, str(real_data / "hymenoptera_data"))
    before = (first_dir / "raw" / "manifest.csv").read_bytes()
    again = ingest_run(params)
    assert (again.transferred, again.decoded, again.bytes_transferred) == (0, 0, 0)
    assert again.reused == again.listed == first.listed
    assert (first_dir / "raw" / "manifest.csv").read_bytes() == before
    assert again.seconds < 0.10 * first.seconds, (again.seconds, first.seconds)


def test_changed_file_is_the_only_one_redone(tmp_path):
    src = tmp_path / "src"
    _two_classes(src, 4)
    params = _params(tmp_path, str(src), workers=1)
    assert ingest_run(params).decoded == 8
    Image.new("RGB", (32, 24), (1, 2, 3)).save(src / "a" / "0.png")
    (src / "b" / "3.png").unlink()
    r = ingest_run(params)
    assert (r.transferred, r.decoded, r.reused, r.accepted) == (1, 1, 6, 7)
    rows = _read(tmp_path / "raw", "manifest.csv")
    assert len({r["path"] for r in rows}) == 7
    stored = [p for p in (tmp_path / "raw" / "images").rglob("*") if p.is_file()]
    assert len(stored) == 7  # the replaced and the removed images were pruned


def test_journal_keeps_only_the_stored_files_part_and_a_rerun_rebuilds_the_same_manifest(tmp_path):
    """The journal's record is the stored file's part of the manifest row (the label, URI and split hint are
    the listing's); a rerun completes the journal's records into the same manifest, byte for byte, untouched."""
    src = tmp_path / "src"
    _two_classes(src / "train", 3)
    params = _params(tmp_path, str(src), workers=1)
    assert ingest_run(params).decoded == 6
    journal = next((tmp_path / "state").glob("state-*.jsonl"))
    entries = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert len(entries) == 6 and all(
        set(e["record"]) == {"id", "path", "width", "height", "format", "source_mode", "sha256", "bytes"} for e in entries)
    manifest = tmp_path / "raw" / "manifest.csv"
    before, stat_before, journal_before = manifest.read_bytes(), os.stat(manifest), journal.read_bytes()
    again = ingest_run(params)
    assert (again.reused, again.decoded) == (6, 0)
    assert manifest.read_bytes() == before and os.stat(manifest).st_mtime_ns == stat_before.st_mtime_ns
    assert {r["split_hint"] for r in _read(tmp_path / "raw", "manifest.csv")} == {"train"}
    assert journal.read_bytes() == journal_before


def test_a_journal_line_torn_inside_a_utf8_character_is_skipped_and_the_rest_reused(tmp_path):
    """A kill can cut a line inside a multi-byte character (file names are UTF-8), and the next run appends
    after it: the torn line is skipped, every other entry is reused, nothing stops the run."""
    src = tmp_path / "src"
    _two_classes(src, 3, name="ünïcødé_{i}.png")
    params = _params(tmp_path, str(src), workers=1)
    assert ingest_run(params).decoded == 6
    journal = next((tmp_path / "state").glob("state-*.jsonl"))
    lines = journal.read_bytes().splitlines(keepends=True)
    torn = lines[1][: lines[1].index("ü".encode()) + 1] + b"\n"  # ends after the first byte of a 2-byte character
    journal.write_bytes(b"".join(lines[:4] + [torn] + lines[4:]))
    again = ingest_run(params)
    assert (again.reused, again.decoded, again.accepted) == (6, 0, 6)


@pytest.mark.slow
def test_sigkill_midway_then_restart_gives_the_same_manifest(real_data, local_hymenoptera, tmp_path):
    ref_dir, _ = local_hymenoptera
    source = str(real_data / "hymenoptera_data")
    _params(tmp_path, source, workers=2)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvpipe", "ingest", "--quiet"], cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        journals = list(state.glob("state-*.jsonl"))
        done = len(journals[0].read_text(errors="replace").splitlines()) - 1 if journals else 0
        if done >= 120:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its decode workers, no cleanup of any kind
    proc.wait()
    assert not (tmp_path / "raw" / "manifest.csv").exists()

    result = cvpipe("ingest", "--quiet", cwd=tmp_path)
    assert result.returncode == 0
    report = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert report["reused"] >= 100 and report["decoded"] < report["listed"] - 100  # resumed, not redone
    rows = _read(tmp_path / "raw", "manifest.csv")
    ref = _read(ref_dir / "raw", "manifest.csv")
    assert rows == ref
    assert len({r["sha256"] for r in rows}) == len(rows) and len({r["source_uri"] for r in rows}) == len(rows)
    assert _read(tmp_path / "raw", "quarantine.csv") == _read(ref_dir / "raw", "quarantine.csv")
    stored = sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw" / "images").rglob("*") if p.is_file())
    assert stored == sorted(r["path"] for r in rows)
    assert _no_temp_files(tmp_path / "raw", state) == []


# -- manifests (CSV / JSONL) ---------------------------------------------------------------------------


def test_csv_and_jsonl_manifests(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(imgs / f"r{i}.png")
    Image.new("L", (20, 20), 99).save(imgs / "g.png")
    (tmp_path / "list.csv").write_text("uri,label,split\nimgs/r0.png,red,train\nimgs/r1.png,red,val\n"
                                       f"{imgs / 'g.png'},gray,\nimgs/missing.png,red,\nimgs/r2.png,,\n")
    r = ingest_run(_params(tmp_path, str(tmp_path / "list.csv"), workers=1))
    rows = {Path(x["source_uri"]).name: x for x in _read(tmp_path / "raw", "manifest.csv")}
    q = {Path(x["source_uri"]).name: x["reason"] for x in _read(tmp_path / "raw", "quarantine.csv")}
    assert set(rows) == {"r0.png", "r1.png", "g.png"} and rows["r1.png"]["split_hint"] == "val"
    assert rows["g.png"]["label"] == "gray" and rows["g.png"]["source_mode"] == "L"
    assert q == {"missing.png": "unreadable", "r2.png": "no_label"}
    assert r.accepted == 3

    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"uri": "imgs/r0.png", "label": "red"}, {"uri": str(imgs / "g.png"), "label": "gray", "split": "test"}]) + "\n")
    (tmp_path / "j").mkdir()
    ingest_run(_params(tmp_path / "j", str(tmp_path / "list.jsonl"), workers=1))
    rows = _read(tmp_path / "j" / "raw", "manifest.csv")
    assert sorted((r["label"], r["split_hint"]) for r in rows) == [("gray", "test"), ("red", "")]


def test_bad_source_is_one_line_error(tmp_path):
    write_params(tmp_path, {"ingest.source": "ftp://nowhere/x"})
    res = cvpipe("ingest", "--quiet", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "unsupported source scheme 'ftp'" in res.stderr and "Traceback" not in res.stderr


# -- http(s) archives -------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)


def _tar(path: Path, members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (target, kind) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)


def _png(color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


MALICIOUS = {
    "zip_slip.zip": ("zip", {"cls/ok.png": _png(), "../../evil.txt": b"pwned"}, None, "escapes the extraction folder"),
    "absolute.zip": ("zip", {"cls/ok.png": _png(), "/tmp/cvpipe-evil.txt": b"pwned"}, None, "absolute path"),
    "symlink.zip": ("zip", {"cls/ok.png": _png()}, {"cls/link.png": "../../../etc/passwd"}, "points outside"),
    "symlink_abs.tar.gz": ("tar", {"cls/ok.png": _png()}, {"cls/link.png": ("/etc/passwd", tarfile.SYMTYPE)}, "points outside"),
    "hardlink.tar.gz": ("tar", {"cls/ok.png": _png()}, {"cls/hard.png": ("../outside.png", tarfile.LNKTYPE)}, "points outside"),
    "oversized.zip": ("zip", {"cls/ok.png": _png(), "cls/big.bin": b"\0" * 50_000}, None, "max_archive_bytes"),
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_archive_is_rejected_and_writes_nothing_outside(name, tmp_path):
    kind, members, links, message = MALICIOUS[name]
    served = tmp_path / "served"
    served.mkdir()
    (_zip if kind == "zip" else _tar)(served / name, members, links)
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    cache = work / "cache"
    before = {p for p in tmp_path.rglob("*")}
    with http_server(served) as base, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVPIPE_CACHE", str(cache))
        with pytest.raises(StageError, match=message) as err:
            ingest_run(_params(work, f"{base}/{name}", max_archive_bytes=20_000))
    assert "archive rejected" in str(err.value) and "\n" not in str(err.value)
    created = {p for p in tmp_path.rglob("*")} - before
    # only the params, the empty raw folder and the cache slot (no extracted tree) were created
    assert not [p for p in created if not p.is_relative_to(work)], created
    assert not [p for p in created if p.is_file() and p.suffix in (".txt", ".png", ".bin")], created
    assert not Path("/tmp/cvpipe-evil.txt").exists()


def test_malicious_archive_cli_message(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    _zip(served / "slip.zip", {"cls/ok.png": _png(), "../evil.txt": b"x"})
    with http_server(served) as base:
        write_params(tmp_path, {"ingest.source": f"{base}/slip.zip"})
        res = cvpipe("ingest", "--quiet", cwd=tmp_path, check=False, env={"CVPIPE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 1
    assert "archive rejected: member '../evil.txt' escapes the extraction folder" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.slow
def test_http_zip_equals_local_folder(real_data, local_hymenoptera, tmp_path, monkeypatch):
    ref_dir, _ = local_hymenoptera
    served = tmp_path / "served"
    served.mkdir()
    root = real_data / "hymenoptera_data"
    with zipfile.ZipFile(served / "hymenoptera.zip", "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, "hymenoptera_data/" + p.relative_to(root).as_posix())  # one wrapping folder
    monkeypatch.setenv("CVPIPE_CACHE", str(tmp_path / "cache"))
    with http_server(served) as base:
        url = f"{base}/hymenoptera.zip"
        first = ingest_run(_params(tmp_path, url))
        rows = _read(tmp_path / "raw", "manifest.csv")
        assert _without_uri(rows) == _without_uri(_read(ref_dir / "raw", "manifest.csv"))
        assert {_rel(r["source_uri"], "!/") for r in rows} == {_rel(r["source_uri"], "hymenoptera_data/") for r in _read(ref_dir / "raw", "manifest.csv")}
        assert first.bytes_transferred >= (served / "hymenoptera.zip").stat().st_size
        again = ingest_run(_params(tmp_path, url))
    assert (again.transferred, again.decoded, again.bytes_transferred) == (0, 0, 0)


# -- gs:// through the GCS emulator ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs_hymenoptera(real_data, tmp_path_factory):
    data = tmp_path_factory.mktemp("gcs")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    with gcs_emulator(data) as endpoint:
        upload_tree(endpoint, real_data / "hymenoptera_data", "cvpipe-test", "datasets/hymenoptera")
        yield endpoint, "gs://cvpipe-test/datasets/hymenoptera"
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.mark.slow
def test_gcs_equals_local_folder_and_reruns_transfer_nothing(gcs_hymenoptera, local_hymenoptera, tmp_path, monkeypatch):
    endpoint, url = gcs_hymenoptera
    ref_dir, _ = local_hymenoptera
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    first = ingest_run(_params(tmp_path, url, gcs_token="anon", transfer_concurrency=16))
    rows = _read(tmp_path / "raw", "manifest.csv")
    ref = _read(ref_dir / "raw", "manifest.csv")
    assert _without_uri(rows) == _without_uri(ref)
    assert {_rel(r["source_uri"], "hymenoptera/") for r in rows} == {_rel(r["source_uri"], "hymenoptera_data/") for r in ref}
    assert [r["reason"] for r in _read(tmp_path / "raw", "quarantine.csv")] == [r["reason"] for r in _read(ref_dir / "raw", "quarantine.csv")]
    assert first.transferred == first.listed and first.bytes_transferred > 40_000_000
    again = ingest_run(_params(tmp_path, url, gcs_token="anon"))
    assert (again.transferred, again.decoded, again.bytes_transferred) == (0, 0, 0)
    assert again.reused == first.listed


@pytest.mark.slow
def test_manifest_mixing_gs_http_and_local_uris(gcs_hymenoptera, real_data, tmp_path, monkeypatch):
    endpoint, url = gcs_hymenoptera
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    served = tmp_path / "served"
    served.mkdir()
    (served / "bee.jpg").write_bytes((real_data / "hymenoptera_data/val/bees/10870992_eebeeb3a12.jpg").read_bytes())
    local = real_data / "hymenoptera_data/val/ants/10308379_1b6c72e180.jpg"
    with http_server(served) as base:
        (tmp_path / "rows.csv").write_text(
            "uri,label\n"
            f"{url}/train/ants/0013035.jpg,ants\n"
            f"{url}/train/ants/does-not-exist.jpg,ants\n"
            f"{base}/bee.jpg,bees\n"
            f"{local},ants\n"
        )
        r = ingest_run(_params(tmp_path, str(tmp_path / "rows.csv"), gcs_token="anon"))
    rows = _read(tmp_path / "raw", "manifest.csv")
    assert sorted(x["source_uri"].rsplit("/", 1)[1] for x in rows) == ["0013035.jpg", "10308379_1b6c72e180.jpg", "bee.jpg"]
    assert [x["reason"] for x in _read(tmp_path / "raw", "quarantine.csv")] == ["unreadable"]
    assert r.accepted == 3
    assert (r.transferred, r.decoded) == (3, 3)  # the object that failed to fetch was neither
