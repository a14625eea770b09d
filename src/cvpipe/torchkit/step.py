"""The training forward pass: one definition of how a batch becomes a loss.

The train loop, the LR range test (:mod:`cvpipe.train.lr_finder`) and the time-budget probe
(:func:`cvpipe.train.budget_run.measure_step_seconds`) all call :func:`forward_loss`, so what
the probe times and what the range test scores is the loss training minimizes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cvpipe.torchkit.loaders import BatchNormalizer
from cvpipe.torchkit.runtime import Runtime, autocast


class Forward(NamedTuple):
    loss: Any  # scalar tensor, float32, with its graph (call .backward() on it)
    logits: Any  # (B, C) as the model returned them (autocast dtype), with their graph
    labels: Any  # (B,) int64 class indices on the device (the unmixed labels: accuracy is counted on them)


def forward_loss(model, images, labels, normalize: BatchNormalizer, criterion, mixup, rt: Runtime) -> Forward:
    """Loss of one uint8 batch as training computes it.

    On-device normalization, then Mixup/CutMix (timm ``Mixup``; ``None`` = off), then the forward
    pass and the criterion on float32 logits, both under the run's autocast.

    Mixup mixes each sample with its mirror in the batch, so timm requires an even batch. An
    odd batch (only possible when the whole split, or a rank's shard of it, is smaller than one
    batch and odd) is **not mixed**: its targets become the same label-smoothed one-hot soft
    targets Mixup gives an unmixed batch (``lam = 1``), so the soft-target criterion still gets
    the (B, C) targets it expects. (Before, the train loop failed on timm's assertion there, and
    the LR finder passed class indices to the soft-target loss.) Even batches, which are all the
    batches of any run that worked before, are mixed exactly as before.
    """
    x = normalize(images)
    y = labels.to(rt.device, non_blocking=True)
    target = y
    if mixup is not None:
        if len(y) % 2 == 0:
            x, target = mixup(x, y)
        else:
            target = unmixed_targets(mixup, y)
    with autocast(rt):
        logits = model(x)
        loss = criterion(logits.float(), target)
    return Forward(loss, logits, y)


def unmixed_targets(mixup, y):
    """The soft targets timm's Mixup gives a batch it does not mix (``lam = 1``): label-smoothed one-hot."""
    from timm.data.mixup import mixup_target

    return mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)


def time_train_steps(model, optimizer, batches, normalize: BatchNormalizer, criterion, mixup, rt: Runtime,
                     steps: int, max_seconds: float = float("inf")) -> float:
    """Median seconds of one training step (:func:`forward_loss`, backward, optimizer step) over ``steps``
    batches from the iterator *batches*, after one untimed warm-up step (allocator, oneDNN/cuDNN kernel
    choice, torch.compile); fewer (at least one) once ``max_seconds`` have gone, so a probe on a slow or
    busy machine does not eat the time it is measuring for. Shared by the train stage's time-budget
    probe and ``cvpipe init``'s estimate of how long the planned ``dvc repro`` takes, so both time the
    step training runs."""
    import statistics
    import time

    import torch

    times: list[float] = []
    started = time.perf_counter()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        images, labels = next(batches)
        forward_loss(model, images, labels, normalize, criterion, mixup, rt).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - started > max_seconds:
                break
    return float(statistics.median(times))
