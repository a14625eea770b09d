"""`cvpipe train --find-lr`: the LR range test, its suggestion against a real LR grid, --write-lr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cvpipe, write_params

from cvpipe.core.config import load_params
from cvpipe.train import lr_finder

# The grid the suggestion is checked against: half-decade steps around SGD's usual range (the digits
# recipe trains resnet18 from scratch with Nesterov SGD).
GRID = [1e-2, 3e-2, 1e-1, 3e-1]
GRID_EPOCHS = 3


def test_smoothing_is_bias_corrected():
    assert lr_finder.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = lr_finder.smooth([1.0] * 10 + [0.0] * 10, beta=0.5)
    assert s[9] == pytest.approx(1.0) and s[-1] < 1e-3


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.geomspace(1e-5, 1, 60))
    # a clean valley: flat, falling from 1e-3, minimum at 1e-1, divergence after
    loss = [2.0 if lr < 1e-3 else 2.0 - 0.5 * (math.log10(lr) + 3) if lr <= 0.1 else 1.0 + 20 * (lr - 0.1) for lr in lrs]
    picks = lr_finder.suggest(lrs, loss)
    assert picks["min_loss_lr"] == pytest.approx(0.1, rel=0.25)
    assert picks["suggested"] == picks["steepest_lr"]
    assert 1e-3 <= picks["suggested"] < picks["min_loss_lr"]
    with pytest.raises(Exception, match="too few"):
        lr_finder.suggest(lrs[:12], loss[:12])


def test_write_lr_keeps_comments_and_targets_the_bakeoff_override(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 0.002   # peak LR\n  epochs: 3\nbakeoff:\n  archs:\n    resnet18: {lr: 0.002}\n    convnext_atto:\n")
    assert lr_finder.write_lr(p, "resnet18", 0.01234) == "bakeoff.archs.resnet18.lr"
    assert lr_finder.write_lr(p, "convnext_atto", 0.0005) == "bakeoff.archs.convnext_atto.lr"
    assert lr_finder.write_lr(p, "mobilenetv3_small_100", 0.003) == "train.lr"
    text = p.read_text()
    assert "# peak LR" in text
    data = yaml.safe_load(text)
    assert data["bakeoff"]["archs"] == {"resnet18": {"lr": 0.012}, "convnext_atto": {"lr": 0.0005}}
    assert data["train"] == {"lr": 0.003, "epochs": 3}


def _digits_project(tmp_path: Path, prepared: Path, **train) -> Path:
    # the grid is scored on the model's own val accuracy: an EMA lags too far behind in 3 epochs to rank LRs
    overrides = {"paths.prepared": str(prepared), "train.arch": "resnet18", "train.batch_size": 64, "train.workers": 0,
                 "train.warmup_epochs": 1, "train.epochs": GRID_EPOCHS, "train.ema": False, "train.monitor": "val_acc",
                 "wandb.mode": "disabled", "bakeoff.archs": {"resnet18": {}}}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return write_params(tmp_path, overrides)


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory) -> Path:
    """The whole built-in digits sample (1,797 scans), ingested and preprocessed at 32 px."""
    root = tmp_path_factory.mktemp("lr-digits")
    write_params(root, {"ingest.source": "sample://digits", "ingest.workers": 1, "preprocess.workers": 1})
    cvpipe("ingest", "-q", cwd=root)
    cvpipe("preprocess", "-q", cwd=root)
    return root / "data" / "prepared"


@pytest.mark.slow
def test_find_lr_cli_writes_plot_metrics_and_params(tmp_path, digits_prepared):
    _digits_project(tmp_path, digits_prepared)
    proc = cvpipe("train", "--find-lr", "--write-lr", cwd=tmp_path)
    result = json.loads((tmp_path / "metrics/resnet18/lr_finder.json").read_text())
    assert (tmp_path / "plots/resnet18/lr_finder.png").stat().st_size > 10_000
    assert result["steps_run"] >= 30 and result["suggested"] > 0
    assert "suggested lr" in proc.stdout + proc.stderr
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())["bakeoff"]["archs"]["resnet18"]["lr"]
    assert written == pytest.approx(result["suggested"], rel=0.05)
    assert not (tmp_path / "models").exists()  # a range test trains nothing that is kept
    bad = cvpipe("train", "--write-lr", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--find-lr" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_suggestion_within_3x_of_the_best_lr_of_a_grid(tmp_path, digits_prepared, monkeypatch):
    """Digits, resnet18 from scratch, the recipe's Nesterov SGD, batch 64, 32 px: the range test's suggestion lands
    within a factor of 3 of the grid LR (GRID, each trained GRID_EPOCHS epochs with the
    default cosine schedule) with the best validation accuracy (ties: lower val loss)."""
    from cvpipe.train import stage as train

    monkeypatch.chdir(tmp_path)
    _digits_project(tmp_path, digits_prepared)
    suggested = lr_finder.run(load_params(tmp_path / "params.yaml"))["suggested"]
    scores = {}
    for lr in GRID:
        out = tmp_path / f"lr-{lr:g}"
        p = load_params(tmp_path / "params.yaml", {"train.lr": lr, "paths.models": str(out / "models"),
                                                    "paths.metrics": str(out / "metrics"), "paths.plots": str(out / "plots")})
        s = train.run(p)
        scores[lr] = (s["best_val_acc"], -s["best_val_loss"])
    best = max(GRID, key=lambda lr: scores[lr])
    print(f"suggested {suggested:.4g}; grid (val acc, -val loss): {scores}")
    assert best / 3 <= suggested <= best * 3, (suggested, best, scores)
