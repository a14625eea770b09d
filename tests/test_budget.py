"""train.time_budget_minutes: epochs and warmup planned from measured throughput, honoured on time."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
from conftest import cvpipe, make_digits_slice, write_params

from cvpipe.train import budget as budget_mod
from cvpipe.train.budget import TimeBudget, epoch_estimate, planned_warmup


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


def test_replans_grow_and_shrink_at_any_point(clock):
    b = TimeBudget(minutes=10, max_epochs=1000)
    planned = b.fit(0, 20.0)  # a pessimistic estimate: the first seconds were slow (a busy machine)
    clock.now += 10
    grown = b.replan(1, 8.0)
    assert grown == 1 + int((600 - 10 - 12) // 8) > planned
    clock.now += 300
    assert b.replan(30, 4.0) == 30 + int((600 - 310 - 12) // 4) > grown  # faster later: grows again mid-decay
    clock.now += 100  # the machine got busy
    shrunk = b.replan(35, 30.0)
    assert shrunk == 35 + int((600 - 410 - 12) // 30)
    clock.now = 1000 + 600
    assert b.replan(40, 8.0) == 40  # out of time: stop after this epoch


def test_a_one_epoch_plan_grows_inside_that_epoch(clock):
    """A slow probe (a CPU hog in the first seconds) plans 1 epoch; a quarter into it the pace is 4x
    faster: the re-plan counts the 3/4 still pending and grows the plan before the epoch ends."""
    b = TimeBudget(minutes=1, max_epochs=1000)  # 60 s, 2 s reserved
    clock.now += 20
    assert b.fit(0, 30.0) == 1
    clock.now += 2  # a quarter of epoch 1 took 2 s: 8 s per epoch, 6 s still pending
    assert b.replan(1, 8.0, pending_s=6.0) == 1 + int((60 - 22 - 2 - 6) // 8) == 4
    clock.now = 1000 + 57
    assert b.replan(5, 8.0, pending_s=6.0) == 5  # never below the epoch in progress


def test_a_plan_grows_only_when_slower_epochs_still_fit(clock):
    """Hysteresis: growing needs the longer plan to fit with every remaining second GROW_MARGIN slower, so a
    plan grown on one optimistic measure is not shrunk at the next (which would cut the cosine off);
    shrinking needs no margin."""
    from cvpipe.train.budget import GROW_MARGIN

    b = TimeBudget(minutes=1, max_epochs=1000)  # 60 s, 2 s reserved
    clock.now += 20  # 38 s left
    assert b.replan(1, 9.0) == 1 + int(38 // 9) == 5  # no current plan: whatever fits
    assert b.replan(1, 9.0, current=3) == 1 + int(38 // (9.0 * GROW_MARGIN)) == 4  # grows, by what fits slower
    assert b.replan(1, 9.0, current=5) == 5
    assert b.replan(1, 9.0, current=7) == 5  # shrinks to what fits, no margin
    assert b.replan(1, 12.0, pending_s=5.0, current=2) == max(2, 1 + int((38 - 5 * GROW_MARGIN) // (12 * GROW_MARGIN)))


def _lrs(sched, opt, updates):
    out = []
    for u in updates:
        sched.step_update(num_updates=u)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("new_epochs", [40, 12])
def test_retimed_schedule_continues_the_lr_smoothly_and_ends_at_the_floor(new_epochs):
    """Stretching (20 -> 40 epochs) or shrinking (20 -> 12) the cosine mid-decay: the LR at the re-plan is
    the same, it never jumps by more than a normal step of the steeper schedule, never rises, and ends at min_lr."""
    import torch

    from cvpipe.core.config import TrainParams
    from cvpipe.train import finetune
    from cvpipe.train.budget import RetimedScheduler

    upe, at = 10, 80  # updates per epoch; re-plan after 8 epochs (warmup 2)
    tp = TrainParams(epochs=20, warmup_epochs=2, lr=0.1, min_lr=1e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tp.lr)
    sched = RetimedScheduler(finetune.build_scheduler(opt, tp, 20, upe), 20 * upe, 2 * upe)
    before = _lrs(sched, opt, range(at + 1))
    tp2 = tp.model_copy(update={"epochs": new_epochs})
    sched = sched.retimed(finetune.build_scheduler(opt, tp2, new_epochs, upe), new_epochs * upe, at)
    after = _lrs(sched, opt, range(at, new_epochs * upe + 1))
    assert after[0] == pytest.approx(before[-1], rel=1e-9)  # continuous at the re-plan
    steepest = 0.1 * math.pi / 2 / (min(new_epochs, 20) * upe - at)  # max |dLR/du| of the steeper remainder, roughly
    assert max(abs(a - b) for a, b in zip(after, after[1:])) <= 2 * steepest
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # past warmup: the LR only falls
    assert after[-1] == pytest.approx(1e-4, rel=1e-6)
    # the clock is checkpointed: a rebuilt scheduler with the saved state gives the same LR
    fresh = RetimedScheduler(finetune.build_scheduler(opt, tp2, new_epochs, upe), new_epochs * upe, 2 * upe)
    fresh.load_state_dict(sched.state_dict())
    assert _lrs(fresh, opt, [at + 5]) == pytest.approx(after[5:6])


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
    summary = json.loads((tmp_path / "reports/resnet18/seed42/train.json").read_text())
    tb = summary["time_budget"]
    print(f"budget test: process wall {wall:.1f} s of {budget_s:.0f}, spent {tb['spent_s']} s, {summary['epochs_run']} epochs")
    assert abs(wall - budget_s) <= 0.15 * budget_s, (wall, tb, proc.stderr[-2000:])
    assert summary["epochs_run"] == summary["epochs"] == tb["planned_epochs"] >= 5, tb
    assert not summary["stopped_early"]
    with open(tmp_path / "plots/resnet18/seed42/history.csv", newline="") as fh:
        lrs = [float(r["lr"]) for r in csv.DictReader(fh)]
    assert max(lrs) == pytest.approx(0.002, rel=0.2)
    assert lrs[-1] < 0.02 * max(lrs), lrs  # the cosine ran to its end, not cut off
    assert "time budget 1 min" in proc.stdout + proc.stderr


def test_time_budget_is_validated(tmp_path):
    write_params(tmp_path, {"train.time_budget_minutes": -1})
    proc = cvpipe("train", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.time_budget_minutes" in proc.stdout + proc.stderr
