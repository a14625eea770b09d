"""How long the ``dvc repro`` that ``cvpipe init`` just planned takes on this machine.

A short throughput probe: for each bake-off architecture, a few real training steps of the
planned model at the planned image size and batch size (:func:`cvpipe.torchkit.step.time_train_steps`,
the step the train stage's time-budget probe times), on random images: the step time does not
depend on the pixels. Seconds per epoch = steps per epoch x the step, plus an eval pass over the
val split (a forward pass costs about a third of a training step); the total is the sum over the
architectures of epochs x that. With ``--time-budget`` the budget is the answer (each architecture
trains for it) and nothing is probed.

On a CPU the probe runs a smaller batch (at most :data:`CPU_PROBE_BATCH` images) and scales per
image, which is how CPU step time grows; on a GPU the planned batch is timed as is. Data loading,
ingest, preprocess and evaluate's exports are not counted: on the datasets init plans for, training
dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

CPU_PROBE_BATCH = 8  # images per probe step on a CPU: a few seconds per architecture, not minutes
PROBE_STEPS = 2  # timed steps per architecture (after one untimed warm-up step)
SUGGEST_BUDGET_ABOVE_MIN = 10.0  # a longer plan gets the --time-budget hint
EVAL_COST = 1 / 3  # an eval forward pass per image, as a share of a training step's


@dataclass
class ReproEstimate:
    minutes: float
    archs: int
    epochs: int
    per_arch_epoch_s: dict[str, float]  # measured seconds per epoch (empty with a time budget)
    budgeted: bool

    def message(self) -> str:
        """The line init prints; the ``--time-budget`` hint when the plan is long and unbudgeted."""
        what = f"{self.archs} archs x {'the time budget' if self.budgeted else f'{self.epochs} epochs'}"
        text = f"dvc repro will take about {_minutes(self.minutes)} here ({what})"
        if not self.budgeted and self.minutes > SUGGEST_BUDGET_ABOVE_MIN:
            text += "; add --time-budget MIN to cap it"
        return text


def _minutes(m: float) -> str:
    return f"{m:.0f} min" if m >= 10 else f"{max(m, 0.1):.1f} min"


def estimate_repro(archs: dict[str, dict[str, Any]], image_size: int, batch_size: int, epochs: int, num_classes: int,
                   train_images: int, val_images: int, time_budget_minutes: Optional[float]) -> ReproEstimate:
    """The planned run's duration here: the sum over *archs* (name -> its bake-off overrides of
    ``epochs``/``batch_size``) of epochs x the measured epoch, or archs x the time budget."""
    if time_budget_minutes is not None:
        return ReproEstimate(len(archs) * time_budget_minutes, len(archs), epochs, {}, True)
    per_epoch: dict[str, float] = {}
    total_s = 0.0
    for arch, overrides in archs.items():
        overrides = overrides or {}
        bs = int(overrides.get("batch_size", batch_size))
        per_image = seconds_per_image(arch, image_size, bs, num_classes)
        per_epoch[arch] = per_image * (math.ceil(train_images / bs) * bs + EVAL_COST * val_images)
        total_s += int(overrides.get("epochs", epochs)) * per_epoch[arch]
    return ReproEstimate(total_s / 60.0, len(archs), epochs, per_epoch, False)


def seconds_per_image(arch: str, image_size: int, batch_size: int, num_classes: int) -> float:
    """Training seconds per image of *arch* at *image_size* here: a few timed steps (see the module docstring)."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.models import create, data_config
    from cvpipe.torchkit.runtime import resolve_runtime
    from cvpipe.torchkit.step import time_train_steps

    rt = resolve_runtime("auto", "auto", channels_last=True)
    probe_batch = batch_size if rt.device.type == "cuda" else min(batch_size, CPU_PROBE_BATCH)
    model = create(arch, num_classes).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    cfg = data_config(model)
    normalize = BatchNormalizer(cfg["mean"], cfg["std"], rt)
    # plain SGD: the optimizer's update is a small share of a step next to forward and backward
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (probe_batch, image_size, image_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, num_classes, (probe_batch,), generator=gen)
    batches = iter(lambda: (images, labels), None)
    step_s = time_train_steps(model, optimizer, batches, normalize, torch.nn.CrossEntropyLoss(), None, rt, PROBE_STEPS)
    del model, optimizer
    return step_s / probe_batch


def from_choices(choices: dict[str, Any], num_classes: int, train_images: int, val_images: int) -> ReproEstimate:
    """:func:`estimate_repro` for init's recipe (``{"train.epochs": Choice, ...}``)."""
    return estimate_repro(
        dict(choices["bakeoff.archs"].value), int(choices["preprocess.image_size"].value),
        int(choices["train.batch_size"].value), int(choices["train.epochs"].value), num_classes, train_images,
        val_images, choices["train.time_budget_minutes"].value,
    )
