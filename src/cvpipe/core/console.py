"""Terminal output shared by every stage: one rich console, progress bars, quiet mode.

Messages are plain text (``markup=False``): a value such as ``[train.lr]`` or a path with brackets
prints as written. Library warnings (timm, torch, albumentations) come through :func:`route_warnings`,
so ``--quiet`` silences them too. Training progress (:class:`EpochProgress`) is two rich bars on a
terminal and one plain line per epoch in a log (``dvc repro`` piped to a file, CI).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False)
_quiet = bool(os.environ.get("CVPIPE_QUIET"))


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def info(msg: str) -> None:
    if not _quiet:
        console.print(msg, markup=False)


def warn(msg: str) -> None:
    console.print(Text.assemble(("warning:", "yellow"), " ", msg))


def print_table(table, log_width: int = 160) -> None:
    """A rich table on the terminal as wide as the terminal; in a log (no terminal, where rich assumes 80
    columns and would squeeze every cell to an ellipsis) at up to *log_width* columns. Nothing when quiet."""
    if _quiet:
        return
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=log_width, highlight=False).print(table)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` through the console: one line, nothing in quiet mode."""
    if _quiet:
        return
    where = str(filename).replace(os.sep, "/")
    where = where.split("site-packages/", 1)[-1] if "site-packages/" in where else os.path.basename(where)
    warn(f"{category.__name__}: {message} ({where}:{lineno})")


class _ConsoleLogHandler(logging.Handler):
    """Library log records (timm logs through ``logging``) of WARNING and up: one console line, none when quiet.
    Without a handler Python prints them to stderr itself (``logging.lastResort``), past ``--quiet``."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _quiet:
            warn(f"{record.name}: {record.getMessage()}")


def route_warnings() -> None:
    """Send Python warnings (:func:`_show_warning`) and library log warnings through the console.

    The root logger gets the console handler only when nothing configured logging already."""
    warnings.showwarning = _show_warning
    root = logging.getLogger()
    if not root.handlers:
        handler = _ConsoleLogHandler(logging.WARNING)
        root.addHandler(handler)


class RateColumn(ProgressColumn):
    """Items per second, with a unit (files/s, img/s)."""

    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", self.unit)
        if not speed:
            return Text(f"- {unit}/s", style="cyan")
        return Text(f"{speed:,.0f} {unit}/s" if speed >= 10 else f"{speed:.2g} {unit}/s", style="cyan")


def progress(unit: str = "it", *extra: ProgressColumn, out: Optional[Console] = None) -> Progress:
    """A progress bar with count, rate, elapsed and ETA; invisible in quiet mode or without a TTY."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *extra,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out or console,
        disable=_quiet,
        transient=False,
    )


class EpochProgress:
    """Training progress: one epoch bar and one batch bar (reset each epoch) on a terminal, whatever the
    epoch count; a plain line per epoch (:meth:`end_epoch`) in both cases; nothing in quiet mode.

    A rich Progress with a task per epoch grows one row per epoch, and a 100-epoch run overflows the
    terminal; here the two tasks are reused. Without a terminal rich would print the bars only at the
    end, so none are made and the per-epoch line is the progress.
    """

    def __init__(self, epochs: int, unit: str = "img", out: Optional[Console] = None):
        self.console = out or console
        self.quiet = _quiet
        self.live = None
        if not self.quiet and self.console.is_terminal:
            self.live = progress(unit, out=self.console)
            self.epoch_task = self.live.add_task("epochs", total=epochs, unit="epoch")
            self.batch_task = self.live.add_task("epoch", total=1)

    def __enter__(self) -> "EpochProgress":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def start_epoch(self, epoch: int, epochs: int, items: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` (the plan can change) begins: the batch bar restarts."""
        if self.live is not None:
            self.live.update(self.epoch_task, total=epochs, completed=epoch - 1, description=f"epoch {epoch}/{epochs}")
            self.live.reset(self.batch_task, total=items, description=f"epoch {epoch}")

    def advance(self, items: int) -> None:
        if self.live is not None:
            self.live.advance(self.batch_task, items)

    def end_epoch(self, epoch: int, line: str) -> None:
        """The epoch's one line (above the bars on a terminal, the only output in a log)."""
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(self.epoch_task, completed=epoch)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line, however long


class PhaseProgress:
    """A stage's named phases (evaluate: predict, calibrate, bootstrap, cost, export, parity, plots, W&B): on a
    terminal one rich bar, reused by each phase (with a count where the phase has items, e.g. test images);
    one plain line per finished phase in both cases (``<title>: <phase> ... <seconds> s``, with the phase's
    result when it reports one); nothing in quiet mode. Like :class:`EpochProgress`, no bar is made without
    a terminal (rich would draw it only at the end), so in a log the lines are the progress.

    Usage::

        with PhaseProgress("evaluate resnet18/seed42") as phases:
            with phases.phase("predicting 267 test images", total=267, unit="img") as ph:
                for batch in batches:
                    ...
                    ph.advance(len(batch))
                ph.result = "accuracy 0.99"
    """

    def __init__(self, title: str, out: Optional[Console] = None):
        self.title = title
        self.console = out or console
        self.quiet = _quiet
        self.live = None
        self.task = None
        if not self.quiet and self.console.is_terminal:
            self.live = progress("it", out=self.console)

    def __enter__(self) -> "PhaseProgress":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self._drop_task()  # the lines stay, the last bar goes
            self.live.stop()

    def _drop_task(self) -> None:
        if self.task is not None:
            self.live.remove_task(self.task)
            self.task = None

    def phase(self, name: str, total: Optional[int] = None, unit: str = "it") -> "_Phase":
        """A context manager for one phase; its ``advance(n)`` moves the bar, its ``result`` ends the line."""
        return _Phase(self, name, total, unit)


class _Phase:
    def __init__(self, owner: PhaseProgress, name: str, total: Optional[int], unit: str):
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.result: Optional[str] = None

    def __enter__(self) -> "_Phase":
        import time

        self.t0 = time.perf_counter()
        owner = self.owner
        if owner.live is not None:  # one row: a fresh task per phase (rich cannot reset a total to "unknown")
            owner._drop_task()
            owner.task = owner.live.add_task(f"{owner.title}: {self.name}", total=self.total, unit=self.unit)
        return self

    def advance(self, n: int = 1) -> None:
        if self.owner.live is not None:
            self.owner.live.advance(self.owner.task, n)

    def __exit__(self, exc_type, *exc) -> None:
        import time

        if self.owner.quiet or exc_type is not None:
            return
        secs = time.perf_counter() - self.t0
        line = f"{self.owner.title}: {self.name}" + (f": {self.result}" if self.result else "") + f" ({secs:.1f} s)"
        self.owner.console.print(line, markup=False, highlight=False, soft_wrap=True)
