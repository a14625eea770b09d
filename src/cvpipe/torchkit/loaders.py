"""Datasets and loaders over the prepared format, and the on-device normalization, shared by
train, the LR finder and evaluate.

Images travel as uint8 HWC arrays (a quarter of float32's bytes) and become normalized float
tensors on the device (:class:`BatchNormalizer`), in one definition every model-using stage shares.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from cvpipe.data.prepared import Split
from cvpipe.torchkit.runtime import Runtime


def seed_worker_augmentation(pipeline, seed: int, epoch: int, slot: int) -> None:
    """Give a DataLoader worker's copy of the augmentation pipeline a stream of its own for *epoch*.

    Albumentations 2 draws from generators that each transform holds, and a worker process holds the copy
    made when it started: without this every worker draws the same sequence as every other, and a
    persistent worker never sees the main process's per-epoch reseed. Seeded by (seed, epoch, slot), a
    worker's stream does not depend on the epochs before it, so a run resumed at an epoch end augments
    as the uninterrupted run did with workers too. (The main process, ``train.workers: 0``, is reseeded
    by the train loop, whose checkpoints also carry the pipeline's state mid-epoch.)
    """
    pipeline.set_random_seed(int(np.random.SeedSequence([seed, epoch, slot]).generate_state(1)[0]))


class ArrayDataset:
    """Samples of a memory-mapped split, augmented per sample with albumentations (uint8 HWC).

    ``set_epoch`` reaches persistent loader workers through shared memory; each worker reseeds its
    pipeline for the epoch (:func:`seed_worker_augmentation`, slot = ``rank`` x workers + worker id)."""

    def __init__(self, split: Split, pipeline=None, seed: int = 0, rank: int = 0):
        import torch

        self.images = split.images
        self.labels = split.labels
        self.pipeline = pipeline
        self.seed, self.rank = seed, rank
        # shared before any worker starts, so workers started earlier still see every set_epoch
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._seeded_epoch = None  # in a worker: the epoch its pipeline copy was seeded for

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[i])
        if self.pipeline is not None:
            self._seed_in_worker()
            img = self.pipeline(image=img)["image"]
        return img, int(self.labels[i])

    def _seed_in_worker(self) -> None:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return
        epoch = int(self._epoch[0])
        if epoch != self._seeded_epoch:
            seed_worker_augmentation(self.pipeline, self.seed, epoch, self.rank * info.num_workers + info.id)
            self._seeded_epoch = epoch


class RowBatches:
    """Batches of a split's rows in order, for evaluation (map-style: item j is batch j, collated):
    one ranged read per batch on shards, a slice of the memory map on arrays."""

    def __init__(self, split: Split, rows, batch: int):
        self.images, self.labels = split.images, split.labels
        self.rows, self.batch = np.asarray(rows, dtype=np.int64), batch

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch)

    def __getitem__(self, j: int):
        import torch

        rows = self.rows[j * self.batch : (j + 1) * self.batch]
        images = self.images[rows] if len(rows) else np.empty((0,) + tuple(self.images.shape[1:]), np.uint8)
        return torch.from_numpy(np.ascontiguousarray(images)), torch.as_tensor(np.asarray(self.labels)[rows], dtype=torch.long)


class SkippingSampler:
    """A sampler whose next pass leaves out its first ``skip`` indices (then skips nothing again): a run
    resumed mid-epoch draws the epoch's order as the uninterrupted run did (the inner sampler and its
    generator restored) and starts after the batches already taken. Its length stays the whole epoch's,
    so the step count per epoch, and the schedule built on it, do not change."""

    def __init__(self, inner):
        self.inner, self.skip = inner, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)


def train_dataset(split: Split, pipeline, seed: int, batch: int, drop_last: bool, buffer: int,
                  rank: int = 0, world_size: int = 1, workers: int = 0):
    """The training samples of *split*, whichever its format: a map-style :class:`ArrayDataset` over the
    arrays (a sampler orders it), or a :class:`ShardStream` over shards (which orders itself)."""
    if split.shards is not None:
        from cvpipe.torchkit.streaming import ShardStream

        return ShardStream(split, pipeline, seed, batch, drop_last, buffer, rank, world_size, workers)
    return ArrayDataset(split, pipeline, seed, rank)


def collate_uint8(batch):
    """Stack uint8 HWC images into one tensor; conversion and normalization happen on the device."""
    import torch

    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels


class BatchNormalizer:
    """uint8 (B,H,W,3) -> normalized float (B,3,H,W) on the device, channels_last when asked."""

    def __init__(self, mean, std, rt: Runtime):
        import torch

        self.rt = rt
        self.mean = torch.tensor(mean, device=rt.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=rt.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images):
        import torch

        x = images.to(self.rt.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def default_workers(device_type: str) -> int:
    # On a CPU the model's own threads use every core; extra loader processes
    # would only steal them (augmenting a uint8 array costs far less than a step).
    if device_type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))


def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int, pin: bool, drop_last: bool = False,
                generator=None):
    """A DataLoader over *ds*; *generator* (default: one seeded with *seed*) draws the shuffle and the workers'
    base seed, so a pass never draws from the global torch RNG (which dropout and drop-path use)."""
    import torch
    from torch.utils.data import DataLoader

    from cvpipe.torchkit.streaming import ShardStream

    g = generator
    if g is None:
        g = torch.Generator()
        g.manual_seed(seed)
    if isinstance(ds, ShardStream):  # orders and shards itself (the epoch reaches its workers through shared memory)
        return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_uint8, pin_memory=pin,
                          persistent_workers=workers > 0, generator=g)
    if isinstance(ds, RowBatches):  # already batched
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, generator=g)

    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_uint8,
        pin_memory=pin,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=g,
    )


def cycle(loader):
    """The loader's batches without end: a new (reshuffled) pass whenever one ends."""
    while True:
        yield from loader
