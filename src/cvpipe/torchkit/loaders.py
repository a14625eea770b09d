"""Datasets and loaders over the prepared format, and the on-device normalization, shared by
train, the LR finder and evaluate.

Images travel as uint8 HWC arrays (a quarter of float32's bytes) and become normalized float
tensors on the device (:class:`BatchNormalizer`), in one definition every model-using stage shares.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct

import numpy as np

from cvpipe.data.prepared import Split
from cvpipe.torchkit.runtime import Runtime


class SampleAugment:
    """An albumentations pipeline whose draws for a sample depend only on (seed, epoch, row).

    Albumentations 2 draws from a numpy and a Python generator that each transform holds. Before every
    sample both are reset to a state derived from (seed, epoch, the sample's row in its split), so an image
    is augmented the same way whichever process, DataLoader worker or position in the stream reads it: a run
    resumed mid-epoch with loader workers, resumed with another number of processes, or reading shards
    instead of arrays augments each image as the uninterrupted run did. The pipeline's transforms are given
    one shared pair of generators (``set_random_state``), reset in place.

    Why by hand: albumentations' own ``set_random_seed`` builds new generators for every transform (~25 us
    per sample, 13-22 % of the default augmentation at 224-128 px on a 2-core Xeon), and
    ``numpy.random.SeedSequence`` alone spends ~8 us mixing the seed; a blake2b of the three numbers sets
    the 128-bit PCG64 state and the Python generator's seed in ~7 us (4-6 %).
    """

    def __init__(self, pipeline, seed: int):
        import random

        self.pipeline, self.seed = pipeline, int(seed)
        self._numpy = np.random.Generator(np.random.PCG64(0))
        self._python = random.Random(0)
        pipeline.set_random_state(self._numpy, self._python)

    def reseed(self, epoch: int, row: int) -> None:
        d = hashlib.blake2b(struct.pack("<3q", self.seed, int(epoch), int(row)), digest_size=32,
                            person=b"cvpipe-augment").digest()
        self._numpy.bit_generator.state = {
            "bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": int.from_bytes(d[:16], "little"), "inc": int.from_bytes(d[16:], "little") | 1}}
        self._python.seed(int.from_bytes(d[:8], "little"))

    def __call__(self, image: np.ndarray, epoch: int, row: int) -> np.ndarray:
        if self.pipeline.random_generator is not self._numpy:  # another wrapper (or a reseed) took the pipeline
            self.pipeline.set_random_state(self._numpy, self._python)
        self.reseed(epoch, row)
        return self.pipeline(image=image)["image"]


class ArrayDataset:
    """Samples of a memory-mapped split, augmented per sample with albumentations (uint8 HWC).

    ``set_epoch`` reaches persistent loader workers through shared memory; each sample's augmentation is
    seeded by (seed, epoch, row) (:class:`SampleAugment`)."""

    def __init__(self, split: Split, pipeline=None, seed: int = 0):
        import torch

        self.images = split.images
        self.labels = split.labels
        self.augment = SampleAugment(pipeline, seed) if pipeline is not None else None
        # shared before any worker starts, so workers started earlier still see every set_epoch
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[i])
        if self.augment is not None:
            img = self.augment(img, int(self._epoch[0]), i)
        return img, int(self.labels[i])


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
    return ArrayDataset(split, pipeline, seed)


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
