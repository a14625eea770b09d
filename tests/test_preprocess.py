"""Preprocess: resize, leakage-aware splits, the prepared format, the dataset card, oversampling."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_params
from repo_files import copy_pipeline
from conftest import cvpipe as _cvpipe
from PIL import Image

from cvpipe.core.config import load_params
from cvpipe.core.errors import StageError
from cvpipe.data.images import fit_array, open_for_size
from cvpipe.data.prepared import PreparedDataset
from cvpipe.data.resize import phash
from cvpipe.ingest import stage as ingest
from cvpipe.preprocess import stage as preprocess
from cvpipe.preprocess.near_duplicates import near_duplicate_groups
from cvpipe.preprocess.splits import predefined_split, straddling_groups, stratified_split

# ----------------------------------------------------------------------------- helpers


def cvpipe(*args, **kw):
    """The CLI from this checkout's src/ (a relative PYTHONPATH would not survive the subprocess's cwd)."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), **kw.pop("env", {})}
    return _cvpipe(*args, env=env, **kw)


def make_folder(root: Path, counts: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """Class folders of distinct random-pattern PNGs (no two near-duplicates)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)  # blocky: a stable, distinct phash
            Image.fromarray(small).resize((size, size), Image.NEAREST).save(root / cls / f"{i:03d}.png")
    return root


def run_stages(folder: Path, source, **overrides):
    """Ingest ``source`` and preprocess in ``folder`` (in-process, W&B disabled); returns (params, card)."""
    ov = {"ingest.source": str(source), "wandb.mode": "disabled", "preprocess.workers": 2,
          "paths.raw": str(folder / "raw"), **overrides}
    p = load_params(folder / "params.yaml", {k: v for k, v in ov.items()})
    if not (folder / "raw" / "manifest.csv").exists():
        ingest.run(p)
    return p, preprocess.run(p)


def split_ids(prepared: Path) -> dict[str, list[str]]:
    out = {}
    for name in ("train", "val", "test"):
        f = prepared / name / "index.csv"
        if f.exists():
            with open(f, newline="") as fh:
                out[name] = [r["id"] for r in csv.DictReader(fh)]
    return out


def manifest(raw: Path) -> list[dict[str, str]]:
    with open(raw / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def link_farm(dest: Path, pairs) -> Path:
    """Real directories holding symlinks to the real files: ingest reads them, nothing is copied."""
    for src, rel in pairs:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, target)
    return dest


def hymenoptera_files(real_data: Path):
    root = real_data / "hymenoptera_data"
    return sorted(p for p in root.glob("*/*/*") if p.is_file())


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize("mode", ["shorter_side_center_crop", "pad_to_square", "stretch"])
def test_fit_array_modes_give_square_uint8(mode):
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 100))  # a blue strip on the left edge
    out = fit_array(np.asarray(img), 32, mode)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode == "shorter_side_center_crop":
        assert (out[..., 0] > 200).all()  # the blue left strip is cropped away
    elif mode == "pad_to_square":
        assert out[0].max() == 0 and out[-1].max() == 0 and out[16, :, 0].max() > 200  # black bars top and bottom
    else:
        assert out[16, 0, 2] > 200 and out[16, -1, 0] > 200  # whole width kept: blue left, red right


def test_open_for_size_uses_jpeg_draft_and_keeps_enough_pixels():
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(buf, "JPEG")
    img = open_for_size(buf.getvalue(), 128)
    assert img.mode == "RGB"
    assert min(img.size) >= 128 and img.size[0] < 2000  # decoded reduced, still >= the target
    assert fit_array(np.asarray(img), 128).shape == (128, 128, 3)


# ----------------------------------------------------------------------------- splits (unit)


def test_near_duplicate_groups_are_transitive_and_respect_distance():
    a = np.uint64(0)
    hashes = np.array([a, a ^ np.uint64(0b11), a ^ np.uint64(0b1111), np.uint64(2**64 - 1)], dtype=np.uint64)
    g = near_duplicate_groups(hashes, 2)
    assert g[0] == g[1] == g[2] and g[3] != g[0]  # 0-1 and 1-2 within 2 bits: one group via 1
    g0 = near_duplicate_groups(hashes, 0)
    assert len(set(g0.tolist())) == 4
    assert len(set(near_duplicate_groups(hashes, None).tolist())) == 4


def test_stratified_split_keeps_groups_together_and_is_stratified():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [200, 100, 60])
    groups = np.arange(len(labels))
    for start in range(0, 300, 12):  # families of 3 within one class
        groups[start + 1 : start + 3] = groups[start]
    splits = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, 1, ["a", "b", "c"], groups)
    assert straddling_groups(groups, splits) == []
    allidx = np.concatenate(list(splits.values()))
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    for c, n in enumerate([200, 100, 60]):
        share = (labels[splits["train"]] == c).sum() / n
        assert 0.6 < share < 0.8
    # without groups the same families do get split: the guard is what keeps them together
    plain = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, 1, ["a", "b", "c"])
    assert straddling_groups(groups, plain)
    del rng


def test_class_with_too_few_images_is_a_clear_error():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(StageError, match=r"too few images.*bees \(2 images\)"):
        stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, 0, ["ants", "bees"])


def test_predefined_split_errors():
    with pytest.raises(StageError, match="no split hint"):
        predefined_split(["train", ""])
    with pytest.raises(StageError, match="no image has the split hint 'train'"):
        predefined_split(["val", "test"])


def test_phash_is_stable_under_resize_and_recompression(tmp_path):
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((300, 200))
    buf = io.BytesIO()
    img.resize((150, 100)).save(buf, "JPEG", quality=50)
    copy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    other = Image.fromarray(np.random.default_rng(4).integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((300, 200))
    img, copy, other = np.asarray(img), np.asarray(copy), np.asarray(other)
    d_copy = bin(phash(img) ^ phash(copy)).count("1")
    d_other = bin(phash(img) ^ phash(other)).count("1")
    assert d_copy <= 4 < d_other


# ----------------------------------------------------------------------------- stage on synthetic data


def test_preprocess_writes_format_card_and_plots(project):
    src = make_folder(project / "src", {"a": 30, "b": 24, "c": 20})
    p, card = run_stages(project, src, **{"preprocess.image_size": 24})
    ds = PreparedDataset(p.paths.prepared)
    assert ds.classes == ["a", "b", "c"] and ds.image_size == 24
    total = 0
    for name in ("train", "val", "test"):
        s = ds.split(name)
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (24, 24, 3)
        assert isinstance(s.images, np.memmap)  # random access without decoding
        assert len(s.index) == len(s) == card["splits"][name]["count"]
        total += len(s)
    assert total == 74
    saved = json.loads((project / "reports" / "dataset.json").read_text())
    headline = json.loads((project / "metrics" / "dataset.json").read_text())  # DVC metrics: the few headline keys
    assert headline == {"images": 74, "seconds": saved["seconds"]["total"], "throughput_img_s": saved["images_per_second"]}
    assert saved["splits"]["train"]["per_class"] == card["splits"]["train"]["per_class"]
    assert set(saved["source_size"]) >= {"width", "height", "shorter_side_histogram"}
    assert len(saved["mean"]) == 3 and len(saved["std"]) == 3
    assert saved["near_duplicates"]["groups"] == 0
    for png in ("class_histogram.png", "samples.png", "augmented.png"):
        data = (project / "plots" / "dataset" / png).read_bytes()
        assert data.startswith(b"\x89PNG")
    assert json.loads((ds.root / "eval_transform.json").read_text())["transform"]["transforms"][0]["__class_fullname__"] == "Resize"
    assert ds.meta["fingerprint"] and (ds.root / "near_duplicates.csv").exists()
    assert not any(ds.root.glob(".all-images*"))  # the staging array is gone


def test_too_few_images_through_cli_is_one_line_exit_1(project):
    src = make_folder(project / "src", {"a": 20, "b": 2})
    cvpipe("ingest", "--source", str(src), "--quiet", cwd=project)
    proc = cvpipe("preprocess", "--quiet", "-S", "wandb.mode=disabled", cwd=project, check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "too few images" in out and "b (2 images)" in out and "Traceback" not in out
    assert not (project / "data" / "prepared").exists()


def test_oversample_tops_up_train_only(project):
    src = make_folder(project / "src", {"many": 60, "few": 14})
    _, base = run_stages(project, src, **{"preprocess.image_size": 16})
    p, card = run_stages(project, src, **{"preprocess.image_size": 16, "preprocess.oversample": 30})
    tr = card["splits"]["train"]
    assert tr["per_class"]["few"] == 30 and tr["per_class"]["many"] == base["splits"]["train"]["per_class"]["many"]
    assert tr["oversampled"] == 30 - base["splits"]["train"]["per_class"]["few"]
    for name in ("val", "test"):
        assert card["splits"][name] == base["splits"][name]
    ds = PreparedDataset(p.paths.prepared)
    train = ds.split("train")
    synth = [r for r in train.index if r["augmented_from"]]
    assert len(synth) == tr["oversampled"] and all(r["label"] == "few" for r in synth)
    originals = {r["id"] for r in train.index if not r["augmented_from"]}
    assert {r["augmented_from"] for r in synth} <= originals
    heldout = {i for n in ("val", "test") for i in split_ids(Path(p.paths.prepared))[n]}
    assert not heldout & {r["augmented_from"] for r in synth}


def test_prepared_dataset_reads_from_a_remote_url_by_copying_once(project, monkeypatch, tmp_path_factory):
    import fsspec

    src = make_folder(project / "src", {"a": 20, "b": 20})
    p, _ = run_stages(project, src, **{"preprocess.image_size": 16})
    local = PreparedDataset(p.paths.prepared)
    fs = fsspec.filesystem("memory")
    fs.put(str(Path(p.paths.prepared)) + "/", "/bucket/prepared", recursive=True)
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CVPIPE_CACHE", str(cache))
    remote = PreparedDataset("memory://bucket/prepared")
    assert remote.root != local.root and str(remote.root).startswith(str(cache))
    np.testing.assert_array_equal(remote.split("train").images, local.split("train").images)
    assert remote.classes == local.classes
    fs.rm("/bucket/prepared/train/images.npy")  # a second open uses the local copy, no download
    assert len(PreparedDataset("memory://bucket/prepared").split("train")) == len(local.split("train"))
    fs.rm("/bucket", recursive=True)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def hymenoptera_raw(real_data, tmp_path_factory) -> Path:
    """hymenoptera_data ingested once (split layout kept as split_hint), through the real CLI."""
    files = hymenoptera_files(real_data)
    root = real_data / "hymenoptera_data"
    farm = link_farm(tmp_path_factory.mktemp("hym-src") / "hymenoptera", [(f, f.relative_to(root)) for f in files])
    proj = tmp_path_factory.mktemp("hym-proj")
    write_params(proj)
    cvpipe("ingest", "--source", str(farm), "--out", str(proj / "raw"), "--quiet", cwd=proj)
    return proj / "raw"


@pytest.mark.realdata
@pytest.mark.slow
def test_predefined_split_is_kept_exactly_on_hymenoptera(project, hymenoptera_raw):
    rows = manifest(hymenoptera_raw)
    hint = {r["id"]: r["split_hint"] for r in rows}
    assert set(hint.values()) == {"train", "val"}
    base = {"split.strategy": "predefined", "preprocess.image_size": 32, "paths.raw": str(hymenoptera_raw),
            "wandb.mode": "disabled", "preprocess.workers": 2}
    # default test_from=val: val/ becomes the test split untouched, val is carved from train/
    p = load_params(project / "params.yaml", base)
    card = preprocess.run(p)
    ids = split_ids(Path(p.paths.prepared))
    assert sorted(ids["test"]) == sorted(i for i, h in hint.items() if h == "val")
    assert sorted(ids["train"] + ids["val"]) == sorted(i for i, h in hint.items() if h == "train")
    assert not set(ids["train"]) & set(ids["val"])
    assert card["splits"]["val"]["count"] > 0 and not card["splits"]["val"]["missing_classes"]
    # test_from=train: train/ and val/ both kept exactly, test carved from train/
    p2 = load_params(project / "params.yaml", {**base, "split.test_from": "train", "paths.prepared": "data/prepared2"})
    preprocess.run(p2)
    ids2 = split_ids(Path("data/prepared2"))
    assert sorted(ids2["val"]) == sorted(i for i, h in hint.items() if h == "val")
    assert sorted(ids2["train"] + ids2["test"]) == sorted(i for i, h in hint.items() if h == "train")


@pytest.mark.realdata
@pytest.mark.slow
def test_stratified_keeps_planted_near_duplicates_in_one_split(project, real_data):
    files = [f for f in hymenoptera_files(real_data) if f.suffix.lower() in (".jpg", ".jpeg")]
    # all photos as plain class folders (no split layout) ...
    farm = link_farm(project / "photos", [(f, Path(f.parent.name) / f"{f.parent.parent.name}_{f.name}") for f in files])
    # ... plus planted near-duplicates: resized and recompressed copies of 10 photos
    families: dict[str, list[str]] = {}
    for f in files[::40][:10]:
        with Image.open(f) as im:
            im = im.convert("RGB")
            orig_uri = (farm / f.parent.name / f"{f.parent.parent.name}_{f.name}").as_posix()
            family = [orig_uri]
            for k, (scale, quality) in enumerate([(0.5, 70), (0.8, 40), (1.0, 25)]):
                dst = farm / f.parent.name / f"copy{k}_{f.stem}.jpg"
                im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale)))).save(dst, quality=quality)
                family.append(dst.as_posix())
            families[f.name] = family
    over = {"preprocess.image_size": 32, "split.seed": 7}
    p, card = run_stages(project, farm, **over)
    uri_split = {}
    for name, ids in split_ids(Path(p.paths.prepared)).items():
        by_id = {r["id"]: r["source_uri"] for r in manifest(project / "raw")}
        for i in ids:
            uri_split[by_id[i]] = name
    for name, fam in families.items():
        where = {uri_split[u] for u in fam}
        assert len(where) == 1, f"{name}: near-duplicates straddle {where}"
    assert card["near_duplicates"]["groups"] >= len(families)
    assert card["near_duplicates"]["straddling_splits"] == 0
    with open(Path(p.paths.prepared) / "near_duplicates.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    grouped = {r["source_uri"]: r["group"] for r in listed}
    for fam in families.values():
        assert len({grouped[u] for u in fam}) == 1  # each family reported as one group
    # the same split without the guard scatters some family: the guard is doing the work
    p2, _ = run_stages(project, farm, **over, **{"split.near_duplicate_distance": None, "paths.prepared": "data/p2"})
    scattered = 0
    by_id = {r["id"]: r["source_uri"] for r in manifest(project / "raw")}
    uri_split2 = {by_id[i]: n for n, ids in split_ids(Path("data/p2")).items() for i in ids}
    for fam in families.values():
        scattered += len({uri_split2[u] for u in fam}) > 1
    assert scattered > 0


# ----------------------------------------------------------------------------- fast decode == shared resize


def test_fast_jpeg_decode_matches_the_pillow_path_used_by_the_app():
    from cvpipe.data.resize import decode_for_size, scale_factor

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    fast = decode_for_size(data, 128)
    slow = np.asarray(open_for_size(data, 128))
    assert scale_factor(1600, 1200, 128) == 8 and fast.shape == (150, 200, 3) and fast.dtype == np.uint8
    a = fit_array(fast, 128).astype(np.int16)
    b = fit_array(slow, 128).astype(np.int16)
    assert np.abs(a - b).mean() < 2.0  # same libjpeg DCT scaling, same fit_array
    # the manifest's (width, height) gives the same pixels without parsing the header
    assert np.array_equal(decode_for_size(data, 128, (1600, 1200)), fast)
    # a wrong shape (claiming a bigger image) would decode 1/8 instead of 1/2: caught, decoded right
    assert scale_factor(1600, 1200, 400) == 2 and scale_factor(6400, 4800, 400) == 8
    assert decode_for_size(data, 400, (6400, 4800)).shape == (600, 800, 3)
    png = io.BytesIO()
    img.save(png, "PNG")
    assert decode_for_size(png.getvalue(), 128).shape == (1200, 1600, 3)  # non-JPEG: Pillow path


def test_phash_equals_imagehash_on_the_same_thumbnail():
    import imagehash

    rng = np.random.default_rng(2)
    for _ in range(10):
        im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        ref = int(np.packbits(imagehash.phash(im).hash.flatten()).view(">u8")[0])
        assert phash(np.asarray(im.convert("L"))) == ref


# ----------------------------------------------------------------------------- DVC skip behaviour


def _dvc(repo: Path, *args: str, check: bool = True):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(repo / "src"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_dvc_skips_preprocess_when_unchanged_and_on_train_only_changes(tmp_path):
    import subprocess

    import yaml

    repo = copy_pipeline(tmp_path / "repo")
    src = make_folder(tmp_path / "imgs", {"a": 12, "b": 12})
    write_params(repo, {"ingest.source": str(src), "preprocess.image_size": 16, "wandb.mode": "disabled"})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.autostage", "false")

    first = _dvc(repo, "repro", "preprocess")
    assert "Running stage 'preprocess'" in first.stdout
    assert (repo / "data" / "prepared" / "meta.json").exists() and (repo / "plots" / "dataset" / "augmented.png").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["preprocess"]
    assert set(lock["params"]["params.yaml"]) == {"preprocess", "split", "augment"}

    again = _dvc(repo, "repro", "preprocess")
    assert "Running stage 'preprocess'" not in again.stdout and "didn't change" in again.stdout

    # a train-only change: train is outdated, preprocess is not, and repro skips it
    write_params(repo, {"ingest.source": str(src), "preprocess.image_size": 16, "wandb.mode": "disabled",
                        "train.epochs": 3, "train.lr": 0.01}, base=repo / "params.yaml")
    status = json.loads(_dvc(repo, "status", "--json").stdout)
    assert any(s.startswith("train@") for s in status) and "preprocess" not in status  # train is a matrix stage (train@<arch>-<seed>)
    assert "Running stage 'preprocess'" not in _dvc(repo, "repro", "preprocess").stdout

    # a preprocess change does rerun it
    write_params(repo, {"preprocess.image_size": 24}, base=repo / "params.yaml")
    status = json.loads(_dvc(repo, "status", "preprocess", "--json").stdout)
    assert "preprocess" in status
    assert "Running stage 'preprocess'" in _dvc(repo, "repro", "preprocess").stdout
    assert PreparedDataset(repo / "data" / "prepared").image_size == 24


def test_mean_std_from_channel_histograms_equals_the_float_computation():
    from cvpipe.preprocess.stage import mean_std

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (37, 9, 11, 3), dtype=np.uint8)
    images[..., 2] //= 3  # channels with different statistics
    x = images.astype(np.float64) / 255.0
    mean, std = mean_std(images, pixels_per_chunk=250)  # chunks of 2 images, the last one short
    assert mean == [round(float(v), 5) for v in x.mean(axis=(0, 1, 2))]
    assert std == [round(float(v), 5) for v in x.std(axis=(0, 1, 2))]
    assert mean_std(images[:0]) == ([0.0] * 3, [0.0] * 3)


def test_mean_std_memory_does_not_grow_with_the_image_size():
    """At 224 px the float64 chunks held ~1.2 GB for 512 images; the histograms hold a chunk's own bytes."""
    import tracemalloc

    from cvpipe.preprocess.stage import mean_std

    images = np.full((600, 224, 224, 3), 128, dtype=np.uint8)
    tracemalloc.start()
    try:
        mean, _ = mean_std(images)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mean == [round(128 / 255, 5)] * 3
    assert peak < 64 * 2**20, peak
