"""Streaming a sharded split into training (:class:`ShardStream`), for train, the LR finder and the
time budget's probe through :func:`cvpipe.torchkit.loaders.train_dataset`.

Imports torch at module level (a torch ``IterableDataset``); :mod:`cvpipe.torchkit.loaders` imports it
only when a split is sharded.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cvpipe.core.errors import StageError
from cvpipe.data import shards
from cvpipe.data.prepared import Split
from cvpipe.torchkit.loaders import SampleAugment


class ShardStream(IterableDataset):
    """A sharded split streamed for training: this rank's share of an epoch, augmented per sample.

    Every rank and every DataLoader worker is one *slot* (``rank x workers + worker``); which samples a
    slot reads, in which order, is :func:`cvpipe.data.shards.slot_plan` plus WebDataset's buffer shuffle
    seeded by (seed, epoch, slot), so the order is a pure function of the params and the epoch: the same
    after a restart. Each slot yields :func:`~cvpipe.data.shards.slot_length` samples, a whole number of
    batches and the same on every rank, so DDP ranks always take the same number of steps. Each image's
    augmentation is seeded by (seed, epoch, row) (:class:`~cvpipe.torchkit.loaders.SampleAugment`), so it
    does not depend on the slot that reads it. ``resume(step)``
    skips the batches this rank already took in the epoch (mid-epoch resume), without decoding them.
    """

    def __init__(self, split: Split, pipeline, seed: int, batch: int, drop_last: bool, buffer: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0):
        super().__init__()
        if split.shards is None:
            raise ValueError(f"split {split.name} is not sharded")
        self.images, self.labels = split.shards, split.labels
        self.augment = SampleAugment(pipeline, seed) if pipeline is not None else None
        self.seed, self.batch, self.buffer = seed, batch, buffer
        self.rank, self.per_rank = rank, max(1, workers)
        self.slots = world_size * self.per_rank
        self.counts = [s["count"] for s in self.images.manifest["shards"]]
        if len(self.labels) < self.slots:  # a slot without a single image would leave its rank steps short
            raise StageError(f"the {split.name} split has {len(self.labels)} images, fewer than the {self.slots} "
                             f"readers ({world_size} processes x {self.per_rank} loader workers): lower train.workers")
        self.per_slot = shards.slot_length(len(self.labels), self.slots, batch, drop_last)
        # (epoch, resume step) in shared memory: persistent DataLoader workers hold a copy of this object made
        # at their start, and read the epoch from here each time the loader starts a pass
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def start_step(self) -> int:
        return int(self._state[1])

    def set_epoch(self, epoch: int) -> None:
        self._state[0], self._state[1] = epoch, 0

    def resume(self, step: int) -> None:
        """Start the current epoch after this rank's first *step* batches."""
        self._state[1] = step

    def __len__(self) -> int:  # this rank's samples per epoch
        return self.per_slot * self.per_rank

    def slot_stream(self, worker: int, epoch: int):
        """(row, encoded image, label) of one worker's slot in *epoch*, before the resume skip."""
        slot = self.rank * self.per_rank + worker
        plan = shards.slot_plan(self.counts, self.seed, epoch, self.slots)[slot]
        while True:  # a slot short of per_slot starts its (same) stream again
            n = 0
            for item in shards.shuffled(shards.iter_samples(self.images, self.labels, plan), self.buffer,
                                        self.seed, epoch, slot):
                n += 1
                yield item
            if n == 0:
                return

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.per_rank:
            raise RuntimeError(f"ShardStream was built for {self.per_rank} workers per rank")
        # the loader takes batch i from worker i % workers; resumed after k batches, its worker w plays the
        # slot of worker (w + k) % workers, which has already given the batches j < k with j % workers == role
        epoch, start = self.epoch, self.start_step
        role = (worker + start) % self.per_rank
        taken = (start - role + self.per_rank - 1) // self.per_rank if start > role else 0
        for row, data, label in itertools.islice(self.slot_stream(role, epoch), taken * self.batch, self.per_slot):
            img = shards.decode(data)
            if self.augment is not None:
                img = self.augment(img, epoch, row)
            yield img, label
