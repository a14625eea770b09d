"""train.time_budget_minutes: epochs and warmup planned from measured throughput, honoured on time."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from conftest import cvpipe, make_digits_slice, write_params

from cvpipe.train import budget as budget_mod
from cvpipe.train.budget import TimeBudget, epoch_estimate, may_grow, planned_warmup


class Clock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock(1000.0)
    monkeypatch.setattr(budget_mod.time, "time", c)
    monkeypatch.setattr(budget_mod, "process_started", lambda: 1000.0)
    return c


def test_plan_fits_the_budget_minus_the_reserve(clock):
    b = TimeBudget(minutes=10, max_epochs=1000)  # 600 s, 12 s reserved (2 %)
    clock.now += 30  # startup: imports, data, model
    assert b.fit(0, 10.0) == 55  # floor((600 - 30 - 12) / 10)
    assert TimeBudget(minutes=10, max_epochs=20).fit(0, 10.0) == 20  # train.epochs caps the plan
    assert b.fit(0, 10_000.0) == 1  # at least one epoch, even when one does not fit


def test_first_replan_may_grow_later_ones_only_shrink(clock):
    b = TimeBudget(minutes=10, max_epochs=1000)
    planned = b.fit(0, 20.0)  # a pessimistic estimate from a few steps
    clock.now += 10
    grown = b.replan(planned, 1, 8.0)
    assert grown > planned
    clock.now += 8
    assert b.replan(grown, 2, 4.0) == grown  # faster now: the decaying cosine is not stretched
    clock.now += 300  # the machine got busy
    shrunk = b.replan(grown, 3, 8.0)
    assert shrunk == 3 + int((600 - 318 - 12) // 8) < grown
    clock.now = 1000 + 600
    assert b.replan(shrunk, 40, 8.0) == 40  # out of time: stop after this epoch


def test_growth_allowed_only_during_warmup_and_the_flat_top_of_the_cosine(clock):
    assert may_grow(done_in_phase=2, phase_epochs=40, warmup=2)  # end of warmup
    assert may_grow(5, 40, 2)  # 3 of 38 decay epochs: LR still >= 97.5 % of the peak
    assert not may_grow(6, 40, 2)
    b = TimeBudget(minutes=10, max_epochs=1000)
    b.replans = 3
    clock.now += 60
    assert b.replan(20, 3, 5.0, may_grow=True) == 3 + int((600 - 60 - 12) // 5)
    assert b.replan(20, 3, 5.0, may_grow=False) == 20


def test_epoch_estimate_skips_the_first_epoch():
    assert epoch_estimate([9.0]) == 9.0
    assert epoch_estimate([9.0, 2.0]) == 2.0
    assert epoch_estimate([9.0, 2.0, 3.0, 2.5, 2.0, 2.0, 2.1, 8.0]) == 2.1  # the last five after the first


def test_resumed_budget_counts_time_already_spent(clock):
    b = TimeBudget(minutes=10, max_epochs=1000, spent_before_s=300)
    assert b.fit(5, 10.0) == 5 + int((600 - 300 - 12) // 10)
    assert b.spent_s() == 300


def test_planned_warmup_is_five_percent_or_the_params_minimum():
    assert planned_warmup(100, 1) == 5
    assert planned_warmup(10, 1) == 1
    assert planned_warmup(10, 3) == 3
    assert planned_warmup(2, 5) == 1
    assert planned_warmup(1, 1) == 0


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory) -> Path:
    """The digits sample, 60 images per class, ingested and preprocessed at 32 px."""
    root = tmp_path_factory.mktemp("budget")
    src = make_digits_slice(tmp_path_factory, 60)
    write_params(root, {"ingest.source": str(src), "ingest.workers": 1, "preprocess.workers": 1})
    cvpipe("ingest", "-q", cwd=root)
    cvpipe("preprocess", "-q", cwd=root)
    return root / "data" / "prepared"


@pytest.mark.slow
def test_time_budget_is_honoured_with_a_completed_schedule(tmp_path, digits_prepared):
    """A 1-minute budget: the whole `cvpipe train` process (startup included) ends within 15 %
    of it, the planned epochs all ran, and the cosine LR reached its floor. (The plan stops
    before the deadline minus a small reserve, so a run ends up to one epoch early: ~1.8 s here.)"""
    budget_s = 60.0
    write_params(tmp_path, {
        "paths.prepared": str(digits_prepared), "train.arch": "resnet18", "train.epochs": 10_000,
        "train.time_budget_minutes": budget_s / 60, "train.batch_size": 64, "train.lr": 0.002,
        "train.min_lr": 1e-6, "train.workers": 0, "wandb.mode": "disabled",
    })
    t0 = time.monotonic()
    proc = cvpipe("train", cwd=tmp_path)
    wall = time.monotonic() - t0
    summary = json.loads((tmp_path / "metrics/resnet18/train.json").read_text())
    tb = summary["time_budget"]
    assert abs(wall - budget_s) <= 0.15 * budget_s, (wall, tb, proc.stderr[-2000:])
    assert summary["epochs_run"] == summary["epochs"] == tb["planned_epochs"] >= 5, tb
    assert not summary["stopped_early"]
    with open(tmp_path / "plots/resnet18/history.csv", newline="") as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    assert max(lrs) == pytest.approx(0.002, rel=0.2)
    assert lrs[-1] < 0.02 * max(lrs), lrs  # the cosine ran to its end, not cut off
    assert "time budget 1 min" in proc.stdout + proc.stderr


def test_time_budget_is_validated(tmp_path):
    write_params(tmp_path, {"train.time_budget_minutes": -1})
    proc = cvpipe("train", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.time_budget_minutes" in proc.stdout + proc.stderr
