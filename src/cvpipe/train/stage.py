"""Train stage: fine-tune (or train from scratch) a timm architecture on the prepared dataset.

Reads ``train.*``, ``wandb.*`` and the prepared dataset in ``paths.prepared``
(including the augmentation pipeline preprocess saved beside it). Writes (rank 0 only)::

    <paths.models>/<run>/best.pt, last.pt      checkpoints: model, optimizer, scheduler, EMA,
                                               scaler, epoch, RNG states (torch, numpy, python,
                                               loader; one per rank), classes, resolved params,
                                               dataset fingerprint, W&B run id, history
    <paths.metrics>/<run>/train.json           headline: epochs, val_acc, throughput_img_s, seconds (DVC metrics)
    <paths.reports>/<run>/train.json           the full summary: plan, best and final epoch, runtime, ids (git)
    <paths.plots>/<run>/history.csv            one row per epoch (DVC plots)

where ``<run>`` is ``params.run_name``, ``<arch>/seed<seed>`` (one cell of the bake-off: train.arch x train.seed),
and logs config (resolved params + git commit + dataset hash), per-update loss/LR,
per-epoch metrics, img/s (and GPU memory) to W&B, records using the ``dataset`` artifact and logs
best.pt + last.pt as the ``checkpoint-<arch>-seed<seed>`` artifact (evaluate logs "the model").

A ``last.pt`` written by an unfinished run with the same ``train.*`` params and the
same data is resumed automatically (``train.auto_resume``); ``cvpipe train --resume``
resumes it regardless. Checkpoints are written at epoch ends: a run killed mid-epoch
repeats that epoch from its start, and with ``train.deterministic: true`` ends with
exactly the metrics of an uninterrupted run.

Where each part lives: setup (resume decision, data, model, phases, the loop's state) in
:mod:`~cvpipe.train.build`; one epoch and its validation in :mod:`~cvpipe.train.epoch` (the
forward/loss step and the evaluation pass they share with the LR finder, the budget probe and
evaluate are :mod:`cvpipe.torchkit.step` and :mod:`cvpipe.torchkit.evaluation`); checkpoints in
:class:`~cvpipe.train.checkpoint.Checkpointer`; early stopping in
:class:`~cvpipe.train.early_stop.EarlyStopping`; the time budget's plan and re-plans in
:mod:`~cvpipe.train.budget_run`. This module runs the epochs (:func:`_run_epochs`) and writes
the summary (:func:`_summary`, :func:`_publish`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import EpochProgress, info, set_quiet, warn
from cvpipe.data import augment
from cvpipe.data.prepared import ARTIFACT as DATASET_ARTIFACT
from cvpipe.data.prepared import PreparedDataset, lineage_files
from cvpipe.torchkit.loaders import default_workers
from cvpipe.torchkit.models import check_arch, checkpoint_files
from cvpipe.torchkit.runtime import Runtime, resolve_runtime, seed_everything
from cvpipe.train import build, distributed, finetune
from cvpipe.train import checkpoint as ckpt_lib
from cvpipe.train.budget_run import plan_budget, replan_after_epoch
from cvpipe.train.epoch import train_epoch, validate

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s", "seconds"]
EMA_COLUMNS = ["ema_val_loss", "ema_val_acc"]
# Fault injection for the kill/resume tests: SIGKILL this process after N batches of a run that
# started fresh (a resumed run never kills itself, so the group torchrun restarts runs to the end);
# under torchrun only the rank named by KILL_RANK_ENV (default: every rank).
KILL_ENV = "CVPIPE_FAULT_KILL_AFTER_STEPS"
KILL_RANK_ENV = "CVPIPE_FAULT_KILL_RANK"


def fault_kill_after(rank: int, resumed: bool) -> int:
    """Batches after which this process kills itself (0 = never), from the fault-injection env vars.

    "Fresh run only" rather than torchrun's TORCHELASTIC_RESTART_COUNT: a node restarted because
    another node failed keeps restart count 0, and ranks may move between nodes in the new round.
    """
    only_rank = os.environ.get(KILL_RANK_ENV, "")
    if resumed or (only_rank and int(only_rank) != rank):
        return 0
    return int(os.environ.get(KILL_ENV, "0") or 0)


def _write_history(path: str, rows: list[dict[str, Any]]) -> None:
    cols = HISTORY_COLUMNS + [c for c in EMA_COLUMNS if rows and c in rows[0]]
    storage.write_csv(path, cols, ([r[k] for k in cols] for r in rows))


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    """Where train writes one run's files: under ``<paths.X>/<name>``, *name* the run folder
    (default ``params.run_name``, ``<arch>/seed<seed>``, convention of the bake-off's cells)."""
    name = name or params.run_name
    return {
        "model_dir": storage.join(params.paths.models, name),
        "metrics": storage.join(params.paths.metrics, name, "train.json"),
        "report": storage.join(params.paths.reports, name, "train.json"),
        "history": storage.join(params.paths.plots, name, "history.csv"),
    }


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
    """Set the run up (data, model, time budget, optimizer, resumed state, W&B), train it, summarize it."""
    tp = params.train
    rank_batch = build.rank_batch_size(tp, dist)
    ds = PreparedDataset(params.paths.prepared)
    train_split = ds.split("train")
    val_split = ds.split("val") if ds.has_split("val") else None
    build.check_splits(tp, train_split, rank_batch)
    out = output_paths(params)
    seed_everything(tp.seed, tp.deterministic)
    fingerprint = ckpt_lib.dataset_fingerprint(ds.root)
    resolved = params.resolved()
    identity = ckpt_lib.identity(resolved["train"], fingerprint)
    # the resume decision comes before anything is built, so the same code path restores it
    last_path = storage.join(out["model_dir"], "last.pt")
    state = build.load_resume_state(tp, ds, last_path, identity, resume)
    start_epoch = int(state["epoch"]) if state else 0

    pipeline = augment.from_dict(json.loads((ds.root / "augment.json").read_text()))
    workers = tp.workers if tp.workers is not None else default_workers(rt.device.type)
    data = build.build_data(tp, ds, train_split, val_split, pipeline, dist, rt, rank_batch, workers)
    net = build.build_net(tp, ds, train_split, rt, dist, state)
    updates_per_epoch = math.ceil(len(data.train_loader) / tp.accum_steps)
    # the time budget sizes epochs + warmup from measured step times, before the schedule exists
    probe_path = storage.join(out["model_dir"], ".budget-probe.pt") if dist.is_main else None
    budget, tp = plan_budget(tp, params.train.warmup_epochs, state, data, net, rt, dist, probe_path)
    phase = build.build_phase(net.model, tp, start_epoch, updates_per_epoch, dist, rt)
    run = build.start_run_state(tp, phase, net, data, dist, state, last_path)

    config = _tracking_config(params, resolved, fingerprint, data, net, rt, dist)
    tracker = _start_tracker(params, tp, config, fingerprint, state, dist)
    tracker.use_artifact(lineage_files(ds.root), name=DATASET_ARTIFACT, type="dataset")  # W&B lineage: data -> train
    ctx = build.Context(rt, dist, data, net, out, updates_per_epoch, start_epoch, fingerprint, tracker, budget,
                        kill_after=fault_kill_after(dist.rank, resumed=state is not None))
    checkpointer = ckpt_lib.Checkpointer(ctx, resolved, identity)
    started = time.perf_counter()
    try:
        stopped_early = _run_epochs(ctx, run, checkpointer)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    assert run.stopper.best is not None
    elapsed = time.perf_counter() - started
    summary = _summary(ctx, run, stopped_early, elapsed)
    _publish(ctx, run, summary, elapsed)
    return summary


def _tracking_config(params: Params, resolved: dict[str, Any], fingerprint: str, data: build.TrainData, net: build.Net,
                     rt: Runtime, dist: distributed.Dist) -> dict[str, Any]:
    """The W&B run config: resolved params, git commit, dataset, runtime, model size, pretrained load report."""
    import torch

    ds = data.ds
    return {
        **resolved,
        "git_commit": tracking.git_commit(),
        "dataset": {"root": str(params.paths.prepared), "hash": fingerprint, "classes": ds.classes, **ds.meta},
        "runtime": {
            "device": str(rt.device), "amp": rt.amp_name, "channels_last": rt.channels_last, "workers": data.workers,
            "world_size": dist.world_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "arch": params.train.arch,
        "params_m": net.params_m,
        "pretrained_load": {k: v if k != "loaded" else len(v) for k, v in getattr(net.model, "cvpipe_pretrained_report", {}).items()},
    }


def _start_tracker(params: Params, tp, config: dict[str, Any], fingerprint: str, state: Optional[dict[str, Any]],
                   dist: distributed.Dist) -> tracking.Tracker:
    """The W&B run on rank 0 (a resumed run continues its run id); a disabled tracker elsewhere."""
    tracker = tracking.Tracker(None)
    if not dist.is_main:
        return tracker
    resume_id = state.get("wandb_run_id") if state else None
    for attempt in range(4):
        tracker = tracking.start(
            params, job_type="train", name=f"train-{tp.arch}-seed{tp.seed}", config=config,
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
    return tracker


def _run_epochs(ctx: build.Context, run: build.RunState, checkpointer: ckpt_lib.Checkpointer) -> bool:
    """Epochs from ``ctx.start_epoch`` until the plan ends or early stopping stops it (then True).

    Each epoch: a staged unfreeze when its phase begins, training, validation, early stopping, the
    checkpoint and history (rank 0), and with a time budget the re-plan.
    """
    with EpochProgress(run.tp.epochs) as bar:
        epoch_started = time.perf_counter()
        epoch_walls: list[float] = []
        for epoch in itertools.count(ctx.start_epoch):
            if epoch >= run.tp.epochs:
                break
            if finetune.phase_of_epoch(run.tp, epoch) != run.phase.index:
                info(f"epoch {epoch + 1}: unfreezing the backbone (fresh optimizer and warmup)")
                run.phase = build.build_phase(ctx.net.model, run.tp, epoch, ctx.updates_per_epoch, ctx.dist, ctx.rt)
                run.phase_updates = 0
            row, t0 = train_epoch(ctx, run, epoch, bar, checkpointer)
            validate(ctx, row)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            run.history.append(row)
            bar.end_epoch(epoch + 1, epoch_line(row, run.tp.epochs))

            improved = run.stopper.update(row)
            stopped_early = run.stopper.should_stop
            finished = stopped_early or epoch + 1 == run.tp.epochs
            rngs = distributed.gather_object(ckpt_lib.rng_state(ctx.data.gen), ctx.dist)
            if ctx.dist.is_main:
                _log_epoch(ctx, row)
                checkpointer.save(run, epoch + 1, rngs, finished, improved)
                _write_history(ctx.out["history"], run.history)
            distributed.barrier(ctx.dist)
            now = time.perf_counter()
            epoch_walls.append(now - epoch_started)
            epoch_started = now
            if ctx.budget is not None and not finished:
                if replan_after_epoch(ctx.budget, run, epoch, epoch_walls, ctx.dist, ctx.updates_per_epoch) and ctx.dist.is_main:
                    # the deadline is here: the last checkpoint becomes the finished one
                    checkpointer.save(run, epoch + 1, rngs, True, improved)
                    warn(f"time budget reached after epoch {epoch + 1}: the cosine schedule did not complete")
            if stopped_early:
                info(f"early stop after epoch {epoch + 1}: {run.stopper.monitor} did not improve for {run.stopper.bad_epochs} epochs")
                return True
    return False


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The epoch's one plain line: on the terminal above the bars, and the progress itself in a log."""
    ema = f" ema_val_acc={row['ema_val_acc']:.4f}" if "ema_val_acc" in row else ""
    return (f"epoch {row['epoch']}/{epochs}: train_loss={row['train_loss']:.4f} train_acc={row['train_acc']:.4f} "
            f"val_loss={row['val_loss']:.4f} val_acc={row['val_acc']:.4f}{ema} lr={row['lr']:.3g} "
            f"{row['img_per_s']:,.0f} img/s {row['seconds']:.1f}s")


def _log_epoch(ctx: build.Context, row: dict[str, Any]) -> None:
    """The epoch's metrics to W&B (rank 0)."""
    log = {"epoch": row["epoch"], "train/loss": row["train_loss"], "train/acc": row["train_acc"],
           "val/loss": row["val_loss"], "val/acc": row["val_acc"], "train/lr": row["lr"],
           "perf/img_per_s": row["img_per_s"], "perf/epoch_seconds": row["seconds"]}
    if ctx.net.ema is not None:
        log.update({"ema/val_loss": row["ema_val_loss"], "ema/val_acc": row["ema_val_acc"]})
    if ctx.rt.device.type == "cuda":
        import torch

        log["perf/gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(ctx.rt.device) / 2**30, 3)
    ctx.tracker.log(log)


def _summary(ctx: build.Context, run: build.RunState, stopped_early: bool, elapsed: float) -> dict[str, Any]:
    """What train.json holds: the plan, the best and the final epoch, throughput, runtime, data and W&B ids."""
    tp, history, best = run.tp, run.history, run.stopper.best
    summary = {
        "arch": tp.arch,
        "finetune": tp.finetune,
        "epochs": tp.epochs,
        "epochs_run": history[-1]["epoch"],
        "stopped_early": stopped_early,
        "monitor": tp.monitor,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        # the weights best.pt was picked by: the EMA's under an ema_ monitor (the metrics file's val_acc)
        "best_monitored_val_acc": best["ema_val_acc" if tp.monitor.startswith("ema_") else "val_acc"],
        "final_train_loss": history[-1]["train_loss"],
        "final_val_acc": history[-1]["val_acc"],
        "final_val_loss": history[-1]["val_loss"],
        "img_per_s": round(float(np.mean([h["img_per_s"] for h in history])), 2),
        "seconds": round(elapsed, 2),
        "device": str(ctx.rt.device),
        "world_size": ctx.dist.world_size,
        "amp": ctx.rt.amp_name,
        "params_m": ctx.net.params_m,
        "dataset_hash": ctx.fingerprint,
        "wandb_run_id": ctx.tracker.id,
    }
    if ctx.budget is not None:
        summary["time_budget"] = ctx.budget.summary_entry(tp)
    if ctx.net.ema is not None:
        summary["best_ema_val_acc"] = max(h["ema_val_acc"] for h in history)
        summary["final_ema_val_acc"] = history[-1]["ema_val_acc"]
    return summary


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file ``<paths.metrics>/<run>/train.json``: what a person compares across runs.

    ``val_acc`` is the validation accuracy of the weights ``best.pt`` was picked by (the EMA's when
    ``train.monitor`` is an ``ema_`` metric) at its epoch; ``epochs`` the epochs run. Keys shared with the
    other stages' metrics files (``seconds``, ``throughput_img_s``) keep ``dvc metrics show`` one narrow
    table; the full summary is ``<paths.reports>/<run>/train.json``."""
    return {"epochs": summary["epochs_run"], "val_acc": summary["best_monitored_val_acc"],
            "throughput_img_s": summary["img_per_s"], "seconds": summary["seconds"]}


def _publish(ctx: build.Context, run: build.RunState, summary: dict[str, Any], elapsed: float) -> None:
    """train.json, the W&B summary and the checkpoints as an artifact (rank 0); the closing line on the console."""
    tp, best, monitor, tracker = run.tp, run.stopper.best, run.tp.monitor, ctx.tracker
    if ctx.dist.is_main:
        storage.write_json(ctx.out["report"], summary)
        storage.write_json(ctx.out["metrics"], headline(summary))
        tracker.summary({k: v for k, v in summary.items() if k != "wandb_run_id"})
        # the checkpoints (optimizer state included) are a `checkpoint`, not "the model": evaluate logs the
        # weights it scored as the `model` artifact and records reading this one
        tracker.log_artifact(
            checkpoint_files(ctx.out["model_dir"]), name=tracking.checkpoint_artifact(tp.arch, tp.seed), type="checkpoint",
            metadata={monitor: best[monitor], "best_epoch": best["epoch"], "epochs_run": run.history[-1]["epoch"],
                      "dataset_hash": ctx.fingerprint},
        )
        tracker.finish()
    info(
        f"trained {tp.arch} ({tp.finetune}) for {run.history[-1]['epoch']} epochs in {elapsed:.1f}s on {ctx.rt.device} ({ctx.rt.amp_name}"
        f"{f', {ctx.dist.world_size} processes' if ctx.dist.enabled else ''}): best {monitor} {best[monitor]:.4f} at epoch {best['epoch']}"
    )
