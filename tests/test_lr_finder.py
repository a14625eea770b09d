"""`cvpipe train --find-lr`: the mechanics of the LR range test, its suggestion rule, --write-lr.

These tests check behaviour that holds on any machine: the sweep, the recorded and smoothed
losses, the rule that turns the curve into a suggestion (on synthetic curves whose answer is
known), the early stop on divergence, the files written. Whether the suggestion is a *good*
LR (how close it lands to the best LR of a training grid) depends on the CPU's bf16 kernels
and the seed, so it is measured by bench/lr_finder.py (several seeds, the grid, the machine
named), not asserted here.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cvpipe, write_params

from cvpipe.core.config import load_params
from cvpipe.core.errors import ParamsError
from cvpipe.train import lr_finder

# --- the suggestion rule, on synthetic curves -------------------------------------------------------------------

LRS = list(np.geomspace(1e-5, 1, 100))
STEP = 10 ** (5 / 99)  # ratio between neighbouring LRs of LRS


def valley(lrs, steep_at: float = 1e-3, min_at: float = 0.1) -> list[float]:
    """A smooth range-test curve: flat, an S-shaped fall whose steepest point (per decade) is at *steep_at*,
    a minimum just past *min_at*, then a rise."""
    out = []
    for lr in lrs:
        x = math.log10(lr)
        fall = 1.5 / (1 + math.exp(-4 * (x - math.log10(steep_at))))
        rise = 5 * max(0.0, x - math.log10(min_at)) ** 2
        out.append(2.3 - fall + rise)
    return out


def test_smoothing_is_bias_corrected():
    assert lr_finder.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert lr_finder.smooth([5.0, 1.0])[0] == pytest.approx(5.0)  # no pull towards 0 at the start
    s = lr_finder.smooth([1.0] * 10 + [0.0] * 10, beta=0.5)
    assert s[9] == pytest.approx(1.0) and s[-1] < 1e-3
    assert len(lr_finder.smooth(list(range(37)))) == 37


def test_suggestion_is_the_steepest_descent_per_decade():
    picks = lr_finder.suggest(LRS, valley(LRS, steep_at=1e-3))
    assert picks["suggested"] == picks["steepest_lr"]
    assert picks["suggested"] in LRS
    # one grid step of tolerance (the grid does not hold 1e-3 exactly); the steepest point *per unit of LR*
    # (a gradient taken against lr instead of log10(lr)) would sit ~2x lower, at 4.7e-4
    assert picks["suggested"] == pytest.approx(1e-3, rel=STEP - 1)
    assert picks["min_loss_lr"] == pytest.approx(0.1, rel=0.25)
    assert picks["min_loss_lr_div10"] == pytest.approx(picks["min_loss_lr"] / 10)
    # the suggestion follows the curve, not a fixed place in the range
    assert lr_finder.suggest(LRS, valley(LRS, steep_at=1e-2))["suggested"] == pytest.approx(1e-2, rel=STEP - 1)


def test_suggestion_ignores_descents_after_the_minimum_and_in_the_first_steps():
    loss = valley(LRS, steep_at=1e-3, min_at=0.1)
    i_min = int(np.argmin(loss))
    # after the minimum: a spike, then a fall steeper than the valley's (but staying above the minimum)
    n = len(LRS) - i_min - 3
    loss[i_min + 3:] = list(np.linspace(9.0, loss[i_min] + 0.5, n))
    # the first 10 steps: a very steep fall (the loss of an untrained model settling), skipped
    loss[:10] = list(np.linspace(30.0, loss[10], 10, endpoint=False))
    picks = lr_finder.suggest(LRS, loss)
    assert picks["suggested"] == pytest.approx(1e-3, rel=STEP - 1)
    assert picks["min_loss_lr"] == pytest.approx(LRS[i_min])


def test_suggestion_needs_enough_steps():
    loss = valley(LRS)
    with pytest.raises(Exception, match="too few"):
        lr_finder.suggest(LRS[:12], loss[:12])
    lr_finder.suggest(LRS[:15], loss[:15])  # skip_start + 5 is enough


def test_run_rejects_an_empty_range(tmp_path):
    params = load_params(write_params(tmp_path))
    for lo, hi in ((1.0, 0.1), (0.1, 0.1), (0.0, 1.0)):
        with pytest.raises(ParamsError, match="lr_min"):
            lr_finder.run(params, lr_min=lo, lr_max=hi)


def test_plot_is_a_png_of_the_curve():
    from PIL import Image

    losses = valley(LRS)
    smoothed = lr_finder.smooth(losses)
    result = {"arch": "resnet18", "optimizer": "sgd", "batch_size": 64, "lrs": LRS, "losses": losses, "smoothed": smoothed,
              **lr_finder.suggest(LRS, smoothed)}
    png = lr_finder.plot(result)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as im:
        assert im.width > 300 and im.height > 200


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


# --- the range test on the digits ------------------------------------------------------------------------------

def _digits_project(tmp_path: Path, prepared: Path, **train) -> Path:
    overrides = {"paths.prepared": str(prepared), "train.arch": "resnet18", "train.batch_size": 64, "train.workers": 0,
                 "train.ema": False, "train.monitor": "val_acc", "wandb.mode": "disabled", "bakeoff.archs": {"resnet18": {}}}
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


def _check_curve(result: dict, lr_min: float, lr_max: float, steps: int) -> None:
    """What lr_finder.json must hold whatever the machine's numerics: the log-spaced sweep, one loss per step,
    the smoothed curve of those losses, and a suggestion picked from it by the steepest-descent rule."""
    n = result["steps_run"]
    assert (result["lr_min"], result["lr_max"]) == (lr_min, lr_max)
    assert 15 <= n <= steps
    assert result["lrs"] == pytest.approx(list(np.geomspace(lr_min, lr_max, steps)[:n]), rel=1e-9)
    assert len(result["losses"]) == len(result["smoothed"]) == n
    assert all(math.isfinite(v) and v > 0 for v in result["losses"])
    assert result["smoothed"] == pytest.approx(lr_finder.smooth(result["losses"]), abs=1e-5)
    # the suggestion: one of the swept LRs, inside the range, the steepest point of the smoothed curve (per decade)
    # before its minimum, past the first 10 steps (the JSON rounds the curve to 6 decimals: ties within 1e-4)
    assert result["suggested"] == result["steepest_lr"]
    assert lr_min <= result["suggested"] <= lr_max
    lrs, smoothed = np.asarray(result["lrs"][10:]), np.asarray(result["smoothed"][10:])
    i_sug = result["lrs"].index(result["suggested"]) - 10
    i_min = result["lrs"].index(result["min_loss_lr"]) - 10
    assert smoothed[i_min] == pytest.approx(smoothed.min(), abs=1e-5)
    grad = np.gradient(smoothed, np.log10(lrs))
    assert 0 <= i_sug < max(i_min, 1)
    assert grad[i_sug] <= grad[: max(i_min, 1)].min() + 1e-4
    assert grad[i_sug] < 0 or i_min == 0  # a descent, whenever the curve falls at all


@pytest.mark.slow
def test_find_lr_cli_sweeps_writes_plot_metrics_and_params(tmp_path, digits_prepared):
    params = _digits_project(tmp_path, digits_prepared)
    # comments must survive --write-lr (write_params dumps plain YAML: add some)
    text = params.read_text().replace("train:\n", "train:  # the train stage\n", 1)
    params.write_text("# digits, LR range test\n" + text)
    before = yaml.safe_load(params.read_text())
    # LRs up to 0.01 cannot diverge (4x the best smoothed loss) on the digits: the whole sweep runs
    lr_min, lr_max, steps = 1e-5, 1e-2, 30
    proc = cvpipe("train", "--find-lr", "--write-lr", "--lr-min", str(lr_min), "--lr-max", str(lr_max),
                  "--lr-steps", str(steps), cwd=tmp_path)
    result = json.loads((tmp_path / "metrics/resnet18/seed42/lr_finder.json").read_text())
    _check_curve(result, lr_min, lr_max, steps)
    assert result["steps_run"] == steps
    assert result["arch"] == "resnet18" and result["optimizer"] == before["train"]["optimizer"]
    png = (tmp_path / "plots/resnet18/seed42/lr_finder.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "suggested lr" in proc.stdout + proc.stderr
    # --write-lr: the suggestion (2 significant digits) lands in the arch's bake-off override, nothing else changes
    text = params.read_text()
    assert text.startswith("# digits, LR range test\n") and "# the train stage" in text
    after = yaml.safe_load(text)
    assert after["bakeoff"]["archs"]["resnet18"]["lr"] == float(f"{result['suggested']:.2g}")
    after["bakeoff"]["archs"]["resnet18"] = {}
    assert after == before
    load_params(params)  # still valid
    assert not (tmp_path / "models").exists()  # a range test trains nothing that is kept
    assert not (tmp_path / "metrics/resnet18/seed42/train.json").exists()
    bad = cvpipe("train", "--write-lr", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--find-lr" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_range_test_stops_when_the_loss_diverges(tmp_path, digits_prepared, monkeypatch):
    """Up to an LR of 1e4 Nesterov SGD blows the loss up: the sweep stops before its last step, at the first
    step whose smoothed loss exceeds DIVERGE_FACTOR x the best so far (or whose loss is not finite), and the
    run leaves params.yaml and the models alone."""
    monkeypatch.chdir(tmp_path)
    params = _digits_project(tmp_path, digits_prepared)
    before = params.read_bytes()
    lr_min, lr_max, steps = 1e-3, 1e4, 60
    result = lr_finder.run(load_params(params), lr_min=lr_min, lr_max=lr_max, steps=steps)
    _check_curve(result, lr_min, lr_max, steps)
    n = result["steps_run"]
    print(f"stopped after {n} of {steps} steps, at lr {result['lrs'][-1]:.3g}; suggested {result['suggested']:.3g}")
    assert n < steps, "the loss did not diverge up to lr 1e4, or divergence does not stop the sweep"
    s = result["smoothed"]
    # no earlier step met the stop condition (the check starts once more than 10 losses are recorded) ...
    for k in range(11, n):
        assert s[k - 1] <= lr_finder.DIVERGE_FACTOR * min(s[:k]) * (1 + 1e-5), f"should have stopped at step {k}"
    # ... and the sweep got into the LRs where it diverges before stopping (not stopped early by something else)
    assert result["lrs"][-1] > 1.0
    assert json.loads((tmp_path / "metrics/resnet18/seed42/lr_finder.json").read_text()) == result
    assert (tmp_path / "plots/resnet18/seed42/lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert params.read_bytes() == before
    assert not (tmp_path / "models").exists()
