"""The evaluation pass: one definition of how a model is run over held-out images.

Train's validation (sums of loss and correct predictions per rank, reduced over ranks by the
caller) and evaluate's test predictions (the logits of each image, written into an array the caller
gives) both call :func:`evaluate`; only what they keep differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from cvpipe.torchkit.loaders import BatchNormalizer
from cvpipe.torchkit.runtime import Runtime, autocast


@dataclass
class EvalResult:
    loss_sum: float  # sum over labelled images of the per-batch mean loss x batch size (float64); 0.0 without a criterion
    correct: float  # labelled images whose argmax logit is the label
    count: float  # labelled images seen
    logits: Any = None  # the caller's (N, C) float32 array, filled with the logits, when one was given

    def sums(self) -> list[float]:
        """[loss_sum, correct, count]: what :func:`cvpipe.train.distributed.all_sum` reduces over ranks."""
        return [self.loss_sum, self.correct, self.count]


def evaluate(model, batches: Iterable, normalize: BatchNormalizer, rt: Runtime, criterion=None,
             logits_out: Optional[np.ndarray] = None) -> EvalResult:
    """Run *model* in eval mode over *batches* of ``(uint8 images, labels or None)``.

    Per batch, under ``inference_mode`` and the run's autocast: normalize, logits = ``model(x).float()``;
    with labels, the loss (``criterion(logits, y)`` as float64, times the batch size) and the
    correct count (argmax of the logits) are summed on the device; with *logits_out* (N x C float32, N the
    images in *batches*), each batch's logits are written into its rows. The caller owns that array (evaluate
    gives a disk-backed one), so no list of per-batch tensors and no concatenated copy is ever held.
    """
    import torch

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    total = 0
    seen = 0
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
            if logits_out is not None:
                logits_out[seen : seen + len(logits)] = logits.cpu().numpy()
                seen += len(logits)
    if logits_out is not None and seen != len(logits_out):
        raise ValueError(f"the batches held {seen} images, logits_out has {len(logits_out)} rows")
    return EvalResult(float(loss_sum), float(correct), float(total), logits=logits_out)


def array_batches(images, batch_size: int):
    """``(uint8 tensor, None)`` batches over an (N, H, W, 3) uint8 array (memory-mapped is fine): unlabelled."""
    import torch

    for s in range(0, len(images), batch_size):
        yield torch.from_numpy(np.array(images[s : s + batch_size])), None
