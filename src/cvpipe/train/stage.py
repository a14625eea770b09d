"""Train stage: fine-tune (or train from scratch) a timm architecture on the prepared dataset.

Reads ``train.*``, ``wandb.*`` and the prepared dataset in ``paths.prepared``
(including the augmentation pipeline preprocess saved beside it). Writes (rank 0 only)::

    <paths.models>/<arch>/best.pt, last.pt     checkpoints: model, optimizer, scheduler, EMA,
                                               scaler, epoch, RNG states (torch, numpy, python,
                                               loader; one per rank), classes, resolved params,
                                               dataset fingerprint, W&B run id, history
    <paths.metrics>/<arch>/train.json          final training metrics (DVC metrics)
    <paths.plots>/<arch>/history.csv           one row per epoch (DVC plots)

and logs config (resolved params + git commit + dataset hash), per-update loss/LR,
per-epoch metrics, img/s (and GPU memory) and the best model as an artifact to W&B.

A ``last.pt`` written by an unfinished run with the same ``train.*`` params and the
same data is resumed automatically (``train.auto_resume``); ``cvpipe train --resume``
resumes it regardless. Checkpoints are written at epoch ends: a run killed mid-epoch
repeats that epoch from its start, and with ``train.deterministic: true`` ends with
exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import signal
import time
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import info, progress, set_quiet, warn
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.data import augment
from cvpipe.data.prepared import PreparedDataset
from cvpipe.torchkit.models import check_arch, data_config, load_checkpoint, save_checkpoint
from cvpipe.torchkit.loaders import ArrayDataset, BatchNormalizer, collate_uint8, cycle, default_workers, make_loader
from cvpipe.torchkit.runtime import Runtime, autocast, resolve_runtime, seed_everything
from cvpipe.train import checkpoint as ckpt_lib
from cvpipe.train import distributed, finetune
from cvpipe.train.budget import TimeBudget, epoch_estimate, may_grow, planned_warmup

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s", "seconds"]
EMA_COLUMNS = ["ema_val_loss", "ema_val_acc"]
# Fault injection for the kill/resume test: SIGKILL this process after N optimizer steps.
KILL_ENV = "CVPIPE_FAULT_KILL_AFTER_STEPS"


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
    cols = HISTORY_COLUMNS + [c for c in EMA_COLUMNS if rows and c in rows[0]]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in cols})
    storage.write_text(path, buf.getvalue())


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    name = name or params.train.arch
    return {
        "model_dir": storage.join(params.paths.models, name),
        "metrics": storage.join(params.paths.metrics, name, "train.json"),
        "history": storage.join(params.paths.plots, name, "history.csv"),
    }



def batch_loss(model, images, labels, normalize: BatchNormalizer, criterion, mixup, rt: Runtime):
    """Loss of one batch as training computes it: on-device normalization, Mixup/CutMix on whole pairs, autocast."""
    x, y = normalize(images), labels.to(rt.device)
    target = y
    if mixup is not None and len(y) % 2 == 0:
        x, target = mixup(x, y)
    with autocast(rt):
        return criterion(model(x).float(), target)


def measure_step_seconds(model, tp, train_ds, rank_batch: int, workers: int, normalize, criterion, mixup, rt: Runtime,
                         probe_path: Optional[str] = None, steps: int = 6) -> tuple[float, float, float]:
    """(seconds per training step, seconds per image of an eval forward pass, seconds per checkpoint save),
    timed on a throw-away copy.

    Real batches through the real augmentation, normalization, autocast and optimizer, after
    one untimed warm-up step (allocator, oneDNN/cuDNN kernel choice, torch.compile), and one
    real save of the model and optimizer state to *probe_path* (removed after); the model
    being trained, its optimizer and the training RNG streams are not touched.
    """
    import copy

    import torch

    rng = ckpt_lib.rng_state()  # restored after: timing must not shift the run's random streams
    probe = copy.deepcopy(model)
    opt = finetune.build_optimizer(probe, tp)
    loader = make_loader(train_ds, rank_batch, True, workers, tp.seed, rt.device.type == "cuda",
                         drop_last=len(train_ds) >= rank_batch)
    step_model = torch.compile(probe) if tp.compile else probe
    finetune.train_mode(probe)
    times: list[float] = []
    eval_per_image = 0.0
    batches = cycle(loader)
    for i in range(steps + 1):
        t0 = time.perf_counter()
        images, labels = next(batches)
        loss = batch_loss(step_model, images, labels, normalize, criterion, mixup, rt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        if i == steps:
            probe.eval()
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(rt):
                probe(normalize(images))
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            eval_per_image = (time.perf_counter() - t0) / len(labels)
    save_s = 0.0
    if probe_path is not None:
        t0 = time.perf_counter()
        save_checkpoint(probe_path, {"model": probe.state_dict(), "optimizer": opt.state_dict()})
        save_s = time.perf_counter() - t0
        storage.remove(probe_path)
    del probe, opt, step_model, loader
    ckpt_lib.set_rng_state(rng)
    return float(np.median(times)), eval_per_image, save_s


def _eval_sums(model, loader, normalize: BatchNormalizer, rt: Runtime, criterion) -> list[float]:
    """[loss_sum, correct, count] over this rank's shard (reduced over ranks by the caller)."""
    import torch

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    total = 0
    with torch.inference_mode(), autocast(rt):
        for images, labels in loader:
            x = normalize(images)
            y = labels.to(rt.device, non_blocking=True)
            logits = model(x).float()
            loss_sum += criterion(logits, y).double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            total += len(y)
    return [float(loss_sum), float(correct), float(total)]


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def run(params: Params, resume: bool = False) -> dict[str, Any]:
    """Train; ``resume=True`` continues ``last.pt`` (``cvpipe train --resume``)."""
    tp = params.train
    check_arch(tp.arch)
    rt = resolve_runtime(tp.device, tp.amp, tp.channels_last)
    dist = distributed.init(rt.device.type)
    if dist.enabled and rt.device.type == "cuda":
        import torch

        rt.device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(rt.device)
    if not dist.is_main:
        set_quiet(True)
    try:
        return _run(params, rt, dist, resume)
    finally:
        distributed.shutdown(dist)


def _run(params: Params, rt: Runtime, dist: distributed.Dist, resume: bool) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler, Subset, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    tp = params.train
    if tp.batch_size % dist.world_size:
        raise ParamsError(f"train.batch_size: {tp.batch_size} must be divisible by the {dist.world_size} processes")
    rank_batch = tp.batch_size // dist.world_size
    ds = PreparedDataset(params.paths.prepared)
    train_split = ds.split("train")
    val_split = ds.split("val") if ds.has_split("val") else None
    if len(train_split) == 0:
        raise StageError("the train split is empty")
    if tp.uses_mixup and rank_batch % 2:
        raise ParamsError(f"train.batch_size: mixup/cutmix needs an even batch per process (got {rank_batch})")
    out = output_paths(params)
    seed_everything(tp.seed, tp.deterministic)
    fingerprint = ckpt_lib.dataset_fingerprint(ds.root)
    resolved = params.resolved()
    identity = ckpt_lib.identity(resolved["train"], fingerprint)

    # ---- resume decision (before anything is built, so the same code path restores it)
    last_path = storage.join(out["model_dir"], "last.pt")
    state: Optional[dict[str, Any]] = None
    if (resume or tp.auto_resume) and storage.exists(last_path):
        try:
            state = load_checkpoint(last_path)
        except StageError as exc:
            if resume:
                raise
            warn(f"ignoring unreadable {last_path}: {exc}")
    do_resume, why = ckpt_lib.resume_decision(state, identity, tp.epochs, forced=resume)
    if resume and not do_resume:
        raise StageError(f"cannot resume from {last_path}: {why}")
    if not do_resume:
        state = None
    elif state is not None:
        if list(state["classes"]) != ds.classes or state["arch"] != tp.arch:
            raise StageError(f"cannot resume from {last_path}: it was trained for {state['arch']} on classes {state['classes']}")
        info(f"resuming {last_path} after epoch {state['epoch']} ({why})")
    start_epoch = int(state["epoch"]) if state else 0

    pipeline = augment.from_dict(json.loads((ds.root / "augment.json").read_text()))
    workers = tp.workers if tp.workers is not None else default_workers(rt.device.type)
    pin = rt.device.type == "cuda"

    # ---- data: one sampler per strategy; its generator state goes into the checkpoint
    train_ds = ArrayDataset(train_split, pipeline)
    gen = torch.Generator()
    gen.manual_seed(tp.seed + dist.rank)
    # mixup needs full batches; BatchNorm cannot train on a final batch of one sample
    per_rank = len(train_split) // dist.world_size if tp.class_balance == "sampler" else -(-len(train_split) // dist.world_size)
    drop_last = (tp.uses_mixup and len(train_split) >= tp.batch_size) or (per_rank > rank_batch and per_rank % rank_batch == 1)
    if tp.class_balance == "sampler":
        w = finetune.inverse_frequency(train_split.labels, ds.num_classes)[np.asarray(train_split.labels)]
        sampler: Any = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(train_split) // dist.world_size, replacement=True, generator=gen)
    elif dist.enabled:
        sampler = DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=tp.seed, drop_last=drop_last)
    else:
        sampler = RandomSampler(train_ds, generator=gen)
    train_loader = DataLoader(
        train_ds, batch_size=rank_batch, sampler=sampler, num_workers=workers, collate_fn=collate_uint8,
        pin_memory=pin, drop_last=drop_last, persistent_workers=workers > 0, generator=gen,
    )
    val_loader = None
    if val_split is not None and len(val_split):
        shard = Subset(ArrayDataset(val_split), list(range(dist.rank, len(val_split), dist.world_size)))
        val_loader = make_loader(shard, max(rank_batch, 128), False, workers, tp.seed, pin)

    # ---- model, strategy, EMA
    model = finetune.create_model(tp, ds.num_classes)
    norm_cfg = data_config(model)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["model"])
    torch.manual_seed(tp.seed + dist.rank)  # dropout/drop-path streams differ per rank
    normalize = BatchNormalizer(norm_cfg["mean"], norm_cfg["std"], rt)
    ema = None
    if tp.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=tp.ema_decay, use_warmup=True)
        if state and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])

    criterion = finetune.make_criterion(tp, finetune.loss_class_weights(tp, train_split.labels, ds.num_classes, rt.device))
    eval_criterion = torch.nn.CrossEntropyLoss()
    mixup = finetune.make_mixup(tp, ds.num_classes)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.use_scaler else None
    steps_per_epoch = len(train_loader)
    updates_per_epoch = math.ceil(steps_per_epoch / tp.accum_steps)

    # ---- time budget: size epochs + warmup from measured step times, before the schedule exists
    budget: Optional[TimeBudget] = None
    budget_info: dict[str, Any] = {}
    if tp.time_budget_minutes is not None:
        saved = (state or {}).get("budget") or {}
        budget = TimeBudget(tp.time_budget_minutes, tp.epochs, spent_before_s=float(saved.get("spent_s", 0.0)))
        if saved:
            planned = int(saved["planned_epochs"])
            budget.replans = 1  # a resumed plan only shrinks
            budget_info = dict(saved.get("info", {}))
        else:
            probe_path = storage.join(out["model_dir"], ".budget-probe.pt") if dist.is_main else None
            step_s, eval_s, save_s = measure_step_seconds(model, tp, train_ds, rank_batch, workers, normalize, criterion,
                                                          mixup, rt, probe_path)
            n_val = len(val_loader.dataset) if val_loader is not None else 0
            compute = step_s * steps_per_epoch + eval_s * n_val * (2 if ema is not None else 1)
            # one plan on every rank: compute averaged over ranks, plus rank 0's checkpoint save
            compute, save_s = distributed.all_sum([compute / dist.world_size, save_s], dist)
            est = compute + save_s  # one serialization per epoch: best.pt and last.pt share it (save_epoch)
            planned = budget.fit(0, est)
            if tp.finetune == "staged":
                planned = min(max(planned, tp.freeze_epochs + 1), tp.epochs)
            budget_info = {"minutes": tp.time_budget_minutes, "estimated_epoch_s": round(est, 3),
                           "step_s": round(step_s, 5), "checkpoint_save_s": round(save_s, 3), "initial_plan": planned}
            info(f"time budget {tp.time_budget_minutes:.3g} min: ~{est:.2f}s per epoch measured -> {planned} epochs"
                 f"{' (train.epochs caps it)' if planned == tp.epochs else ''}")
        tp = tp.model_copy(update={"epochs": planned, "warmup_epochs": planned_warmup(planned, params.train.warmup_epochs)})

    def build_phase(epoch: int):
        """Freeze/unfreeze for ``epoch``, then a fresh optimizer, scheduler and (DDP/compile) wrapper."""
        finetune.set_backbone_frozen(model, finetune.backbone_frozen_for_epoch(tp, epoch))
        phase = finetune.phase_of_epoch(tp, epoch)
        p0, p1 = finetune.phase_epochs(tp, phase)
        opt = finetune.build_optimizer(model, tp)
        sched = finetune.build_scheduler(opt, tp, p1 - p0, updates_per_epoch)
        wrapped = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if tp.compile:
            wrapped = torch.compile(wrapped)
        return phase, p0, opt, sched, wrapped

    phase, phase_start, optimizer, scheduler, train_model = build_phase(start_epoch)
    history: list[dict[str, Any]] = []
    best: Optional[dict[str, Any]] = None
    bad_epochs = 0
    phase_updates = 0
    total_updates = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history", []))
        best = state.get("best")
        bad_epochs = int(state.get("bad_epochs", 0))
        phase_updates = int(state.get("phase_updates", 0))
        total_updates = int(state.get("num_updates", 0))
        rngs = state["rng"]
        if isinstance(rngs, list):
            if len(rngs) != dist.world_size:
                warn(f"{last_path} was written by {len(rngs)} processes, now {dist.world_size}: RNG streams restart")
            else:
                ckpt_lib.set_rng_state(rngs[dist.rank], gen)

    monitor = tp.monitor
    maximize = monitor.endswith("acc")

    # ---- tracking (rank 0)
    config = {
        **resolved,
        "git_commit": tracking.git_commit(),
        "dataset": {"root": str(params.paths.prepared), "hash": fingerprint, "classes": ds.classes, **ds.meta},
        "runtime": {
            "device": str(rt.device), "amp": rt.amp_name, "channels_last": rt.channels_last, "workers": workers,
            "world_size": dist.world_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "arch": tp.arch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 4),
        "pretrained_load": {k: v if k != "loaded" else len(v) for k, v in getattr(model, "cvpipe_pretrained_report", {}).items()},
    }
    tracker = tracking.Tracker(None)
    if dist.is_main:
        resume_id = state.get("wandb_run_id") if state else None
        for attempt in range(4):
            tracker = tracking.start(
                params, job_type="train", name=f"train-{tp.arch}", config=config,
                tags=[tp.arch, tp.finetune, "pretrained" if (tp.pretrained or tp.pretrained_path) else "scratch"],
                group=tracking.group_name(params, fingerprint),
                resume_id=resume_id,
            )
            # a killed run's W&B service can hold its run id for a few seconds: wait and retry
            if tracker.enabled or not resume_id or tracking.resolve_mode(params) == "disabled":
                break
            time.sleep(2.0 * (attempt + 1))
        tracker.define_metric("epoch")
        tracker.define_metric("step/update")
        for m in ("train/*", "val/*", "ema/*", "perf/*"):
            tracker.define_metric(m, step_metric="epoch")
        tracker.define_metric("step/*", step_metric="step/update")

    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    steps_here = 0

    def checkpoint_state(epoch: int, rngs: list, finished: bool) -> dict[str, Any]:
        return {
            "arch": tp.arch,
            "classes": ds.classes,
            "image_size": ds.image_size,
            "normalize": norm_cfg,
            "resize_mode": ds.meta.get("resize_mode"),
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch,
            "phase": phase,
            "phase_updates": phase_updates,
            "num_updates": total_updates,
            "finished": finished,
            "metrics": history[-1] if history else {},
            "history": history,
            "best": best,
            "bad_epochs": bad_epochs,
            "params": resolved,
            "identity": identity,
            "dataset_hash": fingerprint,
            "world_size": dist.world_size,
            "wandb_run_id": tracker.id if dist.is_main else None,
            "rng": rngs,
            "budget": {"planned_epochs": tp.epochs, "spent_s": budget.spent_s(), "info": budget_info} if budget else None,
        }

    best_path = storage.join(out["model_dir"], "best.pt")

    def save_epoch(st: dict[str, Any], improved: bool) -> None:
        """best.pt first when the epoch improved, so last.pt is never newer than best.pt; the second
        file is then the same bytes (a hard link locally), not a second serialization and write."""
        if improved:
            save_checkpoint(best_path, st)
            storage.copy_file(best_path, last_path)
        else:
            save_checkpoint(last_path, st)

    started = time.perf_counter()
    stopped_early = False
    try:
        with progress("img") as bar:
            epoch_started = time.perf_counter()
            epoch_walls: list[float] = []
            for epoch in itertools.count(start_epoch):
                if epoch >= tp.epochs:
                    break
                if finetune.phase_of_epoch(tp, epoch) != phase:
                    info(f"epoch {epoch + 1}: unfreezing the backbone (fresh optimizer and warmup)")
                    phase, phase_start, optimizer, scheduler, train_model = build_phase(epoch)
                    phase_updates = 0
                pipeline.set_random_seed(tp.seed + 7919 * (epoch + 1) + dist.rank)
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(epoch)
                finetune.train_mode(model)
                task = bar.add_task(f"epoch {epoch + 1}/{tp.epochs}", total=steps_per_epoch * rank_batch * dist.world_size)
                t0 = time.perf_counter()
                seen = 0
                loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
                correct = torch.zeros((), dtype=torch.int64, device=rt.device)
                optimizer.zero_grad(set_to_none=True)
                for step, (images, labels) in enumerate(train_loader):
                    x = normalize(images)
                    y = labels.to(rt.device, non_blocking=True)
                    target = y
                    if mixup is not None:
                        x, target = mixup(x, y)
                    boundary = (step + 1) % tp.accum_steps == 0 or step + 1 == steps_per_epoch
                    sync = contextlib.nullcontext() if (boundary or not dist.enabled) else _unwrap_ddp(train_model).no_sync()
                    with sync:
                        with autocast(rt):
                            logits = train_model(x)
                            loss = criterion(logits.float(), target)
                        if not torch.isfinite(loss):
                            raise StageError(f"loss became {float(loss)} at epoch {epoch + 1}: lower train.lr (now {tp.lr})")
                        scaled = loss / tp.accum_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    if boundary:
                        if scaler is not None:
                            scaler.unscale_(optimizer)
                        if tp.clip_grad is not None:
                            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tp.clip_grad)
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        phase_updates += 1
                        total_updates += 1
                        scheduler.step_update(num_updates=phase_updates)
                        if ema is not None:
                            ema.update(model, step=total_updates)
                        if dist.is_main:
                            tracker.log({"step/update": total_updates, "step/loss": float(loss.detach()), "step/lr": _max_lr(optimizer)})
                    n = len(y)
                    seen += n
                    loss_sum += loss.detach().double() * n
                    correct += (logits.detach().argmax(1) == y).sum()
                    bar.advance(task, n * dist.world_size)
                    steps_here += 1
                    if kill_after and steps_here >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                train_seconds = time.perf_counter() - t0
                scheduler.step(epoch + 1 - phase_start)
                t_loss, t_correct, t_seen = distributed.all_sum([float(loss_sum), float(correct), float(seen)], dist)
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": _max_lr(optimizer),
                    "train_loss": round(t_loss / t_seen, 6),
                    "train_acc": round(t_correct / t_seen, 6),
                    "img_per_s": round(t_seen / train_seconds, 2),
                }
                if val_loader is not None:
                    v_loss, v_correct, v_n = distributed.all_sum(_eval_sums(model, val_loader, normalize, rt, eval_criterion), dist)
                    row["val_loss"], row["val_acc"] = round(v_loss / v_n, 6), round(v_correct / v_n, 6)
                    if ema is not None:
                        e_loss, e_correct, e_n = distributed.all_sum(_eval_sums(ema.module, val_loader, normalize, rt, eval_criterion), dist)
                        row["ema_val_loss"], row["ema_val_acc"] = round(e_loss / e_n, 6), round(e_correct / e_n, 6)
                else:
                    row["val_loss"], row["val_acc"] = row["train_loss"], row["train_acc"]
                    if ema is not None:
                        row["ema_val_loss"], row["ema_val_acc"] = row["val_loss"], row["val_acc"]
                row["seconds"] = round(time.perf_counter() - t0, 3)
                history.append(row)
                bar.update(task, description=f"epoch {epoch + 1}/{tp.epochs} val_acc={row['val_acc']:.3f}")

                value = row[monitor]
                if best is None:
                    improved = True
                else:
                    delta = (value - best[monitor]) if maximize else (best[monitor] - value)
                    improved = delta > tp.early_stop_min_delta or (delta == 0 and row["val_loss"] < best["val_loss"])
                if improved:
                    best, bad_epochs = dict(row), 0
                else:
                    bad_epochs += 1
                stopped_early = tp.early_stop_patience > 0 and bad_epochs >= tp.early_stop_patience
                finished = stopped_early or epoch + 1 == tp.epochs
                rngs = distributed.gather_object(ckpt_lib.rng_state(gen), dist)
                if dist.is_main:
                    log = {"epoch": epoch + 1, "train/loss": row["train_loss"], "train/acc": row["train_acc"],
                           "val/loss": row["val_loss"], "val/acc": row["val_acc"], "train/lr": row["lr"],
                           "perf/img_per_s": row["img_per_s"], "perf/epoch_seconds": row["seconds"]}
                    if ema is not None:
                        log.update({"ema/val_loss": row["ema_val_loss"], "ema/val_acc": row["ema_val_acc"]})
                    if rt.device.type == "cuda":
                        log["perf/gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 3)
                    tracker.log(log)
                    save_epoch(checkpoint_state(epoch + 1, rngs, finished), improved)
                    _write_history(out["history"], history)
                distributed.barrier(dist)
                now = time.perf_counter()
                epoch_walls.append(now - epoch_started)
                epoch_started = now
                if budget is not None and not finished and not stopped_early:
                    wall = distributed.all_sum([epoch_estimate(epoch_walls)], dist)[0] / dist.world_size
                    p0, p1 = finetune.phase_epochs(tp, phase)
                    grow = may_grow(epoch + 1 - p0, p1 - p0, tp.warmup_epochs)
                    new_plan = budget.replan(tp.epochs, epoch + 1, wall, may_grow=grow)
                    if tp.finetune == "staged" and epoch < tp.freeze_epochs:
                        new_plan = max(new_plan, tp.freeze_epochs + 1)
                    if new_plan != tp.epochs:
                        info(f"time budget: {wall:.2f}s per epoch measured, {tp.epochs} -> {new_plan} epochs")
                        tp = tp.model_copy(update={"epochs": new_plan, "warmup_epochs": planned_warmup(new_plan, params.train.warmup_epochs)})
                        if new_plan > epoch + 1:  # the same phase, re-timed: its schedule continues where it is
                            p0, p1 = finetune.phase_epochs(tp, phase)
                            scheduler = finetune.build_scheduler(optimizer, tp, p1 - p0, updates_per_epoch)
                            scheduler.step_update(num_updates=phase_updates)
                        elif dist.is_main:  # the deadline is here: the last checkpoint becomes the finished one
                            finished = True
                            save_epoch(checkpoint_state(epoch + 1, rngs, True), improved)
                            warn(f"time budget reached after epoch {epoch + 1}: the cosine schedule did not complete")
                if stopped_early:
                    info(f"early stop after epoch {epoch + 1}: {monitor} did not improve for {bad_epochs} epochs")
                    break
    except BaseException:
        tracker.finish(exit_code=1)
        raise

    assert best is not None
    elapsed = time.perf_counter() - started
    summary = {
        "arch": tp.arch,
        "finetune": tp.finetune,
        "epochs": tp.epochs,
        "epochs_run": history[-1]["epoch"],
        "stopped_early": stopped_early,
        "monitor": monitor,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "final_train_loss": history[-1]["train_loss"],
        "final_val_acc": history[-1]["val_acc"],
        "final_val_loss": history[-1]["val_loss"],
        "img_per_s": round(float(np.mean([h["img_per_s"] for h in history])), 2),
        "seconds": round(elapsed, 2),
        "device": str(rt.device),
        "world_size": dist.world_size,
        "amp": rt.amp_name,
        "params_m": config["params_m"],
        "dataset_hash": fingerprint,
        "wandb_run_id": tracker.id,
    }
    if budget is not None:
        summary["time_budget"] = {**budget_info, "planned_epochs": tp.epochs, "warmup_epochs": tp.warmup_epochs,
                                  "spent_s": round(budget.spent_s(), 2), "budget_s": round(budget.minutes * 60, 2)}
    if ema is not None:
        summary["best_ema_val_acc"] = max(h["ema_val_acc"] for h in history)
        summary["final_ema_val_acc"] = history[-1]["ema_val_acc"]
    if dist.is_main:
        storage.write_json(out["metrics"], summary)
        tracker.summary({k: v for k, v in summary.items() if k != "wandb_run_id"})
        tracker.log_artifact(
            storage.join(out["model_dir"], "best.pt"), name=f"model-{tp.arch}", type="model",
            metadata={monitor: best[monitor], "epoch": best["epoch"], "dataset_hash": fingerprint}, aliases=["best", "latest"],
        )
        tracker.finish()
    info(
        f"trained {tp.arch} ({tp.finetune}) for {history[-1]['epoch']} epochs in {elapsed:.1f}s on {rt.device} ({rt.amp_name}"
        f"{f', {dist.world_size} processes' if dist.enabled else ''}): best {monitor} {best[monitor]:.4f} at epoch {best['epoch']}"
    )
    return summary


def _max_lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _unwrap_ddp(model):
    return getattr(model, "_orig_mod", model)
