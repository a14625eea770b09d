"""Augmentation declared in params: validation, exact round trip, derived eval transform, CLI errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_params
from conftest import cvpipe as _cvpipe

from cvpipe.core.config import AugmentParams, load_params
from cvpipe.core.errors import ParamsError
from cvpipe.data import augment

DECLARED = [
    {"HorizontalFlip": {"p": 0.5}},
    {"Affine": {"translate_percent": [-0.1, 0.1], "scale": [0.9, 1.1], "rotate": [-15, 15], "p": 0.8}},
    {"ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05, "p": 0.5}},
    {"CoarseDropout": {"num_holes_range": [1, 3], "hole_height_range": [4, 8], "hole_width_range": [4, 8], "p": 0.3}},
]


def cvpipe(*args, **kw):
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]), **kw.pop("env", {})}
    return _cvpipe(*args, env=env, **kw)


def test_round_trip_params_to_albumentations_to_json_to_identical_pipeline(tmp_path):
    params = AugmentParams(train=DECLARED)
    built = augment.build(params, seed=5)
    assert [type(t).__name__ for t in built.transforms] == [next(iter(d)) for d in DECLARED]
    saved = tmp_path / "augment.json"
    saved.write_text(augment.to_json(built))
    restored = augment.from_json_file(saved)
    assert augment.to_dict(restored) == augment.to_dict(built)
    assert json.loads(augment.to_json(restored)) == json.loads(saved.read_text())  # JSON view (tuples as lists)
    # identical behaviour, not just identical description: same seed -> same pixels
    img = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    built.set_random_seed(11)
    restored.set_random_seed(11)
    outs_a = [built(image=img)["image"] for _ in range(5)]
    outs_b = [restored(image=img)["image"] for _ in range(5)]
    for a, b in zip(outs_a, outs_b):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, img) for a in outs_a)  # it does augment


def test_declared_arguments_reach_the_transform():
    built = augment.build(AugmentParams(train=[{"Affine": {"rotate": [-7, 7], "p": 0.25}}]))
    (t,) = built.transforms
    assert t.p == 0.25 and tuple(t.rotate) == (-7, 7)


@pytest.mark.parametrize(
    "item, match",
    [
        ({"NotATransform": {"p": 1}}, r"augment\.train\[0\]: unknown albumentations transform 'NotATransform'"),
        ({"HorizontalFlip": {"probability": 0.5}}, r"augment\.train\[0\]\.HorizontalFlip: unknown argument\(s\) probability"),
        ({"Affine": {"rotate": "a lot"}}, r"augment\.train\[0\]\.Affine: invalid arguments"),
        ({"Normalize": {}}, r"leave normalization out"),
        ({"Compose": {}}, r"unknown albumentations transform 'Compose'"),
    ],
)
def test_bad_declarations_name_the_item(item, match):
    with pytest.raises(ParamsError, match=match):
        augment.build(AugmentParams(train=[{"HorizontalFlip": {"p": 0.5}}][:0] + [item]))


def test_one_transform_per_item_is_checked_at_load(tmp_path):
    path = write_params(tmp_path, {"augment.train": [{"HorizontalFlip": {}, "VerticalFlip": {}}]})
    with pytest.raises(ParamsError, match=r"augment\.train: .*exactly one transform"):
        load_params(path)


def test_eval_transform_is_derived_resize_and_normalize_only():
    ev = augment.eval_pipeline(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert [type(t).__name__ for t in ev.transforms] == ["Resize", "Normalize"]
    img = np.full((80, 100, 3), 128, np.uint8)
    a, b = ev(image=img)["image"], ev(image=img)["image"]
    np.testing.assert_array_equal(a, b)  # deterministic
    assert a.shape == (64, 64, 3) and np.allclose(a, (128 / 255 - 0.5) / 0.25, atol=1e-3)
    assert [type(t).__name__ for t in augment.eval_pipeline(32).transforms] == ["Resize"]


def test_bad_transform_name_exits_2_naming_it_and_writes_nothing(project):
    cvpipe("ingest", "--quiet", cwd=project)  # the digits sample
    proc = cvpipe("preprocess", "--quiet", "-S", "augment.train=[{Flipp: {p: 0.5}}]", cwd=project, check=False)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "Flipp" in out and "unknown albumentations transform" in out and "Traceback" not in out
    assert not (project / "data" / "prepared").exists() and not (project / "metrics" / "dataset.json").exists()
    # a bad argument in params.yaml itself: the same, naming the argument
    write_params(project, {"augment.train": [{"Affine": {"rotate": [-10, 10], "shear_amount": 3}}]})
    proc = cvpipe("preprocess", "--quiet", cwd=project, check=False)
    assert proc.returncode == 2 and "shear_amount" in proc.stdout + proc.stderr


def test_saved_pipeline_beside_dataset_equals_params_and_is_logged_to_wandb(project):
    write_params(project, {"augment.train": DECLARED[:2], "preprocess.image_size": 16})
    cvpipe("ingest", "--quiet", cwd=project)
    cvpipe("preprocess", "--quiet", cwd=project)  # W&B offline (conftest)
    saved = json.loads((project / "data" / "prepared" / "augment.json").read_text())
    expected = json.loads(augment.to_json(augment.build(AugmentParams(train=DECLARED[:2]), seed=42)))
    assert saved == expected
    runs = list((project / "wandb").glob("**/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    files = runs[0].parent / "files"
    media = {p.name.split("_")[0] for p in files.glob("media/images/dataset/*.png")}
    assert {"class", "samples", "augmented"} <= media
    config = {}
    for rec in wandb_records(runs[0]):
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):
            for item in (rec.config if kind == "config" else rec.run.config).update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert config["augmentation"] == expected


def wandb_records(path: Path):
    """Records of an offline .wandb file (LevelDB-log framing; see ../shared/notes/environment.md)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last fragment
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""
