"""timm models: creation by name, checkpoints, pretrained weight files, and loading them back safely."""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any

from cvpipe.core import storage
from cvpipe.core.console import info, warn
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


CHECKPOINT_FILES = ("best.pt", "last.pt")


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """A run's checkpoints by file name (those that exist): train logs them as its W&B ``checkpoint``
    artifact and evaluate, which reads one of them, records using the same files (same digest)."""
    return {name: Path(model_dir) / name for name in CHECKPOINT_FILES if (Path(model_dir) / name).is_file()}


def model_from_checkpoint(ckpt: dict[str, Any]):
    model = create(ckpt["arch"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model


def head_module_names(model) -> list[str]:
    """Names of the classifier module(s) (``fc``, ``head.fc``, ...) as timm reports them."""
    cls = model.get_classifier()
    names = [n for n, m in model.named_modules() if m is cls and n]
    if not names:
        cfg_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        names = [cfg_name] if isinstance(cfg_name, str) else list(cfg_name or [])
    if not names:
        raise StageError(f"cannot find the classifier of {type(model).__name__}")
    return names


def is_head_param(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def read_weights_file(path: str, key: str) -> Any:
    """What a weights file holds, read safely: a ``.safetensors`` state dict, else ``torch.load`` with
    ``weights_only=True`` (tensors and plain data, never arbitrary code). Errors name *key*."""
    import torch

    if not storage.exists(path):
        raise StageError(f"{key}: {path} not found")
    data = storage.read_bytes(path)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load as st_load

            return st_load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StageError(f"{key}: cannot read {path} safely ({type(exc).__name__}: {exc})") from None


def unwrap_state_dict(content: Any, path: str, key: str) -> dict[str, Any]:
    """The state dict of tensors inside a weights file's content (under ``model``/``state_dict``/... when
    nested), with DataParallel's ``module.`` prefixes stripped."""
    sd = content
    if isinstance(sd, dict):
        for field in ("model", "state_dict", "model_state_dict", "state_dict_ema"):
            if field in sd and isinstance(sd[field], dict):
                sd = sd[field]
                break
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise StageError(f"{key}: {path} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_pretrained_path(model, path: str, key: str = "train.pretrained_path") -> dict[str, list[str]]:
    """Load a backbone from a file into ``model``; shape-mismatched (head) tensors are dropped.

    Errors name *key*, the parameter that gave the path (train's ``train.pretrained_path``, the audit's
    ``audit.backbone``). Returns ``{"loaded", "dropped", "missing", "unexpected"}`` key lists and reports them.
    """
    return load_pretrained_state(model, unwrap_state_dict(read_weights_file(path, key), path, key), path, key)


def load_pretrained_state(model, sd: dict[str, Any], path: str, key: str) -> dict[str, list[str]]:
    """:func:`load_pretrained_path` for a state dict already read from *path*."""
    own = model.state_dict()
    keep, dropped = {}, []
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            dropped.append(k)
        else:
            keep[k] = v
    result = model.load_state_dict(keep, strict=False)
    loaded = [k for k in keep if k in own]
    if not loaded:
        raise StageError(f"{key}: no tensor in {path} matches {type(model).__name__} (wrong architecture?)")
    report = {"loaded": loaded, "dropped": dropped, "missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    info(f"loaded {len(loaded)}/{len(own)} tensors from {path}")
    if dropped:
        info(f"dropped (shape differs, re-initialized for this dataset): {', '.join(dropped)}")
    heads = head_module_names(model)
    body_missing = [k for k in report["missing"] if not is_head_param(k, heads) and not k.endswith("num_batches_tracked")]
    if report["missing"]:
        (warn if body_missing else info)(f"missing (left as initialized): {', '.join(report['missing'])}")
    if report["unexpected"]:
        warn(f"unexpected (ignored): {', '.join(report['unexpected'])}")
    return report
