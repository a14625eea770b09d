"""End-to-end: the four real stages through the real CLI, on a slice of the sample and on real photos."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cvpipe, make_digits_slice, write_params
from repo_files import copy_pipeline
from PIL import Image
from test_metrics_columns import assert_readable_metrics
from wandb_offline import find_runs, read_run

PER_CLASS = 30


@pytest.fixture(scope="module")
def digits_slice(tmp_path_factory) -> Path:
    """A small class-folder copy of the digits sample: PER_CLASS images per class."""
    return make_digits_slice(tmp_path_factory, PER_CLASS)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_four_stages_on_sample_slice(project, digits_slice):
    write_params(project, {"ingest.source": str(digits_slice), "train.epochs": 3, "train.warmup_epochs": 1})
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        cvpipe(stage, "--quiet", cwd=project)

    ingest = json.loads((project / "metrics/ingest.json").read_text())
    assert ingest["images"] == 10 * PER_CLASS and ingest["quarantined"] == 0
    manifest = _read_csv(project / "data/raw/manifest.csv")
    assert len(manifest) == 10 * PER_CLASS
    for row in manifest[:20]:
        img = Image.open(project / "data/raw" / row["path"])
        assert img.mode == "RGB" and img.size == (8, 8)

    card = json.loads((project / "reports/dataset.json").read_text())
    assert sum(s["count"] for s in card["splits"].values()) == 10 * PER_CLASS
    assert all(len(s["per_class"]) == 10 for s in card["splits"].values())  # stratified: every class in every split

    history = _read_csv(project / "plots/resnet18/seed42/history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert (project / "models/resnet18/seed42/best.pt").stat().st_size > 1_000_000
    assert (project / "models/resnet18/seed42/last.pt").exists()

    ev = json.loads((project / "metrics/resnet18/seed42/evaluate.json").read_text())
    assert ev["n_test"] == card["splits"]["test"]["count"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["macro_f1"] <= 1.0
    confusion = _read_csv(project / "plots/resnet18/seed42/confusion.csv")
    assert len(confusion) == ev["n_test"]
    assert sum(r["actual"] == r["predicted"] for r in confusion) / len(confusion) == pytest.approx(ev["accuracy"], abs=1e-6)
    png = Image.open(project / "plots/resnet18/seed42/confusion_matrix.png")
    assert png.format == "PNG" and png.size[0] > 300

    # the offline W&B runs hold what the stages logged
    runs = {r.job_type: r for r in map(read_run, find_runs(project / "wandb"))}
    assert set(runs) == {"preprocess", "train", "evaluate"}
    tr = runs["train"]
    assert tr.config["train"]["epochs"] == 3 and tr.config["train"]["arch"] == "resnet18"
    assert tr.config["ingest"]["source"] == str(digits_slice)
    epochs = [h for h in tr.history if "val/acc" in h]
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    for h, row in zip(epochs, history):
        assert h["val/acc"] == pytest.approx(float(row["val_acc"]))
        assert h["train/loss"] == pytest.approx(float(row["train_loss"]))
    assert "resnet18" in tr.tags
    # train logs its checkpoints (optimizer state included) as a checkpoint; "the model" is evaluate's (test_wandb_lineage)
    assert [a["name"] for a in tr.artifacts if a["type"] == "checkpoint"] == ["checkpoint-resnet18-seed42"]
    assert not any(a["type"] == "model" for a in tr.artifacts)
    assert runs["evaluate"].summary["test/accuracy"] == pytest.approx(ev["accuracy"])
    assert tr.exit_code == 0


@pytest.mark.realdata
@pytest.mark.slow
def test_hymenoptera_end_to_end(project, real_data):
    src = real_data / "hymenoptera_data"
    write_params(
        project,
        {
            "ingest.source": str(src),
            "ingest.min_size": 32,
            "preprocess.image_size": 64,
            "augment.train": [{"HorizontalFlip": {"p": 0.5}}],
            "train.epochs": 1,
            "train.warmup_epochs": 0,
            "train.batch_size": 32,
        },
    )
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        cvpipe(stage, "--quiet", cwd=project)
    ingest = json.loads((project / "reports/ingest.json").read_text())
    n_files = sum(1 for p in src.rglob("*") if p.is_file())  # photos + SHA256SUMS (quarantined: no class)
    assert ingest["accepted"] + ingest["quarantined"] == n_files
    assert set(ingest["per_class"]) == {"ants", "bees"}
    assert ingest["per_split_hint"].keys() == {"train", "val"}
    ev = json.loads((project / "reports/resnet18/seed42/evaluate.json").read_text())  # the full report (per class)
    card = json.loads((project / "reports/dataset.json").read_text())
    assert ev["n_test"] == card["splits"]["test"]["count"] > 40
    assert set(ev["per_class"]) == {"ants", "bees"}


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path, digits_slice):
    """dvc repro end to end, then: no-op rerun, params diff, metrics, plots, and a train-only change."""
    repo = copy_pipeline(tmp_path / "repo")
    write_params(repo, {"ingest.source": str(digits_slice), "train.epochs": 2})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo, env)
    out = _run(dvc + ["repro"], repo, env)
    for stage in ("ingest", "preprocess", "train@resnet18-42", "evaluate@resnet18-42", "compare"):  # bakeoff.archs x bakeoff.seeds
        assert f"Running stage '{stage}'" in out
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "first run"], repo, env)

    t0 = time.perf_counter()
    out = _run(dvc + ["repro"], repo, env)
    assert time.perf_counter() - t0 < 15
    assert "Running stage" not in out and "up to date" in out

    metrics = json.loads(_run(dvc + ["metrics", "show", "--json"], repo, env))
    flat = json.dumps(metrics)
    assert "accuracy" in flat and "val_acc" in flat
    # issue #16: headline figures only, `dvc metrics show` at most 25 columns (the detail is in reports/, in git)
    columns = assert_readable_metrics(repo)
    assert {"images", "seconds", "val_acc"} <= columns
    for name in ("ingest.json", "dataset.json", "audit.json"):
        assert (repo / "reports" / name).exists(), name
    assert (repo / "reports/resnet18/seed42/train.json").is_file()  # reports/<run_name>/train.json
    _run(dvc + ["plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").exists()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = json.loads(_run(dvc + ["params", "diff", "--json"], repo, env))
    assert diff["params.yaml"]["train.epochs"]["old"] == 2 and diff["params.yaml"]["train.epochs"]["new"] == 3
    out = _run(dvc + ["repro"], repo, env)
    assert "Running stage 'train@resnet18-42'" in out and "Running stage 'evaluate@resnet18-42'" in out
    assert "Running stage 'ingest'" not in out and "Running stage 'preprocess'" not in out
