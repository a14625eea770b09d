"""The evaluation pass: one definition of how a model is run over held-out images.

Train's validation (sums of loss and correct predictions per rank, reduced over ranks by the
caller) and evaluate's test predictions (softmax probabilities, optionally averaged with the
horizontally flipped image's) both call :func:`evaluate`; only what they keep differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from cvpipe.torchkit.loaders import BatchNormalizer
from cvpipe.torchkit.runtime import Runtime, autocast


@dataclass
class EvalResult:
    loss_sum: float  # sum over labelled images of the per-batch mean loss x batch size (float64); 0.0 without a criterion
    correct: float  # labelled images whose argmax logit is the label
    count: float  # labelled images seen
    probs: Any = None  # (N, C) float64 numpy softmax probabilities (TTA-averaged), with outputs=True
    logits: Any = None  # (N, C) float32 numpy logits of the plain (unflipped) pass, with outputs=True

    def sums(self) -> list[float]:
        """[loss_sum, correct, count]: what :func:`cvpipe.train.distributed.all_sum` reduces over ranks."""
        return [self.loss_sum, self.correct, self.count]


def evaluate(model, batches: Iterable, normalize: BatchNormalizer, rt: Runtime, criterion=None,
             outputs: bool = False, tta_flip: bool = False) -> EvalResult:
    """Run *model* in eval mode over *batches* of ``(uint8 images, labels or None)``.

    Per batch, under ``inference_mode`` and the run's autocast: normalize, logits = ``model(x).float()``;
    with labels, the loss (``criterion(logits, y)`` as float64, times the batch size) and the
    correct count (argmax of the logits) are summed on the device; with ``outputs``, the softmax of the
    logits (with ``tta_flip``: averaged with the softmax of the flipped batch) and the logits are kept.
    """
    import torch

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    total = 0
    probs: list = []
    logits_out: list = []
    with torch.inference_mode(), autocast(rt):
        for images, labels in batches:
            x = normalize(images)
            y = labels.to(rt.device, non_blocking=True) if labels is not None else None
            logits = model(x).float()
            if y is not None:
                if criterion is not None:
                    loss_sum += criterion(logits, y).double() * len(y)
                correct += (logits.argmax(1) == y).sum()
                total += len(y)
            if outputs:
                probs.append(_probabilities(model, x, logits, tta_flip).cpu())
                logits_out.append(logits.cpu())
    return EvalResult(
        float(loss_sum), float(correct), float(total),
        probs=torch.cat(probs).double().numpy() if outputs else None,
        logits=torch.cat(logits_out).numpy() if outputs else None,
    )


def _probabilities(model, x, logits, tta_flip: bool):
    """Softmax of *logits*; with *tta_flip*, averaged with the softmax of the horizontally flipped batch."""
    import torch

    p = logits.softmax(1)
    if tta_flip:
        p = (p + model(torch.flip(x, dims=[3])).float().softmax(1)) / 2
    return p


def array_batches(images, batch_size: int):
    """``(uint8 tensor, None)`` batches over an (N, H, W, 3) uint8 array (memory-mapped is fine): unlabelled."""
    import numpy as np
    import torch

    for s in range(0, len(images), batch_size):
        yield torch.from_numpy(np.array(images[s : s + batch_size])), None
