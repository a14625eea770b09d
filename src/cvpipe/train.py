"""Train stage: fine-tune (or train from scratch) a timm architecture on the prepared dataset.

Reads ``train.*``, ``wandb.*`` and the prepared dataset in ``paths.prepared``
(including the augmentation pipeline preprocess saved beside it). Writes::

    <paths.models>/<arch>/best.pt, last.pt     checkpoints (model, optimizer, scheduler,
                                               epoch, RNG, classes, resolved params, W&B id)
    <paths.metrics>/<arch>/train.json          final training metrics (DVC metrics)
    <paths.plots>/<arch>/history.csv           one row per epoch (DVC plots)

and logs config, per-step loss/LR and per-epoch metrics to W&B.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe import augment, storage, tracking
from cvpipe.config import Params
from cvpipe.console import info, progress
from cvpipe.dataset import PreparedDataset, Split
from cvpipe.errors import StageError
from cvpipe.models import check_arch, create, data_config, save_checkpoint
from cvpipe.runtime import Runtime, resolve_runtime, seed_everything

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s", "seconds"]


class ArrayDataset:
    """Samples of a memory-mapped split, augmented per sample with albumentations (uint8 HWC)."""

    def __init__(self, split: Split, pipeline=None):
        self.images = split.images
        self.labels = split.labels
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[i])
        if self.pipeline is not None:
            img = self.pipeline(image=img)["image"]
        return img, int(self.labels[i])


def collate_uint8(batch):
    """Stack uint8 HWC images into one tensor; conversion and normalization happen on the device."""
    import torch

    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels


class BatchNormalizer:
    """uint8 (B,H,W,3) -> normalized float (B,3,H,W) on the device, channels_last when asked."""

    def __init__(self, mean, std, rt: Runtime):
        import torch

        self.rt = rt
        self.mean = torch.tensor(mean, device=rt.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=rt.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images):
        import torch

        x = images.to(self.rt.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def default_workers(device_type: str) -> int:
    # On a CPU the model's own threads use every core; extra loader processes
    # would only steal them (augmenting a uint8 array costs far less than a step).
    if device_type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))


def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int, pin: bool, drop_last: bool = False):
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_uint8,
        pin_memory=pin,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=g,
    )


def evaluate_loader(model, loader, normalize: BatchNormalizer, rt: Runtime, criterion=None) -> dict[str, Any]:
    """Logits-free pass: mean loss, accuracy, and predictions with probabilities."""
    import torch

    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    probs, targets = [], []
    with torch.inference_mode(), torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
        for images, labels in loader:
            x = normalize(images)
            y = labels.to(rt.device)
            logits = model(x).float()
            if criterion is not None:
                loss_sum += float(criterion(logits, y)) * len(y)
            p = logits.softmax(dim=1)
            correct += int((p.argmax(1) == y).sum())
            total += len(y)
            probs.append(p.cpu())
            targets.append(labels)
    return {
        "loss": loss_sum / max(total, 1),
        "acc": correct / max(total, 1),
        "probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0)),
        "targets": torch.cat(targets).numpy() if targets else np.zeros((0,), dtype=np.int64),
    }


def _write_history(path: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in HISTORY_COLUMNS})
    storage.write_text(path, buf.getvalue())


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    name = name or params.train.arch
    return {
        "model_dir": storage.join(params.paths.models, name),
        "metrics": storage.join(params.paths.metrics, name, "train.json"),
        "history": storage.join(params.paths.plots, name, "history.csv"),
    }


def run(params: Params) -> dict[str, Any]:
    import torch

    tp = params.train
    check_arch(tp.arch)
    if tp.pretrained or tp.pretrained_path:
        raise StageError("pretrained weights are not supported by this version yet; set train.pretrained: false")
    rt = resolve_runtime(tp.device, tp.amp, tp.channels_last)
    ds = PreparedDataset(params.paths.prepared)
    train_split = ds.split("train")
    val_split = ds.split("val") if ds.has_split("val") else None
    if len(train_split) == 0:
        raise StageError("the train split is empty")
    out = output_paths(params)
    seed_everything(tp.seed, tp.deterministic)

    pipeline = augment.from_dict(__import__("json").loads((ds.root / "augment.json").read_text()))
    pipeline.set_random_seed(tp.seed)
    workers = tp.workers if tp.workers is not None else default_workers(rt.device.type)
    pin = rt.device.type == "cuda"
    train_loader = make_loader(ArrayDataset(train_split, pipeline), tp.batch_size, True, workers, tp.seed, pin)
    val_loader = (
        make_loader(ArrayDataset(val_split), max(tp.batch_size, 128), False, workers, tp.seed, pin) if val_split is not None and len(val_split) else None
    )

    model = create(tp.arch, num_classes=ds.num_classes)
    norm_cfg = data_config(model)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    normalize = BatchNormalizer(norm_cfg["mean"], norm_cfg["std"], rt)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, tp.optimizer, lr=tp.lr, weight_decay=tp.weight_decay, momentum=tp.momentum)
    updates_per_epoch = len(train_loader)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=tp.scheduler,
        num_epochs=tp.epochs,
        warmup_epochs=tp.warmup_epochs,
        warmup_lr=tp.lr * 0.01,
        min_lr=tp.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    eval_criterion = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(rt.device.type) if rt.use_scaler else None

    resolved = params.resolved()
    config = {
        **resolved,
        "git_commit": tracking.git_commit(),
        "dataset": {"root": str(params.paths.prepared), "classes": ds.classes, **ds.meta},
        "runtime": {"device": str(rt.device), "amp": rt.amp_name, "workers": workers, "torch": torch.__version__},
        "arch": tp.arch,
    }
    tracker = tracking.start(params, job_type="train", name=f"train-{tp.arch}", config=config, tags=[tp.arch])
    tracker.define_metric("epoch")
    for m in ("train/*", "val/*", "perf/*"):
        tracker.define_metric(m, step_metric="epoch")

    history: list[dict[str, Any]] = []
    best: Optional[dict[str, Any]] = None
    num_updates = 0
    started = time.perf_counter()

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "arch": tp.arch,
            "classes": ds.classes,
            "image_size": ds.image_size,
            "normalize": norm_cfg,
            "resize_mode": ds.meta.get("resize_mode"),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch,
            "num_updates": num_updates,
            "metrics": metrics,
            "params": resolved,
            "wandb_run_id": tracker.id,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist()},
        }

    try:
        with progress("img") as bar:
            for epoch in range(tp.epochs):
                model.train()
                task = bar.add_task(f"epoch {epoch + 1}/{tp.epochs}", total=len(train_split))
                t0 = time.perf_counter()
                seen, correct, loss_sum = 0, 0, 0.0
                for images, labels in train_loader:
                    x = normalize(images)
                    y = labels.to(rt.device, non_blocking=True)
                    with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
                        logits = model(x)
                        loss = criterion(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise StageError(f"loss became {float(loss)} at epoch {epoch + 1}: lower train.lr (now {tp.lr})")
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    num_updates += 1
                    scheduler.step_update(num_updates=num_updates)
                    n = len(y)
                    seen += n
                    loss_sum += float(loss.detach()) * n
                    correct += int((logits.detach().argmax(1) == y).sum())
                    bar.advance(task, n)
                    if num_updates % 10 == 0:
                        tracker.log({"step/loss": float(loss.detach()), "step/lr": optimizer.param_groups[0]["lr"]}, step=None)
                train_seconds = time.perf_counter() - t0
                scheduler.step(epoch + 1)
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": round(loss_sum / seen, 6),
                    "train_acc": round(correct / seen, 6),
                    "img_per_s": round(seen / train_seconds, 2),
                }
                if val_loader is not None:
                    v = evaluate_loader(model, val_loader, normalize, rt, eval_criterion)
                    row["val_loss"], row["val_acc"] = round(v["loss"], 6), round(v["acc"], 6)
                else:
                    row["val_loss"], row["val_acc"] = row["train_loss"], row["train_acc"]
                row["seconds"] = round(time.perf_counter() - t0, 3)
                history.append(row)
                bar.update(task, description=f"epoch {epoch + 1}/{tp.epochs} val_acc={row['val_acc']:.3f}")
                tracker.log(
                    {
                        "epoch": epoch + 1,
                        "train/loss": row["train_loss"],
                        "train/acc": row["train_acc"],
                        "val/loss": row["val_loss"],
                        "val/acc": row["val_acc"],
                        "train/lr": row["lr"],
                        "perf/img_per_s": row["img_per_s"],
                    }
                )
                improved = best is None or (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])
                if improved:
                    best = dict(row)
                    save_checkpoint(storage.join(out["model_dir"], "best.pt"), checkpoint(epoch + 1, row))
                save_checkpoint(storage.join(out["model_dir"], "last.pt"), checkpoint(epoch + 1, row))
                _write_history(out["history"], history)
    except BaseException:
        tracker.finish(exit_code=1)
        raise

    assert best is not None
    elapsed = time.perf_counter() - started
    summary = {
        "arch": tp.arch,
        "epochs": tp.epochs,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "final_train_loss": history[-1]["train_loss"],
        "final_val_acc": history[-1]["val_acc"],
        "img_per_s": round(float(np.mean([h["img_per_s"] for h in history])), 2),
        "seconds": round(elapsed, 2),
        "device": str(rt.device),
        "amp": rt.amp_name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 4),
        "wandb_run_id": tracker.id,
    }
    storage.write_json(out["metrics"], summary)
    tracker.summary({k: v for k, v in summary.items() if k != "wandb_run_id"})
    tracker.log_artifact(
        storage.join(out["model_dir"], "best.pt"), name=f"model-{tp.arch}", type="model",
        metadata={"val_acc": best["val_acc"], "epoch": best["epoch"]}, aliases=["best", "latest"],
    )
    tracker.finish()
    info(
        f"trained {tp.arch} for {tp.epochs} epochs in {elapsed:.1f}s on {rt.device} ({rt.amp_name}): "
        f"best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}"
    )
    return summary
