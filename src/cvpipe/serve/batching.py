"""Micro-batching: requests that arrive together run through the model as one batch (``serve.batch_window_ms``).

One worker thread takes the first waiting image, waits up to the window for more (at most
``serve.max_batch_size``), and runs them as one backend call; each request thread blocks in
:meth:`MicroBatcher.submit` for its own row only.

* results are routed by position: item *i* of the batch gets row *i* of the output;
* a failing batch is retried one item at a time, so one bad item fails only its own request;
* the wait is bounded: :meth:`submit` gives up after its timeout (``TimeoutError``), and an item
  whose request gave up before its batch started is dropped, not run.

Hand-written rather than a library: what is needed is ~60 lines over ``queue`` and
``threading``, and the serving libraries that batch (Triton, Ray Serve, BentoML) are servers of
their own, not something to put behind this FastAPI app.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Optional

import numpy as np


class _Item:
    __slots__ = ("array", "done", "result", "error", "abandoned")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.done = threading.Event()
        self.result: Optional[np.ndarray] = None
        self.error: Optional[BaseException] = None
        self.abandoned = False


class MicroBatcher:
    """Run ``run(stacked uint8 NHWC) -> [batch, classes]`` on requests gathered within ``window_ms``."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], window_ms: float, max_batch: int):
        if window_ms <= 0 or max_batch < 1:
            raise ValueError("MicroBatcher needs window_ms > 0 and max_batch >= 1")
        self.run, self.window_s, self.max_batch = run, window_ms / 1e3, max_batch
        self._queue: "queue.Queue[Optional[_Item]]" = queue.Queue()
        self.batches = 0  # batches run (a test and the bench read them)
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name="cvpipe-batcher", daemon=True)
        self._thread.start()

    def submit(self, array: np.ndarray, timeout: float) -> np.ndarray:
        """This array's row of its batch's output; raises what its own run raised, or TimeoutError after *timeout* s."""
        item = _Item(array)
        self._queue.put(item)
        if not item.done.wait(max(0.0, timeout)):
            item.abandoned = True
            raise TimeoutError(f"no result within {timeout:.3g} s")
        if item.error is not None:
            raise item.error
        return item.result

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive (until :meth:`close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the worker once the batches already queued have run (waits up to 5 s); closing twice is harmless."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """*first* and whatever arrives within the window (at most max_batch); True when told to stop."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._gather(first)
            live = [it for it in batch if not it.abandoned]
            for group in _same_shape(live):
                self._run(group)

    def _run(self, group: list[_Item]) -> None:
        rows: Optional[list[np.ndarray]] = None
        try:
            out = self.run(np.stack([it.array for it in group]))
            rows = [out[i] for i in range(len(group))]
        except Exception as exc:  # one bad item must not fail the others: run each alone
            if len(group) == 1:
                group[0].error = exc
        self.batches += 1
        self.items += len(group)
        for i, it in enumerate(group):
            if rows is not None:
                it.result = rows[i]
            elif it.error is None:
                try:
                    it.result = self.run(it.array[None])[0]
                except Exception as exc:
                    it.error = exc
            it.done.set()


def _same_shape(items: list[_Item]) -> list[list[_Item]]:
    """Items grouped by array shape and dtype (np.stack needs one); in arrival order."""
    groups: dict[tuple, list[_Item]] = {}
    for it in items:
        groups.setdefault((it.array.shape, it.array.dtype.str), []).append(it)
    return list(groups.values())
