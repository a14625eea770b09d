"""Time budget of a train run (``train.time_budget_minutes``).

The budget is wall-clock time from the train process's start (imports, data loading
and model building count) to its last checkpoint. Before the first epoch the train
stage times a few real steps on a throw-away copy of the model (:mod:`cvpipe.train.budget_run`
does the measuring and applies the plans), and :class:`TimeBudget` turns the seconds per epoch
into an epoch count and a warmup length, so timm's cosine schedule is built for the run that
fits and completes instead of being cut off. After every epoch the plan is checked against the
measured epoch time (the median of the epochs after the first, which carries one-time
costs). While the LR is still warming up or on the flat top of the cosine (the first 10 %
of its decay, LR >= 97.5 % of the peak) the plan may grow or shrink; after that it only
shrinks, because stretching a cosine that is visibly decaying would raise the LR again.

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
# the plan may still grow until this share of the cosine decay has run (LR >= 97.5 % of the peak)
GROW_WHILE_DECAY_BELOW = 0.1

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

    def fit(self, epochs_done: int, epoch_seconds: float) -> int:
        """Total epochs that end before the deadline when each takes ``epoch_seconds``; at least one more
        than ``epochs_done`` is never promised: the result can equal ``epochs_done`` (stop now)."""
        extra = math.floor(max(self.remaining_s(), 0.0) / max(epoch_seconds, 1e-6))
        return max(1, min(self.max_epochs, epochs_done + extra))

    def replan(self, current: int, epochs_done: int, epoch_seconds: float, may_grow: bool = False) -> int:
        """The epoch plan after ``epochs_done`` epochs of ``epoch_seconds`` each.

        The first call, and any call with ``may_grow`` (see :func:`may_grow`), may grow the plan;
        the others only shrink it.
        """
        fitted = self.fit(epochs_done, epoch_seconds)
        self.replans += 1
        if self.replans == 1 or may_grow:
            return max(fitted, epochs_done)
        return max(min(current, fitted), epochs_done)


def may_grow(done_in_phase: int, phase_epochs: int, warmup: int) -> bool:
    """True while the LR warms up or sits on the cosine's flat top (the first 10 % of its decay)."""
    decay_epochs = max(phase_epochs - warmup, 1)
    return (done_in_phase - warmup) / decay_epochs <= GROW_WHILE_DECAY_BELOW


def epoch_estimate(walls: list[float]) -> float:
    """Seconds per epoch from the measured epoch walls: the median of the last five after the first
    (the first carries one-time costs: kernel selection, first checkpoint, loader start), else the first."""
    import statistics

    later = walls[1:] or walls
    return float(statistics.median(later[-5:]))
