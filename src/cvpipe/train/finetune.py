"""Fine-tuning strategies: pretrained weights, freezing, parameter groups, optimizer and scheduler.

Everything here builds on timm's own facilities: ``create_model`` for the
architecture and hub weights, ``param_groups_layer_decay`` /
``param_groups_weight_decay`` for parameter groups (their ``lr_scale`` is
applied by every timm scheduler), ``create_optimizer_v2``, ``create_scheduler_v2``,
``Mixup`` and ``ModelEmaV3``.

Strategies (``train.finetune``):

* ``full``          every parameter trains from the first step.
* ``linear_probe``  only the classifier trains; the backbone is frozen
                    (``requires_grad=False`` and kept in eval mode, so its
                    BatchNorm statistics and dropout do not change either).
* ``staged``        linear probe for ``freeze_epochs``, then everything trains
                    with a fresh optimizer and a fresh warmup for the remaining epochs.
"""

from __future__ import annotations

from typing import Any, Optional

from cvpipe.core.config import TrainParams
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.torchkit.models import head_module_names, is_head_param, load_pretrained_path

# --------------------------------------------------------------------------- head / backbone


def head_param_names(model) -> list[str]:
    heads = head_module_names(model)
    return [n for n, _ in model.named_parameters() if is_head_param(n, heads)]


def set_backbone_frozen(model, frozen: bool) -> None:
    heads = head_module_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(True if not frozen else is_head_param(name, heads))
    model._cvpipe_frozen = frozen  # read by train_mode()


def train_mode(model) -> None:
    """``model.train()``, except that a frozen backbone stays in eval mode (BN stats, dropout fixed)."""
    model.train()
    if getattr(model, "_cvpipe_frozen", False):
        heads = head_module_names(model)
        for name, m in model.named_modules():
            if name and not any(name == h or name.startswith(h + ".") or h.startswith(name + ".") for h in heads):
                m.eval()


def backbone_frozen_for_epoch(tp: TrainParams, epoch: int) -> bool:
    """Whether the backbone is frozen during 0-based ``epoch``."""
    if tp.finetune == "linear_probe":
        return True
    if tp.finetune == "staged":
        return epoch < tp.freeze_epochs
    return False


def phase_of_epoch(tp: TrainParams, epoch: int) -> int:
    """0 for the first (possibly only) optimization phase, 1 after a staged unfreeze."""
    return 1 if tp.finetune == "staged" and epoch >= tp.freeze_epochs else 0


def phase_epochs(tp: TrainParams, phase: int) -> tuple[int, int]:
    """[start, end) epochs of a phase."""
    if tp.finetune != "staged":
        return 0, tp.epochs
    return (0, tp.freeze_epochs) if phase == 0 else (tp.freeze_epochs, tp.epochs)


# --------------------------------------------------------------------------- optimizer


def param_groups(model, tp: TrainParams) -> list[dict[str, Any]]:
    """timm's weight-decay (and layer-decay) groups, with the classifier split off to ``head_lr``.

    Each group's ``lr_scale`` multiplies ``train.lr``; timm's schedulers apply it.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if tp.layer_decay is not None:
        groups = param_groups_layer_decay(model, tp.weight_decay, no_weight_decay_list=no_wd, layer_decay=tp.layer_decay)
    else:
        groups = param_groups_weight_decay(model, tp.weight_decay, no_weight_decay_list=no_wd)
    heads = head_module_names(model)
    head_ids = {id(p) for n, p in model.named_parameters() if is_head_param(n, heads)}
    names = {id(p): n for n, p in model.named_parameters()}
    head_scale = (tp.head_lr / tp.lr) if tp.head_lr is not None else None
    out: list[dict[str, Any]] = []
    for g in groups:
        scale = g.get("lr_scale", 1.0)
        body = [p for p in g["params"] if id(p) not in head_ids]
        head = [p for p in g["params"] if id(p) in head_ids]
        base = {k: v for k, v in g.items() if k != "params"}
        if body:
            out.append({**base, "params": body, "lr_scale": scale, "group": "backbone", "names": [names[id(p)] for p in body]})
        if head:
            hs = head_scale if head_scale is not None else scale
            out.append({**base, "params": head, "lr_scale": hs, "group": "head", "names": [names[id(p)] for p in head]})
    if not out:
        raise StageError("no trainable parameters")
    return out


def build_optimizer(model, tp: TrainParams):
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, tp)
    for g in groups:  # bookkeeping keys are not optimizer hyper-parameters
        g.pop("names", None)
    try:
        opt = create_optimizer_v2(groups, tp.optimizer, lr=tp.lr, weight_decay=tp.weight_decay, momentum=tp.momentum)
    except (ValueError, AssertionError, RuntimeError, KeyError) as exc:
        raise ParamsError(f"train.optimizer: {tp.optimizer!r} cannot be created by timm ({exc})") from None
    return opt  # timm schedulers set each group's lr to value * lr_scale


def build_scheduler(optimizer, tp: TrainParams, num_epochs: int, updates_per_epoch: int):
    """Per-update schedule over ``num_epochs`` with ``train.warmup_epochs`` of warmup (fresh each phase)."""
    from timm.scheduler import create_scheduler_v2

    warmup = min(tp.warmup_epochs, max(num_epochs - 1, 0))
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=tp.scheduler,
            num_epochs=num_epochs,
            warmup_epochs=warmup,
            warmup_lr=tp.lr * 0.01,
            min_lr=tp.min_lr,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError, TypeError) as exc:
        raise ParamsError(f"train.scheduler: {tp.scheduler!r} cannot be created by timm ({exc})") from None
    if scheduler is None:
        raise ParamsError(f"train.scheduler: unknown timm scheduler {tp.scheduler!r}")
    scheduler.step_update(num_updates=0)  # the first update already uses the scheduled, lr_scale'd LR
    return scheduler


# --------------------------------------------------------------------------- pretrained weights
# load_pretrained_path (and the head helpers above) live in cvpipe.torchkit.models: the audit loads the same files.


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_model(tp: TrainParams, num_classes: int):
    """The timm model with its head sized to ``num_classes``, its regularizers and the requested weights."""
    import timm

    from cvpipe.torchkit.models import check_arch, create

    check_arch(tp.arch)
    # passed only when set: not every architecture takes drop_path_rate
    kwargs = {k: v for k, v in (("drop_rate", tp.drop_rate), ("drop_path_rate", tp.drop_path_rate)) if v}

    def build(factory, **extra):
        """*factory* with the regularizers; an architecture that does not take one is a params error."""
        try:
            return factory(**extra, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            if not kwargs:
                raise
            names = " / ".join(f"train.{k}" for k in kwargs)
            raise ParamsError(f"{names}: {tp.arch} does not take {', '.join(kwargs)} ({exc})") from None

    if tp.pretrained_path:
        model = build(create, arch=tp.arch)
        model.cvpipe_pretrained_report = load_pretrained_path(model, tp.pretrained_path)
        return model
    if not tp.pretrained:
        return build(create, arch=tp.arch)
    if not _hub_reachable():
        raise StageError(
            f"train.pretrained: cannot reach the timm/Hugging Face hub to download {tp.arch} weights (offline?); "
            "download them elsewhere and set train.pretrained_path to the .safetensors/.pth file"
        )
    try:
        return build(timm.create_model, model_name=tp.arch, pretrained=True)
    except ParamsError:
        raise
    except Exception as exc:
        raise StageError(
            f"train.pretrained: downloading {tp.arch} weights failed ({type(exc).__name__}: {exc}); "
            "set train.pretrained_path to a local .safetensors/.pth file instead"
        ) from None


# --------------------------------------------------------------------------- losses, mixup, EMA


def make_mixup(tp: TrainParams, num_classes: int):
    if not tp.uses_mixup:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=tp.mixup_alpha, cutmix_alpha=tp.cutmix_alpha, prob=tp.mixup_prob,
        label_smoothing=tp.label_smoothing, num_classes=num_classes,
    )


def loss_class_weights(tp: TrainParams, labels, num_classes: int, device) -> Optional["torch.Tensor"]:  # noqa: F821
    """Inverse-frequency weights for the loss with ``class_balance: loss``; None otherwise."""
    if tp.class_balance != "loss":
        return None
    import torch

    return torch.as_tensor(inverse_frequency(labels, num_classes), dtype=torch.float32, device=device)


def make_criterion(tp: TrainParams, class_weights: Optional["torch.Tensor"] = None):  # noqa: F821
    import torch
    from timm.loss import SoftTargetCrossEntropy

    if tp.uses_mixup:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    return torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=tp.label_smoothing)


def class_counts(labels, num_classes: int):
    import numpy as np

    return np.bincount(np.asarray(labels), minlength=num_classes)


def inverse_frequency(labels, num_classes: int):
    """Per-class weights ``N / (C * count)`` (1.0 for a balanced set; 0 for absent classes)."""
    import numpy as np

    counts = class_counts(labels, num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return w
