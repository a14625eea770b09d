"""Early stopping and the best epoch (``train.monitor``, ``train.early_stop_patience``, ``train.early_stop_min_delta``).

One rule picks ``best.pt`` and stops the run: an epoch improves when its ``monitor`` value beats
the best so far by more than ``min_delta`` (up for ``*_acc``, down for ``*_loss``), or equals it
exactly with a lower ``val_loss`` (the tie-break between epochs of equal accuracy). The first
epoch always improves. After ``patience`` epochs in a row without improvement the run stops;
``patience: 0`` never stops it. The state (best row, epochs without improvement) is checkpointed,
so a resumed run continues the count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class EarlyStopping:
    monitor: str
    patience: int = 0
    min_delta: float = 0.0
    best: Optional[dict[str, Any]] = None  # the history row of the best epoch so far
    bad_epochs: int = 0  # epochs in a row without improvement

    @property
    def maximize(self) -> bool:
        return self.monitor.endswith("acc")

    def improves(self, row: dict[str, Any]) -> bool:
        """Whether *row* (an epoch's metrics: ``monitor`` and ``val_loss``) beats the best epoch so far."""
        if self.best is None:
            return True
        value, best = row[self.monitor], self.best[self.monitor]
        delta = (value - best) if self.maximize else (best - value)
        return delta > self.min_delta or (delta == 0 and row["val_loss"] < self.best["val_loss"])

    def update(self, row: dict[str, Any]) -> bool:
        """Record one epoch; returns whether it improved (and became :attr:`best`)."""
        improved = self.improves(row)
        if improved:
            self.best, self.bad_epochs = dict(row), 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience
