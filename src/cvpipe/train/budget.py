"""Time budget of a train run (``train.time_budget_minutes``).

The budget is wall-clock time from the train process's start (imports, data loading
and model building count) to its last checkpoint. Before the first epoch the train
stage times a few real steps on a throw-away copy of the model (:mod:`cvpipe.train.budget_run`
does the measuring and applies the plans), and :class:`TimeBudget` turns the seconds per epoch
into an epoch count and a warmup length, so timm's cosine schedule is built for the run that
fits and completes instead of being cut off. After every epoch the plan is re-fitted to the
measured epoch time (the median of the epochs after the first, which carries one-time costs),
and within each epoch at its quarter marks to the epoch's own pace so far plus the last epoch's
validation and checkpoint time (a plan of one epoch, after a slow probe, can still grow before that
epoch ends). It may grow or shrink at any point (growing with a margin, :data:`GROW_MARGIN`):
:class:`RetimedScheduler` stretches or shrinks the rest of the schedule from where it stands, so
the LR never jumps and a slow start (a busy machine in the first seconds, a pessimistic probe)
no longer leaves the budget under-used. The probe stops timing after 5 % of the budget.

No library does this: timm, Lightning (``max_time``) and HF Trainer stop a run when time is
up, which leaves the schedule unfinished; here the schedule is sized to the time instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cvpipe.core.config import WARMUP_FRACTION  # the recipe's warmup share, applied to the planned epochs

# seconds kept free after the last epoch: final metrics, W&B finish and artifact, exit
_RESERVE_MIN_S = 2.0
_RESERVE_FRACTION = 0.02
# a plan grows only when the longer plan also fits with every remaining second 10 % slower: growing on an
# optimistic measure and shrinking at the next one would end the run with its cosine cut off (the LR at
# 7 % of its peak instead of the floor, seen once in CI when the step time varied near the end)
GROW_MARGIN = 1.1

_IMPORTED_AT = time.time()


def process_started() -> float:
    """When this process started (epoch seconds): the budget's zero."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable
        return _IMPORTED_AT


def planned_warmup(epochs: int, min_warmup: int) -> int:
    """``train.warmup_epochs`` or 5 % of the planned epochs, whichever is larger; always < epochs."""
    if epochs <= 1:
        return 0
    return min(epochs - 1, max(min_warmup, int(WARMUP_FRACTION * epochs + 0.5)))


@dataclass
class TimeBudget:
    minutes: float
    max_epochs: int
    spent_before_s: float = 0.0  # budget already used by the runs this one resumes

    def __post_init__(self) -> None:
        self.start = process_started()
        self.deadline = self.start + self.minutes * 60.0 - self.spent_before_s
        self.reserve_s = max(_RESERVE_MIN_S, _RESERVE_FRACTION * self.minutes * 60.0)
        self.replans = 0

    def spent_s(self) -> float:
        """Budget used so far, including earlier (resumed) runs."""
        return self.spent_before_s + (time.time() - self.start)

    def remaining_s(self) -> float:
        return self.deadline - self.reserve_s - time.time()

    def fit(self, epochs_done: int, epoch_seconds: float, pending_s: float = 0.0) -> int:
        """Total epochs that end before the deadline when each takes ``epoch_seconds`` and ``pending_s`` are
        still needed to finish epoch ``epochs_done`` (mid-epoch); at least one more than ``epochs_done`` is
        never promised: the result can equal ``epochs_done`` (stop there)."""
        extra = math.floor(max(self.remaining_s() - pending_s, 0.0) / max(epoch_seconds, 1e-6))
        return max(1, min(self.max_epochs, epochs_done + extra))

    def replan(self, epochs_done: int, epoch_seconds: float, pending_s: float = 0.0, current: int | None = None) -> int:
        """The epoch plan once ``epochs_done`` epochs end (``pending_s`` from now), each taking ``epoch_seconds``:
        whatever fits, grown or shrunk (:class:`RetimedScheduler` keeps the schedule smooth either way),
        never below ``epochs_done``. Given the ``current`` plan, it grows past it only as far as
        :data:`GROW_MARGIN` slower epochs still fit (hysteresis: shrinking needs no margin)."""
        self.replans += 1
        plan = self.fit(epochs_done, epoch_seconds, pending_s)
        if current is not None and plan > current:
            plan = max(current, self.fit(epochs_done, epoch_seconds * GROW_MARGIN, pending_s * GROW_MARGIN))
        return max(plan, epochs_done)


def epoch_estimate(walls: list[float]) -> float:
    """Seconds per epoch from the measured epoch walls: the median of the last five after the first
    (the first carries one-time costs: kernel selection, first checkpoint, loader start), else the first."""
    import statistics

    later = walls[1:] or walls
    return float(statistics.median(later[-5:]))


class RetimedScheduler:
    """A timm scheduler (per-update) whose remaining updates can be stretched or shrunk mid-run.

    Hand-written because timm's schedulers are fixed at construction (``t_initial``) and rebuilding
    one for a new length restarts or jumps its LR. Here the wrapped schedule runs on a virtual
    clock: ``v = u`` until the last re-time at update ``u0``, then ``v = v0 + (u - u0) * rate``.
    :meth:`retimed` moves to a schedule built for the new length at the same *relative* position
    (``v0 = v * T'/T``: timm's cosine, step and poly LR depend on ``t/T`` only, so the LR is the
    same there) and picks ``rate`` so the virtual clock reaches ``T'`` exactly when the run ends;
    during warmup the position is kept as is (the warmup length does not change). The clock is in
    the checkpoint (:meth:`state_dict`), so a resumed run continues the same curve.
    """

    def __init__(self, base, total_updates: int, warmup_updates: int):
        self.base = base
        self.total = int(total_updates)
        self.warmup = int(warmup_updates)
        self.u0, self.v0, self.rate = 0, 0.0, 1.0

    def virtual(self, updates: int) -> float:
        return self.v0 + (updates - self.u0) * self.rate

    def step_update(self, num_updates: int, metric=None) -> None:
        self.base.step_update(num_updates=self.virtual(num_updates), metric=metric)

    def step(self, epoch: int, metric=None) -> None:
        self.base.step(epoch, metric)  # per-epoch hook: a no-op for the per-update schedules built here

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "retime": {"u0": self.u0, "v0": self.v0, "rate": self.rate}}

    def load_state_dict(self, state: dict) -> None:
        if "retime" not in state:  # a checkpoint written before re-timing existed: the plain timm state
            self.base.load_state_dict(state)
            return
        self.base.load_state_dict(state["base"])
        r = state["retime"]
        self.u0, self.v0, self.rate = int(r["u0"]), float(r["v0"]), float(r["rate"])

    def retimed(self, base, total_updates: int, updates: int) -> "RetimedScheduler":
        """The schedule *base* (built for ``total_updates``) entered after ``updates`` of this one, where its LR is
        this one's; the rest of it spread over the ``total_updates - updates`` that remain."""
        out = RetimedScheduler(base, total_updates, self.warmup)
        v = self.virtual(updates)
        v_new = v if v <= self.warmup else max(v * total_updates / max(self.total, 1), float(self.warmup))
        out.u0, out.v0 = updates, min(v_new, float(total_updates))
        left = total_updates - updates
        out.rate = (total_updates - out.v0) / left if left > 0 else 1.0
        return out
