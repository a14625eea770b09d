"""The W&B ``model`` artifact: the weights evaluate scored, and the lineage edge back to train.

Evaluate is where "the model" is decided (``evaluate.checkpoint`` best or last, ``evaluate.weights``
EMA or raw), so evaluate, not train, logs it: ``model-<arch>-seed<seed>`` (type ``model``) holds
``model.safetensors`` (exactly the state_dict that was scored) and timm's ``config.json``
(:mod:`cvpipe.torchkit.hub`), with the test metrics as metadata. The same two files are in the export
bundle (``<paths.exports>/<run>/``), so compare promotes them to ``models/best/`` and records using
this artifact, and the W&B digest of the artifact equals the bundle's.

The run also records using ``checkpoint-<arch>-seed<seed>`` (best.pt + last.pt, what train logged),
so W&B draws dataset -> train -> checkpoint -> evaluate -> model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.torchkit import hub
from cvpipe.torchkit.models import checkpoint_files

METADATA_KEYS = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece", "n_test", "checkpoint",
                 "weights", "temperature", "trained_epochs", "image_size", "data_version")


def provenance(metrics: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``cvpipe`` key beside the timm config: which weights these are and their temperature."""
    return {k: metrics.get(k) for k in ("weights", "checkpoint", "temperature") if metrics.get(k) is not None}


def write_timm(folder: str | Path, ckpt: dict[str, Any], state_dict: dict[str, Any], metrics: dict[str, Any]) -> dict[str, int]:
    """``model.safetensors`` + ``config.json`` of the scored *state_dict* into *folder* (the staged export bundle)."""
    return hub.save(folder, ckpt, state_dict, provenance(metrics))


def log_lineage(tracker: tracking.Tracker, params: Params, ckpt: dict[str, Any], ckpt_path: str,
                metrics: dict[str, Any], export_dir: str) -> Optional[Any]:
    """Record using train's checkpoint artifact and log the scored weights as the ``model`` artifact
    (from the export bundle; rebuilt the same way in a temporary folder when there is none, e.g.
    ``evaluate.export: false`` or a remote ``paths.exports``). Returns the logged ``wandb.Artifact``."""
    if not tracker.enabled:
        return None
    arch, seed = params.train.arch, params.train.seed
    if not storage.is_remote(ckpt_path):
        used = checkpoint_files(Path(ckpt_path).parent)
        if used:
            tracker.use_artifact(used, name=tracking.checkpoint_artifact(arch, seed), type="checkpoint",
                                 metadata={"read": Path(ckpt_path).name})
    with tempfile.TemporaryDirectory(prefix="cvpipe-model-") as tmp:
        files = {name: Path(export_dir) / name for name in hub.FILES}
        if storage.is_remote(export_dir) or not all(p.is_file() for p in files.values()):
            write_timm(tmp, ckpt, ckpt[metrics["weights"]], metrics)
            files = {name: Path(tmp) / name for name in hub.FILES}
        metadata = {k: metrics.get(k) for k in METADATA_KEYS if metrics.get(k) is not None}
        metadata.update({"arch": arch, "seed": seed, "sha256": hub.sha256(files[hub.WEIGHTS]),
                         "load": "timm.create_model(arch, pretrained=True, num_classes=N, "
                                 "pretrained_cfg_overlay=dict(file='model.safetensors', num_classes=N))"})
        # log_artifact copies the files into W&B's staging area before the temporary folder goes
        return tracker.log_artifact(files, name=tracking.model_artifact(arch, seed), type="model", metadata=metadata)
