"""The evaluated weights as timm's own hub format: ``model.safetensors`` + ``config.json``.

This is what evaluate writes into the export bundle and logs to W&B as the ``model`` artifact, so
"the model" anyone pulls is the state_dict evaluate scored, loadable with timm alone::

    model = timm.create_model(arch, pretrained=True, num_classes=N,
                              pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=N))

(``num_classes`` in the overlay matters: without it timm compares N with the architecture's default
pretrained config (1000 ImageNet classes) and drops the classifier it loads.) ``config.json`` is
written by timm's :func:`timm.models.save_for_hf` (architecture, num_classes, label_names,
pretrained_cfg with this run's input_size, mean, std, interpolation), so ``timm.create_model("local-dir:<folder>")``
reads the folder as well; cvpipe adds a ``cvpipe`` key (weights, checkpoint, epoch, data version and the
calibration temperature when there is one: divide the logits by it for calibrated probabilities).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FILES = (WEIGHTS, CONFIG)


def tensors(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state_dict as safetensors stores it: detached, on CPU, contiguous (values unchanged)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save(folder: str | Path, ckpt: dict[str, Any], state_dict: dict[str, Any],
         extra: Optional[dict[str, Any]] = None) -> dict[str, int]:
    """Write *state_dict* (the weights evaluate scored) as ``model.safetensors`` and timm's ``config.json``
    into *folder* with :func:`timm.models.save_for_hf`; returns the file sizes.

    *ckpt* gives the architecture, classes, image size and normalization; *extra* (e.g.
    ``{"temperature": 1.3}``) is stored under ``config.json``'s ``cvpipe`` key with the weights' provenance.
    The tensors are loaded into a fresh CPU timm model first (strict), so the file holds exactly the
    state_dict's names and values and the config describes that model."""
    from timm.models import save_for_hf

    from cvpipe.torchkit.models import model_from_checkpoint

    model = model_from_checkpoint({**ckpt, "model": tensors(state_dict)}).eval()
    size = int(ckpt["image_size"])
    norm = ckpt["normalize"]
    data_config = {"input_size": (3, size, size), "mean": tuple(float(v) for v in norm["mean"]),
                   "std": tuple(float(v) for v in norm["std"]), "crop_pct": 1.0}
    if norm.get("interpolation"):
        data_config["interpolation"] = norm["interpolation"]
    provenance = {"epoch": ckpt.get("epoch"), "dataset_hash": ckpt.get("dataset_hash"), **(extra or {})}
    folder = Path(folder)
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config,
                model_config={"label_names": [str(c) for c in ckpt["classes"]], "cvpipe": provenance})
    return {name: (folder / name).stat().st_size for name in FILES}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(folder: str | Path):
    """The timm model of a ``model.safetensors`` + ``config.json`` folder, built and loaded by timm itself."""
    import timm

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG).read_text())
    n = int(cfg["num_classes"])
    return timm.create_model(cfg["architecture"], pretrained=True, num_classes=n,
                             pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS), num_classes=n))
