"""Embeddings of the audited images from a timm backbone: a cvpipe train checkpoint or pretrained weights.

The only module of the audit that imports torch (lazily, inside the functions), so the pixel learner
runs where torch is missing. The backbone comes from ``audit.backbone``, or ``train.pretrained_path``
when that is null:

* a cvpipe checkpoint (``models/<arch>/seed<seed>/best.pt``/``last.pt``): its arch, weights (the EMA weights
  when train selected on an ``ema_*`` metric, as evaluate does) and its normalization;
* any other ``.pt``/``.pth``/``.safetensors`` file: pretrained weights of ``train.arch``, loaded like
  ``train.pretrained_path`` (:func:`cvpipe.torchkit.models.load_pretrained_path`), normalized with
  the architecture's own mean/std (timm's pretrained config).

Features are the pooled pre-logits embeddings (``forward_features`` then ``forward_head(...,
pre_logits=True)``: what the classifier sees), in fp32 (no autocast: the features must not depend
on the machine's AMP support), L2-normalised so that dot products are cosine similarities.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from cvpipe.core.config import Params
from cvpipe.core.console import info
from cvpipe.core.errors import StageError

KEY = "audit.backbone"


def backbone_path(params: Params) -> Optional[str]:
    """``audit.backbone``, else ``train.pretrained_path``, else None."""
    return params.audit.backbone or params.train.pretrained_path


def wants_embeddings(params: Params) -> bool:
    """Whether this audit uses embeddings; ``features: embeddings`` without any backbone is an error."""
    feats = params.audit.features
    if feats == "pixels":
        return False
    if backbone_path(params) is None:
        if feats == "embeddings":
            raise StageError(f"audit.features: embeddings needs a backbone: set {KEY} to a train checkpoint "
                             "(models/<arch>/seed<seed>/best.pt) or pretrained timm weights (.safetensors/.pth), or train.pretrained_path")
        return False
    return True


def load_backbone(params: Params, num_classes: int) -> tuple[Any, dict[str, Any], str]:
    """(model in eval mode, {"mean", "std"}, a description for the metrics) for the configured backbone."""
    from cvpipe.torchkit import models

    path = str(backbone_path(params))
    key = KEY if params.audit.backbone else "train.pretrained_path"
    content = models.read_weights_file(path, key)  # read once: a gs:// file is not downloaded twice
    if isinstance(content, dict) and {"arch", "model", "classes", "normalize"} <= set(content):
        ckpt = content
        monitor = str(((ckpt.get("params") or {}).get("train") or {}).get("monitor", ""))
        which = "ema" if monitor.startswith("ema_") and ckpt.get("ema") is not None else "model"
        try:
            model = models.create(ckpt["arch"], num_classes=len(ckpt["classes"]))
            model.load_state_dict(ckpt[which])
        except Exception as exc:
            raise StageError(f"{key}: {path} is a cvpipe checkpoint that does not load into {ckpt['arch']} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
        norm = {"mean": ckpt["normalize"]["mean"], "std": ckpt["normalize"]["std"]}
        desc = f"{ckpt['arch']} checkpoint {path} ({which} weights, epoch {ckpt.get('epoch', '?')})"
        info(f"audit: embeddings of the checkpoint {path} ({ckpt['arch']}, {which} weights); it was trained on these "
             "labels, so it may have memorised wrong ones (see cvpipe/audit/learner.py)")
        return model.eval(), norm, desc
    arch = params.train.arch
    models.check_arch(arch)
    model = models.create(arch, num_classes=num_classes)
    report = models.load_pretrained_state(model, models.unwrap_state_dict(content, path, key), path, key)
    heads = models.head_module_names(model)
    body = [k for k in report["missing"] if not models.is_head_param(k, heads) and not k.endswith("num_batches_tracked")]
    if body:  # train may fine-tune a partly initialised backbone; the audit's features would be partly random
        raise StageError(f"{key}: {path} does not fit {arch}: {len(body)} backbone tensors missing ({', '.join(body[:5])}"
                         f"{', ...' if len(body) > 5 else ''}); is train.arch the weights' architecture?")
    cfg = models.data_config(model)
    return model.eval(), {"mean": cfg["mean"], "std": cfg["std"]}, f"{arch} pretrained weights {path}"


def embed(model, images, norm: dict[str, Any], device: str, batch_size: int) -> np.ndarray:
    """(N, D) float32 L2-normalised pre-logits embeddings of *images* (uint8 N,H,W,3, read batch by batch)."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.runtime import resolve_runtime

    rt = resolve_runtime(device, "off", channels_last=False, key="audit")
    model = model.to(rt.device).eval()
    normalize = BatchNormalizer(norm["mean"], norm["std"], rt)
    out: Optional[np.ndarray] = None
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = normalize(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])))
            try:
                f = model.forward_head(model.forward_features(x), pre_logits=True).float()
            except RuntimeError as exc:
                raise StageError(f"{KEY}: the backbone cannot embed the prepared {tuple(x.shape[2:])} images "
                                 f"({str(exc)[:300]}); use a backbone trained at preprocess.image_size") from None
            f = torch.nn.functional.normalize(f.reshape(len(f), -1), dim=1).cpu().numpy()
            if out is None:
                out = np.empty((len(images), f.shape[1]), dtype=np.float32)
            out[s : s + len(f)] = f
    if out is None or not np.isfinite(out).all():
        raise StageError(f"{KEY}: the backbone's embeddings are empty or not finite")
    return out
