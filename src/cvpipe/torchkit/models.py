"""timm models: creation by name, checkpoints, and loading them back safely."""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any

from cvpipe.core import storage
from cvpipe.core.errors import ParamsError, StageError


def check_arch(arch: str, key: str = "train.arch") -> None:
    import timm

    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise ParamsError(f"{key}: unknown timm architecture {arch!r}{hint}")


def create(arch: str, num_classes: int, **kwargs: Any):
    import timm

    check_arch(arch)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def data_config(model) -> dict[str, Any]:
    """The input normalization the architecture expects (timm's pretrained config)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "interpolation": cfg.get("interpolation", "bilinear")}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file and rename: a crash never leaves a half-written checkpoint."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(str(path), buf.getvalue())


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data, never arbitrary code."""
    import torch

    if not storage.exists(path):
        raise StageError(f"checkpoint not found: {path}")
    data = storage.read_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise StageError(f"cannot load checkpoint {path}: {exc}") from None


def model_from_checkpoint(ckpt: dict[str, Any]):
    model = create(ckpt["arch"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model
