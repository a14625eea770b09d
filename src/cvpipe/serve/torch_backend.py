"""Serve a train checkpoint through torch eager: a bare ``.pt``, ``serve.backend: torch``, or a folder
whose model.onnx predates the uint8-pixel graph.

The only module of :mod:`cvpipe.serve` that imports torch (import-linter contract
``serve-torch-free``); :mod:`cvpipe.serve.model` imports it lazily, only when this backend is chosen,
so the app image (onnxruntime, no torch) never loads it. Where torch is not installed it says so in
one line (:func:`load`).

Normalization is :class:`cvpipe.torchkit.loaders.BatchNormalizer`, the one train and evaluate use.
The logits are divided by the checkpoint's ``temperature`` (evaluate's fit on the validation split,
stored in the exported model.pt; 1.0 for a bare train checkpoint) before the softmax, so the torch
backend's probabilities are the calibrated ones model.onnx gives (its graph divides by the same value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.core.errors import StageError

NAME = "torch"


class TorchBackend:
    """A timm module in eval mode, fp32, default memory format: the module as evaluate scored it."""

    name = NAME

    def __init__(self, module, mean, std, device, temperature: float = 1.0):
        from cvpipe.torchkit.loaders import BatchNormalizer
        from cvpipe.torchkit.runtime import Runtime

        if not temperature > 0:
            raise StageError(f"the temperature must be positive, not {temperature!r}")
        self.module, self.device, self.temperature = module, device, float(temperature)
        runtime = Runtime(device, amp_dtype=None, use_scaler=False, channels_last=False)
        self._normalize = BatchNormalizer(mean, std, runtime)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated softmax probabilities, ``softmax(logits / temperature)``, of uint8 NHWC *pixels*
        (normalized by BatchNormalizer on the device)."""
        import torch

        with torch.inference_mode():
            # contiguous NCHW like the module's weights (the normalizer's permute leaves NHWC memory,
            # which would send the convolutions down another kernel path)
            x = self._normalize(torch.from_numpy(np.ascontiguousarray(pixels))).contiguous()
            return torch.softmax(self.module(x).float() / self.temperature, dim=1).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import torch

        return {"name": NAME, "file": "checkpoint", "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "temperature": self.temperature, "torch": torch.__version__}


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise StageError(
            f"this model needs the torch backend, and torch is not installed ({exc}): serve a promoted model folder "
            "(its uint8-pixel model.onnx runs on onnxruntime) or install torch"
        ) from None
    return torch


def load(ckpt_path: Path, device: str, torch_threads: int) -> tuple[dict[str, Any], Any, Any, float]:
    """(the checkpoint, its module in eval mode on the device, the device, the parameters in millions);
    :class:`TorchBackend` is built on them with the mean/std the folder's preprocess.json says (it wins)."""
    torch = _torch()
    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint
    from cvpipe.torchkit.runtime import resolve_device

    if torch_threads > 0:  # process-wide; load_model passes cores // concurrent runs when serve.torch_threads is 0
        torch.set_num_threads(torch_threads)
    ckpt = load_checkpoint(str(ckpt_path))
    for key in ("arch", "classes", "model"):
        if key not in ckpt:
            raise StageError(f"{ckpt_path} is not a cvpipe train checkpoint (no {key!r})")
    module = model_from_checkpoint(ckpt)
    dev = resolve_device(device, "serve.device")
    module.to(dev).eval()
    params_m = round(sum(p.numel() for p in module.parameters()) / 1e6, 4)
    return ckpt, module, dev, params_m
