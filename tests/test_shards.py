"""The sharded prepared format (``preprocess.format: shards``): WebDataset tar shards, random access,
the deterministic streaming order (ranks, workers, resume), and train/evaluate on shards from ``gs://``
against the arrays of the same preprocess."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import absolute_pythonpath, cvpipe, digit_folders, write_params

from cvpipe.data import shards
from cvpipe.data.prepared import PreparedDataset, Split

RUN = "test_resnet/seed42"


def _coded_images(n: int, size: int = 16) -> np.ndarray:
    """Images whose pixels name their row (channel 0: row % 251, channel 1: row // 251) over random noise."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[:, :4, :4, 0] = (np.arange(n) % 251)[:, None, None]
    images[:, :4, :4, 1] = (np.arange(n) // 251)[:, None, None]
    return images


def _row_of(image: np.ndarray) -> int:
    return int(image[0, 0, 0]) + 251 * int(image[0, 0, 1])


def _sharded_split(folder: Path, n: int, shard_size: int, encoding: str = "png") -> tuple[Split, np.ndarray]:
    images = _coded_images(n)
    labels = np.arange(n) % 3
    shards.write_split(folder, images, labels, [f"id{i}" for i in range(n)], shard_size, encoding, 90)
    np.save(folder / "labels.npy", labels)
    return Split("train", shards.load_split(str(folder), folder, images.shape[1]), labels), images


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_lossless_shards_give_back_the_same_pixels_by_any_index(tmp_path, encoding):
    split, images = _sharded_split(tmp_path, 23, shard_size=5, encoding=encoding)
    got = split.images
    assert len(got) == 23 and got.shape == images.shape
    assert np.array_equal(got[7], images[7]) and np.array_equal(got[-1], images[-1])
    assert np.array_equal(got[3:19], images[3:19])
    rows = [22, 0, 11, 11, 4]  # across shards, out of order, repeated
    assert np.array_equal(got[rows], images[rows])
    mask = np.arange(23) % 4 == 1
    assert np.array_equal(got[mask], images[mask])
    for bad in ([23], 23, -24):
        with pytest.raises(IndexError):
            got[bad]
    # plain tar files, WebDataset's naming: <key>.<ext> per field, any tar reader lists them
    with tarfile.open(tmp_path / "shards" / "000001.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000005.cls", "000000005.id.txt", f"000000005.{encoding}"] and len(names) == 15
    manifest = json.loads((tmp_path / "shards.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]


def test_the_offset_stream_reads_what_webdatasets_own_reader_reads(tmp_path):
    """ShardImages.stream slices each image by offsets.npy, in windows smaller than a shard here; WebDataset's
    reader parses the tar headers: the same rows, bytes and labels, in the same order, every k-th too."""
    import webdataset as wds

    split, _images = _sharded_split(tmp_path, 23, shard_size=10)
    urls = [str(tmp_path / s["name"]) for s in split.shards.manifest["shards"]]
    theirs = [(int(x["__key__"]), x["png"], int(x["cls"])) for x in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    plan = [(shard, 1, 0) for shard in range(3)]
    assert list(shards.iter_samples(split.shards, split.labels, plan)) == theirs
    small = [(row, data) for shard in range(3) for row, data in split.shards.stream(shard, window=2000)]
    assert small == [(row, data) for row, data, _ in theirs]
    assert [row for row, _ in split.shards.stream(1, every=3, keep=2)] == [12, 15, 18]


def test_npy_shards_are_the_arrays_own_bytes_read_by_webdataset_and_checked_on_decode(tmp_path):
    """npy members are NumPy's format, so WebDataset's own decoder gives the same arrays; decode reads them as
    read-only views, like the arrays' memory map, and a member that is not an RGB uint8 image, or is cut
    short, is a clear error rather than garbage pixels."""
    import webdataset as wds

    from cvpipe.core.errors import StageError

    split, images = _sharded_split(tmp_path, 7, shard_size=4, encoding="npy")
    urls = [str(tmp_path / s["name"]) for s in split.shards.manifest["shards"]]
    theirs = {int(x["__key__"]): x for x in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()}
    assert sorted(theirs) == list(range(7))
    assert all(np.array_equal(x["npy"], images[i]) and x["cls"] == i % 3 and x["id.txt"] == f"id{i}" for i, x in theirs.items())
    row, data = next(split.shards.stream(0))
    view = shards.decode(data)
    assert np.array_equal(view, images[row]) and not view.flags.writeable
    assert json.loads((tmp_path / "shards.json").read_text())["quality"] is None
    for bad, why in ((shards.encode(np.zeros((4, 4), np.uint8), "npy", 0), "not an RGB uint8 image"),
                     (data[:-5], "truncated"), (shards.NPY_MAGIC + b"\x01\x00\x10\x00{'descr': junk}", "does not parse")):
        with pytest.raises(StageError, match=why):
            shards.decode(bad)


def test_jpg_shards_are_smaller_and_close(tmp_path):
    rng = np.random.default_rng(1)  # photo-like: smooth shading plus sensor noise
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    base = np.stack([np.sin(3 * xx + k) * np.cos(2 * yy - k) for k in range(3)], axis=-1) * 90 + 128
    photos = np.clip(base[None] + rng.normal(0, 3, size=(6, 64, 64, 3)), 0, 255).astype(np.uint8)
    for enc in ("jpg", "png"):
        shards.write_split(tmp_path / enc, photos, np.zeros(6, int), [str(i) for i in range(6)], 10, enc, 95)
    got = shards.load_split(str(tmp_path / "jpg"), tmp_path / "jpg", 64)[:]
    assert np.abs(got.astype(int) - photos.astype(int)).mean() < 4
    jpg_bytes, png_bytes = (np.load(tmp_path / enc / "offsets.npy")[:, 1].sum() for enc in ("jpg", "png"))
    assert jpg_bytes < png_bytes / 2


@pytest.mark.parametrize("num_shards,slots", [(7, 3), (2, 5), (4, 4), (1, 1)])
def test_every_sample_is_read_by_exactly_one_slot_per_epoch(num_shards, slots):
    counts = [10] * (num_shards - 1) + [4]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for epoch in range(3):
        plan = shards.slot_plan(counts, seed=1, epoch=epoch, slots=slots)
        assert plan == shards.slot_plan(counts, seed=1, epoch=epoch, slots=slots)  # a pure function
        seen = [int(firsts[s] + p) for slot in plan for s, every, off in slot for p in range(counts[s]) if p % every == off]
        assert sorted(seen) == list(range(sum(counts)))
    if num_shards > 2:
        assert shards.slot_plan(counts, 1, 0, slots) != shards.slot_plan(counts, 1, 1, slots)  # reshuffled per epoch


def _epoch_rows(split: Split, rank: int, world: int, workers: int, epoch: int, resume: int = 0, batch: int = 4,
                buffer: int = 8) -> list[list[int]]:
    from cvpipe.torchkit.loaders import make_loader, train_dataset

    ds = train_dataset(split, None, seed=3, batch=batch, drop_last=False, buffer=buffer, rank=rank, world_size=world,
                       workers=workers)
    ds.set_epoch(epoch)
    ds.resume(resume)
    loader = make_loader(ds, batch, True, workers, 3, False)
    out = [[_row_of(img) for img in images.numpy()] for images, _labels in loader]
    assert len(out) == len(loader) - resume
    return out


def test_the_stream_splits_ranks_and_workers_and_resumes_mid_epoch(tmp_path):
    split, _ = _sharded_split(tmp_path, 48, shard_size=6)  # 8 shards
    for workers in (0, 2):
        ranks = [_epoch_rows(split, r, 2, workers, epoch=1) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 48 // 2 // 4  # every rank the same steps
        rows = [x for rank in ranks for batch in rank for x in batch]
        assert sorted(rows) == list(range(48))  # an even split: each image once per epoch
        assert ranks[0] == _epoch_rows(split, 0, 2, workers, epoch=1)  # the same order on a rerun
        assert ranks[0] != _epoch_rows(split, 0, 2, workers, epoch=2)
        # resume after 3 batches: the rest of the epoch, batch for batch, undecoded batches skipped
        assert _epoch_rows(split, 1, 2, workers, epoch=1, resume=3) == ranks[1][3:]
    # one loader over several epochs: its persistent workers see each new epoch's order
    from cvpipe.torchkit.loaders import make_loader, train_dataset

    ds = train_dataset(split, None, seed=3, batch=4, drop_last=False, buffer=8, rank=0, world_size=2, workers=2)
    loader = make_loader(ds, 4, True, 2, 3, False)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        assert [[_row_of(i) for i in images.numpy()] for images, _ in loader] == _epoch_rows(split, 0, 2, 2, epoch)
    # an uneven split: 48 images over 5 ranks pad to whole batches, the same count on every rank
    five = [_epoch_rows(split, r, 5, 0, epoch=0) for r in range(5)]
    assert {len(r) for r in five} == {3} and set(x for r in five for b in r for x in b) == set(range(48))


# --------------------------------------------------------------------------- the stages on shards


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory) -> Path:
    """10 classes x 30 digits as class folders, ingested once."""
    root = tmp_path_factory.mktemp("digits")
    write_params(root, {"ingest.source": str(digit_folders(root / "src", 10, 30)), "ingest.workers": 1})
    cvpipe("ingest", "-q", cwd=root, env=absolute_pythonpath())
    return root / "data" / "raw"


def _project(folder: Path, raw: Path, **sets) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"paths.raw": str(raw), "preprocess.workers": 1, "train.arch": "test_resnet", "train.epochs": 8,
            "train.batch_size": 16, "train.lr": 0.05, "train.warmup_epochs": 0, "train.workers": 0, "train.deterministic": True,
            "wandb.mode": "disabled", "evaluate.export": False}
    write_params(folder, {**base, **sets})
    return folder


def _augmentation():
    import albumentations as A

    return A.Compose([A.RandomBrightnessContrast(p=1.0), A.HorizontalFlip(p=0.5)])


def _augmented_epochs(split: Split, epochs: int, fresh: bool, workers: int = 2, resume: int = 0) -> list[list[bytes]]:
    """Each epoch's batches, as bytes: one persistent loader, or a new one per epoch (a run resumed at an
    epoch end); with *resume*, the loader starts each epoch after that many batches (a mid-epoch resume)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from cvpipe.torchkit.loaders import SkippingSampler, collate_uint8, make_loader, train_dataset

    out, loader, gen = [], None, torch.Generator()
    for epoch in range(epochs):
        gen.manual_seed(5 + epoch)  # the arrays' order of the epoch, as a restored loader generator gives it
        if loader is None or fresh:
            ds = train_dataset(split, _augmentation(), seed=5, batch=4, drop_last=False, buffer=8, workers=workers)
            if split.shards is None:  # as train builds it: a sampler that can skip
                sampler = SkippingSampler(RandomSampler(ds, generator=gen))
                loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate_uint8,
                                    persistent_workers=workers > 0)
            else:
                loader = make_loader(ds, 4, True, workers, 5, False)
        ds.set_epoch(epoch)
        if resume:
            if split.shards is None:
                loader.sampler.skip = resume * 4  # indices, not batches
            else:
                ds.resume(resume)
        out.append([images.numpy().tobytes() for images, _labels in loader])
    return out


def _per_image(epochs: list[list[bytes]]) -> list[list[bytes]]:
    """Each epoch's augmented images, sorted: what was drawn for each image, whatever the order."""
    return [sorted(b[i * 16 * 16 * 3:(i + 1) * 16 * 16 * 3] for b in batches for i in range(len(b) // (16 * 16 * 3)))
            for batches in epochs]


def test_each_image_is_augmented_by_seed_epoch_and_row_whoever_reads_it(tmp_path):
    """Augmentation is seeded per image by (seed, epoch, row): the arrays and the shards of one split, read by
    the main process or by 2 loader workers, in their different orders, give every image the same draws;
    epochs differ; a persistent loader augments as a new loader per epoch; and a loader resumed after 3
    batches of an epoch, with workers, gives the rest of the uninterrupted epoch's batches bit for bit
    (before per-image seeds, each worker drew from a stream of its own and a mid-epoch resume restarted it)."""
    ramp = np.arange(16, dtype=np.uint8)[None, :, None] * 4  # not mirror-symmetric: a flip shows
    images = (np.arange(32, dtype=np.uint8)[:, None, None, None] * 3 + ramp + np.zeros((32, 16, 16, 3), np.uint8))
    labels = np.arange(32) % 3
    shards.write_split(tmp_path, images, labels, [f"id{i}" for i in range(32)], 8, "png", 90)
    splits = {"arrays": Split("train", images, labels),
              "shards": Split("train", shards.load_split(str(tmp_path), tmp_path, 16), labels)}
    drawn = {}
    for fmt, split in splits.items():
        persistent = _augmented_epochs(split, 2, fresh=False)
        assert _augmented_epochs(split, 2, fresh=True) == persistent, fmt
        assert [b[3:] for b in persistent] == _augmented_epochs(split, 2, fresh=True, resume=3), fmt
        for workers in (2, 0):
            drawn[fmt, workers] = _per_image(_augmented_epochs(split, 2, fresh=True, workers=workers))
    first = drawn["arrays", 0]
    assert all(d == first for d in drawn.values()), [k for k, d in drawn.items() if d != first]
    assert len(set(first[0])) == 32 and not set(first[0]) & set(first[1])  # draws differ by image and by epoch
    # identical images: the batches show the draws alone, and no two of an epoch's 8 match
    same = Split("train", np.full((32, 16, 16, 3), 100, dtype=np.uint8), labels)
    assert all(len(set(batches)) == 8 for batches in _augmented_epochs(same, 2, fresh=False))


@pytest.mark.slow
def test_shards_on_gcs_train_and_evaluate_like_the_arrays_of_the_same_preprocess(tmp_path, digits_source, monkeypatch):
    """Preprocess once as arrays (local) and once as lossless shards into a bucket on the GCS emulator.
    Evaluating one checkpoint on both gives the same metrics bit for bit (same pixels, same order).
    Training on the streamed shards (a different order: shard shuffle + buffer, so not bit-identical) reaches
    the arrays run's test accuracy within 0.05 (stated tolerance: two of the 47 test images; 210 train images,
    8 epochs of a 0.37 M-parameter model; both runs are deterministic, so the outcome does not vary by run)."""
    from servers import gcs_emulator

    arrays = _project(tmp_path / "arrays", digits_source)
    with gcs_emulator(tmp_path / "gcs") as endpoint:
        import gcsfs

        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        monkeypatch.setenv("CVPIPE_CACHE", str(tmp_path / "cache"))
        gcsfs.GCSFileSystem.clear_instance_cache()  # a cached filesystem would still point at an earlier emulator
        gcsfs.GCSFileSystem(token="anon").mkdir("data")
        env = {**absolute_pythonpath(), "STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "CVPIPE_CACHE": str(tmp_path / "cache")}
        sharded = _project(tmp_path / "shards", digits_source, **{
            "paths.prepared": "gs://data/prepared", "preprocess.format": "shards", "preprocess.shard_size": 40,
            "preprocess.shard_encoding": "png", "train.shuffle_buffer": 64})
        for folder in (arrays, sharded):
            cvpipe("preprocess", "-q", cwd=folder, env=env)
        fs = gcsfs.GCSFileSystem(token="anon")
        assert fs.exists("data/prepared/train/shards/000000.tar") and not fs.exists("data/prepared/train/images.npy")
        local = PreparedDataset(arrays / "data" / "prepared")
        remote = PreparedDataset("gs://data/prepared")
        assert not list(Path(remote.root).rglob("*.tar"))  # only the small files came down; shards stream
        for name in ("train", "val", "test"):
            assert np.array_equal(remote.split(name).images[:], local.split(name).images[:]), name

        cvpipe("train", "-q", cwd=arrays, env=env)
        cvpipe("train", "-q", cwd=sharded, env=env)
        # the arrays run's checkpoints, evaluated on the sharded test split: the same numbers
        (sharded / "models").rename(sharded / "streamed-models")
        shutil.copytree(arrays / "models", sharded / "models")
        cvpipe("evaluate", "-q", cwd=arrays, env=env)
        cvpipe("evaluate", "-q", cwd=sharded, env=env)
        a, b = (json.loads((f / "metrics" / RUN / "evaluate.json").read_text()) for f in (arrays, sharded))
        assert {k: v for k, v in a.items() if "ms" not in k and "_s" not in k} == \
            {k: v for k, v in b.items() if "ms" not in k and "_s" not in k}
        # and the model trained on the stream
        shutil.rmtree(sharded / "models")
        (sharded / "streamed-models").rename(sharded / "models")
        cvpipe("evaluate", "-q", cwd=sharded, env=env)
        s = json.loads((sharded / "metrics" / RUN / "evaluate.json").read_text())
    assert abs(s["accuracy"] - a["accuracy"]) <= 0.05, (s["accuracy"], a["accuracy"])
    assert s["accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_on_shards_then_resume_matches_uninterrupted_run(tmp_path, digits_source, workers):
    """A deterministic run on shards, checkpointed every 4 updates, is SIGKILLed at step 2 of epoch 2; the
    automatic resume (from the mid-epoch last.pt) skips the stream's first 2 batches undecoded, restores the
    epoch's sums (each image's augmentation is seeded by seed, epoch and row), and ends with the uninterrupted
    run's history and weights, bit for bit: in the main process and with 2 loader workers."""
    import torch

    from cvpipe.torchkit.models import load_checkpoint

    sets = {"preprocess.format": "shards", "preprocess.shard_size": 50, "train.ema": True, "train.mixup_alpha": 0.2,
            "train.warmup_epochs": 1, "train.batch_size": 32, "train.epochs": 3, "train.checkpoint_every_updates": 4,
            "train.workers": workers}
    ref = _project(tmp_path / "ref", digits_source, **sets)
    cvpipe("preprocess", "-q", cwd=ref, env=absolute_pythonpath())
    killed = _project(tmp_path / "killed", digits_source, **sets, **{"paths.prepared": str(ref / "data" / "prepared")})
    cvpipe("train", "-q", cwd=ref, env=absolute_pythonpath())
    # 210 train images, batch 32, mixup drops partial batches: 6 steps per epoch -> step 8 is mid epoch 2
    proc = cvpipe("train", "-q", cwd=killed, env={**absolute_pythonpath(), "CVPIPE_FAULT_KILL_AFTER_STEPS": "8"}, check=False)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    last = load_checkpoint(killed / "models" / RUN / "last.pt")
    assert last["epoch"] == 1 and last["epoch_progress"]["step"] == 2 and last["epoch_progress"]["seen"] == 64
    proc = cvpipe("train", cwd=killed, env=absolute_pythonpath())
    assert "after epoch 1 and 2 steps of epoch 2" in proc.stdout + proc.stderr
    timing = {"img_per_s", "seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in _history(killed)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _history(ref)]
    a = load_checkpoint(ref / "models" / RUN / "last.pt")
    b = load_checkpoint(killed / "models" / RUN / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def _history(folder: Path) -> list[dict]:
    import csv

    with open(folder / "plots" / RUN / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))
