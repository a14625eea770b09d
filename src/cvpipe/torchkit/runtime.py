"""Device, precision, threads and seeds: decided once, the same way for train and evaluate."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cvpipe.core.errors import ParamsError


@dataclass
class Runtime:
    device: "torch.device"  # noqa: F821
    amp_dtype: Optional["torch.dtype"]  # noqa: F821
    use_scaler: bool
    channels_last: bool

    @property
    def amp_name(self) -> str:
        import torch

        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


def cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo ("AMD EPYC", "Intel(R) Xeon(R) ..."), None where there is none.

    Float results on a CPU depend on it (oneDNN picks kernels per ISA), so recorded results name it.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        return None


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def resolve_device(name: str, key: str = "train.device") -> "torch.device":  # noqa: F821
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.device_count() > 1 else 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"{key}: {name!r} requested but no CUDA device is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"{key}: 'mps' requested but MPS is not available")
    return dev


def resolve_runtime(device: str, amp: str, channels_last: bool, key: str = "train") -> Runtime:
    import torch

    dev = resolve_device(device, f"{key}.device")
    dtype = None
    if amp == "auto":
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif dev.type == "cpu" and cpu_supports_bf16():
            dtype = torch.bfloat16
    elif amp == "bf16":
        dtype = torch.bfloat16
    elif amp == "fp16":
        if dev.type == "cpu":
            raise ParamsError(f"{key}.amp: fp16 autocast needs a GPU; use bf16 or off on CPU")
        dtype = torch.float16
    return Runtime(dev, dtype, use_scaler=dtype == torch.float16 and dev.type == "cuda", channels_last=channels_last)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def autocast(rt: Runtime):
    """The autocast context of *rt*'s precision (a no-op context when AMP is off)."""
    import torch

    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None)
