"""params.yaml validation: every malformed file exits 2, names the key and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, cvpipe, write_params

from cvpipe.core.config import Params, apply_overrides, load_params, parse_override
from cvpipe.core.errors import ParamsError


def test_repo_params_yaml_is_valid_and_matches_defaults():
    p = load_params(REPO / "params.yaml")
    assert p.ingest.source == "sample://digits"
    # the file documents every default: nothing in the schema is missing from it
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, model in Params.model_fields.items():
        assert section in data, f"params.yaml lacks section {section}"
        sub = model.annotation.model_fields
        missing = set(sub) - set(data[section])
        assert not missing, f"params.yaml section {section} lacks keys {missing}"


# (description, overrides applied to a copy of params.yaml, key expected in the message)
BAD = [
    ("unknown top-level section", {"trian": {"epochs": 3}}, "trian"),
    ("unknown key in a section", {"train.epoch": 3}, "train.epoch"),
    ("wrong type", {"train.epochs": "ten"}, "train.epochs"),
    ("negative learning rate", {"train.lr": -0.1}, "train.lr"),
    ("zero batch size", {"train.batch_size": 0}, "train.batch_size"),
    ("image size below 16", {"preprocess.image_size": 8}, "preprocess.image_size"),
    ("split fractions not summing to 1", {"split.train": 0.8}, "split"),
    ("unknown resize mode", {"preprocess.resize_mode": "squash"}, "preprocess.resize_mode"),
    ("unknown amp mode", {"train.amp": "fp8"}, "train.amp"),
    ("bad device", {"train.device": "tpu"}, "train.device"),
    ("background channel out of range", {"ingest.background": [0, 300, 0]}, "ingest.background"),
    ("empty source", {"ingest.source": ""}, "ingest.source"),
    ("missing source folder", {"ingest.source": "does/not/exist"}, "ingest.source"),
    ("unknown sample", {"ingest.source": "sample://cats"}, "ingest.source"),
    ("warmup longer than training", {"train.warmup_epochs": 20, "train.epochs": 5}, "warmup_epochs"),
    ("section is not a mapping", {"train": [1, 2]}, "train"),
    ("unknown W&B mode", {"wandb.mode": "sometimes"}, "wandb.mode"),
    ("augment item with two transforms", {"augment.train": [{"HorizontalFlip": {}, "VerticalFlip": {}}]}, "augment.train"),
]

STAGE_FOR = {"ingest": "ingest", "augment": "preprocess"}


def _write_bad(folder: Path, overrides: dict) -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    flat = {k: v for k, v in overrides.items() if "." in k}
    whole = {k: v for k, v in overrides.items() if "." not in k}
    data = apply_overrides(data, flat)
    data.update(whole)
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("desc,overrides,key", BAD, ids=[b[0] for b in BAD])
def test_malformed_params_exit_2_naming_the_key(tmp_path, desc, overrides, key):
    _write_bad(tmp_path, overrides)
    section = next(iter(overrides)).split(".")[0]
    stage = STAGE_FOR.get(section, "ingest")
    before = set(tmp_path.iterdir())
    proc = cvpipe(stage, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, (desc, proc.returncode, proc.stderr)
    assert key in proc.stderr, (desc, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert set(tmp_path.iterdir()) == before, f"{desc}: wrote {set(tmp_path.iterdir()) - before}"


def test_invalid_yaml_names_the_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: [1, 2\n")
    proc = cvpipe("train", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert "line" in proc.stderr and "params.yaml" in proc.stderr


def test_missing_explicit_params_file(tmp_path):
    proc = cvpipe("ingest", "--params", "nope.yaml", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr


def test_bad_cli_override_exits_2(tmp_path):
    write_params(tmp_path)
    proc = cvpipe("train", "-S", "train.lr=-3", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "train.lr" in proc.stderr
    proc = cvpipe("train", "--epochs", "many", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2


def test_unknown_arch_exits_2_with_suggestion(tmp_path):
    write_params(tmp_path)
    proc = cvpipe("train", "--arch", "resnet1800", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert "train.arch" in proc.stderr and "resnet18" in proc.stderr


def test_bad_augmentation_name_exits_2(tmp_path):
    write_params(tmp_path, {"augment.train": [{"HorizontalFlipp": {"p": 0.5}}]})
    proc = cvpipe("preprocess", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert "HorizontalFlipp" in proc.stderr


def test_overrides_parse_yaml_values():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("ingest.source=[a, b]") == ("ingest.source", ["a", "b"])
    assert parse_override("train.pretrained_path=null") == ("train.pretrained_path", None)
    with pytest.raises(ParamsError):
        parse_override("train.epochs")
    p = load_params(REPO / "params.yaml", {"train.epochs": 2, "split.train": 0.8, "split.val": 0.1, "split.test": 0.1})
    assert p.train.epochs == 2 and p.split.train == 0.8


def test_help_explains_every_option():
    proc = cvpipe("train", "--help", check=False, timeout=120)
    assert proc.returncode == 0
    for opt in ("--arch", "--epochs", "--batch-size", "--lr", "--device", "--params", "--set", "--quiet", "--debug"):
        assert opt in proc.stdout
