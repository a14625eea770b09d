"""Time budget of a train run (``train.time_budget_minutes``).

The budget is wall-clock time from the train process's start (imports, data loading
and model building count) to its last checkpoint. Before the first epoch the train
stage times a few real steps on a throw-away copy of the model (:func:`cvpipe.train`
does the measuring), and :class:`TimeBudget` turns the seconds per epoch into an epoch
count and a warmup length, so timm's cosine schedule is built for the run that fits and
completes instead of being cut off. After every epoch the plan is checked against the
measured epoch time: the first check may grow or shrink it (the estimate from a handful
of steps is rough), later checks only shrink it, since growing a cosine that is already
decaying would raise the LR again.

No library does this: timm, Lightning (``max_time``) and HF Trainer stop a run when time is
up, which leaves the schedule unfinished; here the schedule is sized to the time instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cvpipe.recipe import WARMUP_FRACTION  # the recipe's warmup share, applied to the planned epochs

# seconds kept free after the last epoch: final metrics, W&B finish and artifact, exit
_RESERVE_MIN_S = 2.0
_RESERVE_FRACTION = 0.02

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

    def replan(self, current: int, epochs_done: int, epoch_seconds: float) -> int:
        """The epoch plan after ``epochs_done`` epochs of ``epoch_seconds`` each (the first call may grow it)."""
        fitted = self.fit(epochs_done, epoch_seconds)
        self.replans += 1
        if self.replans == 1:
            return max(fitted, epochs_done)
        return max(min(current, fitted), epochs_done)
