"""One training epoch and its validation.

:func:`train_epoch` runs the train loader once: the shared forward/loss/mixup step
(:func:`cvpipe.torchkit.step.forward_loss`), backward through the grad scaler, gradient
accumulation (DDP gradient sync only on the last batch of each accumulation), and at each
accumulation boundary one :func:`optimizer_update` (unscale, clip, step, schedule, EMA, log),
with a time budget a re-plan at the epoch's quarter marks (:func:`~cvpipe.train.budget_run.replan_in_epoch`),
and with ``train.checkpoint_every_updates`` a mid-epoch ``last.pt`` that a resumed run continues at
its step (:func:`_begin_epoch`: the epoch's order, augmentation RNGs and train sums restored).
:func:`validate` adds the val metrics of the model (and of its EMA) through the shared
evaluation pass (:func:`cvpipe.torchkit.evaluation.evaluate`), summed over ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Optional

from cvpipe.core.errors import StageError
from cvpipe.torchkit.evaluation import evaluate
from cvpipe.torchkit.step import forward_loss
from cvpipe.train import checkpoint as ckpt_lib
from cvpipe.train import distributed, finetune
from cvpipe.train.budget_run import replan_in_epoch
from cvpipe.train.build import Context, RunState
from cvpipe.train.checkpoint import Checkpointer

# shares of an epoch after which a time budget re-plans from the epoch's own pace (all ranks at the same steps)
REPLAN_MARKS = (0.25, 0.5, 0.75)


def train_epoch(ctx: Context, run: RunState, epoch: int, bar, checkpointer: Optional[Checkpointer] = None
                ) -> tuple[dict[str, Any], float]:
    """Train 0-based ``epoch``; returns its history row so far (epoch, lr, train loss/acc, img/s) and
    the time it started (``perf_counter``, moved back by the seconds a resumed epoch had run before).
    *bar* is the run's :class:`~cvpipe.core.console.EpochProgress`; with *checkpointer* and
    ``train.checkpoint_every_updates``, ``last.pt`` is also written inside the epoch."""
    import torch

    tp, data, dist, rt = run.tp, ctx.data, ctx.dist, ctx.rt
    steps_per_epoch = len(data.train_loader)
    first, sums, before = _begin_epoch(ctx, run, epoch)
    epoch_gen = data.gen.get_state()  # before the loader's pass draws its order from it: what a mid-epoch resume restores
    bar.start_epoch(epoch + 1, tp.epochs, steps_per_epoch * data.rank_batch * dist.world_size)
    bar.advance(first * data.rank_batch * dist.world_size)
    t0 = time.perf_counter()
    marks = sorted({max(1, round(steps_per_epoch * q)) for q in REPLAN_MARKS} - {steps_per_epoch})
    marks = [m for m in marks if m > first]
    every = tp.checkpoint_every_updates if checkpointer is not None else 0
    seen = sums["seen"]
    loss_sum = torch.tensor(sums["loss_sum"], dtype=torch.float64, device=rt.device)
    correct = torch.tensor(sums["correct"], dtype=torch.int64, device=rt.device)
    run.phase.optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(data.train_loader, start=first):
        boundary = (step + 1) % tp.accum_steps == 0 or step + 1 == steps_per_epoch
        sync = contextlib.nullcontext() if (boundary or not dist.enabled) else _unwrap_compiled(run.phase.train_model).no_sync()
        with sync:
            fwd = forward_loss(run.phase.train_model, images, labels, ctx.net.normalize, ctx.net.criterion, ctx.net.mixup, rt)
            if not torch.isfinite(fwd.loss):
                raise StageError(f"loss became {float(fwd.loss)} at epoch {epoch + 1}: lower train.lr (now {tp.lr})")
            scaled = fwd.loss / tp.accum_steps
            (ctx.net.scaler.scale(scaled) if ctx.net.scaler is not None else scaled).backward()
        if boundary:
            optimizer_update(ctx, run, fwd.loss)
            if ctx.budget is not None and marks and step + 1 >= marks[0]:  # the time budget's in-epoch re-plan
                marks = [m for m in marks if m > step + 1]
                replan_in_epoch(ctx.budget, run, epoch, (step + 1) / steps_per_epoch, before + time.perf_counter() - t0,
                                dist, ctx.updates_per_epoch)
        n = len(fwd.labels)
        seen += n
        loss_sum += fwd.loss.detach().double() * n
        correct += (fwd.logits.detach().argmax(1) == fwd.labels).sum()
        bar.advance(n * dist.world_size)
        run.steps_here += 1
        if boundary and every and run.total_updates % every == 0 and step + 1 < steps_per_epoch:
            progress = {"step": step + 1, "loss_sum": float(loss_sum), "correct": int(correct), "seen": seen,
                        "seconds": before + time.perf_counter() - t0}
            _save_mid_epoch(ctx, run, checkpointer, epoch, progress, epoch_gen)
        if ctx.kill_after and run.steps_here >= ctx.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = before + time.perf_counter() - t0
    if ctx.budget is not None:
        ctx.budget.train_s = train_seconds  # the rest of the epoch's wall is the budget's per-epoch overhead
    run.phase.scheduler.step(epoch + 1 - run.phase.start)
    t_loss, t_correct, t_seen = distributed.all_sum([float(loss_sum), float(correct), float(seen)], dist)
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": max_lr(run.phase.optimizer),
        "train_loss": round(t_loss / t_seen, 6),
        "train_acc": round(t_correct / t_seen, 6),
        "img_per_s": round(t_seen / train_seconds, 2),
    }
    return row, t0 - before


def _begin_epoch(ctx: Context, run: RunState, epoch: int) -> tuple[int, dict[str, Any], float]:
    """Set the epoch (its order, and the seeds of its per-sample augmentation); in a run resumed mid-epoch,
    restore where the epoch stopped.

    Returns (batches this rank already took in the epoch, the epoch's train sums so far, its seconds so far).
    """
    from torch.utils.data.distributed import DistributedSampler

    data = ctx.data
    if isinstance(data.sampler, DistributedSampler):
        data.sampler.set_epoch(epoch)
    if hasattr(data.train_ds, "set_epoch"):  # the epoch of its per-image augmentation seeds (shards: and its order)
        data.train_ds.set_epoch(epoch)
    finetune.train_mode(ctx.net.model)
    partial, run.partial = run.partial, None
    if partial is None:
        return 0, {"loss_sum": 0.0, "correct": 0, "seen": 0}, 0.0
    data.skip_batches(partial["step"])
    return partial["step"], partial, partial["seconds"]


def _save_mid_epoch(ctx: Context, run: RunState, checkpointer: Checkpointer, epoch: int, progress: dict[str, Any],
                    epoch_gen) -> None:
    """``last.pt`` at an update boundary inside the epoch (every rank takes part: the sums and RNG states
    are collected from all of them)."""
    sums = distributed.all_sum([progress["loss_sum"], float(progress["correct"]), float(progress["seen"])], ctx.dist)
    progress = {**progress, "loss_sum": sums[0], "correct": int(sums[1]), "seen": int(sums[2])}
    state = ckpt_lib.rng_state(None)
    state["loader"] = epoch_gen
    rngs = distributed.gather_object(state, ctx.dist)
    if ctx.dist.is_main:
        checkpointer.save_mid_epoch(run, epoch, rngs, progress)
    distributed.barrier(ctx.dist)


def optimizer_update(ctx: Context, run: RunState, loss) -> None:
    """One optimizer update at an accumulation boundary: unscale, clip, step (through the scaler),
    then the per-update schedule, the EMA and the W&B step log."""
    import torch

    net, opt, tp = ctx.net, run.phase.optimizer, run.tp
    if net.scaler is not None:
        net.scaler.unscale_(opt)
    if tp.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_([p for p in net.model.parameters() if p.requires_grad], tp.clip_grad)
    if net.scaler is not None:
        net.scaler.step(opt)
        net.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    run.phase_updates += 1
    run.total_updates += 1
    run.phase.scheduler.step_update(num_updates=run.phase_updates)
    if net.ema is not None:
        net.ema.update(net.model, step=run.total_updates)
    if ctx.dist.is_main:
        ctx.tracker.log({"step/update": run.total_updates, "step/loss": float(loss.detach()), "step/lr": max_lr(opt)})


def validate(ctx: Context, row: dict[str, Any]) -> None:
    """Add ``val_loss``/``val_acc`` (and the EMA's ``ema_val_*``) to *row*, over the whole val split (all ranks).

    Without a val split the train metrics stand in, so ``train.monitor`` always has a value.
    """
    net, data = ctx.net, ctx.data
    if data.val_loader is not None:
        v_loss, v_correct, v_n = _val_sums(ctx, net.model)
        row["val_loss"], row["val_acc"] = round(v_loss / v_n, 6), round(v_correct / v_n, 6)
        if net.ema is not None:
            distributed.broadcast_buffers(net.ema.module, ctx.dist)   # rank 0's EMA, the checkpointed one
            e_loss, e_correct, e_n = _val_sums(ctx, net.ema.module)
            row["ema_val_loss"], row["ema_val_acc"] = round(e_loss / e_n, 6), round(e_correct / e_n, 6)
    else:
        row["val_loss"], row["val_acc"] = row["train_loss"], row["train_acc"]
        if net.ema is not None:
            row["ema_val_loss"], row["ema_val_acc"] = row["val_loss"], row["val_acc"]


def _val_sums(ctx: Context, model) -> list[float]:
    """[loss_sum, correct, count] of *model* on the val split, summed over ranks."""
    result = evaluate(model, ctx.data.val_loader, ctx.net.normalize, ctx.rt, ctx.net.eval_criterion)
    return distributed.all_sum(result.sums(), ctx.dist)


def max_lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _unwrap_compiled(model):
    """The DDP module under a torch.compile wrapper (``no_sync`` lives on DDP)."""
    return getattr(model, "_orig_mod", model)
