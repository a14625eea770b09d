"""The time budget applied to a train run (``train.time_budget_minutes``); the arithmetic is
:mod:`cvpipe.train.budget`'s.

Before the schedule exists, :func:`plan_budget` times a few real training steps, an eval
pass and a checkpoint save on a throw-away copy of the model (:func:`measure_step_seconds`)
and sizes the epochs and warmup to fit. After every epoch, :func:`replan_after_epoch` re-fits
the plan to the measured epoch time and re-times the rest of the schedule (or ends the run here).
A resumed run keeps its plan and the budget its earlier runs spent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from cvpipe.core import storage
from cvpipe.core.config import TrainParams
from cvpipe.core.console import info
from cvpipe.torchkit.evaluation import evaluate
from cvpipe.torchkit.loaders import cycle, make_loader
from cvpipe.torchkit.models import save_checkpoint
from cvpipe.torchkit.runtime import Runtime
from cvpipe.torchkit.step import time_train_steps
from cvpipe.train import checkpoint as ckpt_lib
from cvpipe.train import distributed, finetune
from cvpipe.train.budget import TimeBudget, epoch_estimate, planned_warmup
from cvpipe.train.build import Net, RunState, TrainData


PROBE_SHARE = 0.05  # the most of the budget the step-time probe may take before it stops timing


@dataclass
class BudgetPlan:
    budget: TimeBudget
    details: dict[str, Any]  # the initial measurement and plan (train.json's time_budget, the checkpoint's budget.info)
    min_warmup: int  # train.warmup_epochs as configured: the floor of every planned warmup
    train_s: float = 0.0  # the last epoch's training loop, in seconds (set by train_epoch)
    overhead_s: float = 0.0  # the rest of the last epoch's wall: validation, checkpoint, history, barrier

    def apply(self, tp: TrainParams, epochs: int) -> TrainParams:
        """*tp* planned for ``epochs`` epochs, with the warmup :func:`planned_warmup` gives that many."""
        return tp.model_copy(update={"epochs": epochs, "warmup_epochs": planned_warmup(epochs, self.min_warmup)})

    def checkpoint_entry(self, tp: TrainParams) -> dict[str, Any]:
        return {"planned_epochs": tp.epochs, "warmup_epochs": tp.warmup_epochs, "spent_s": self.budget.spent_s(),
                "info": self.details}

    def summary_entry(self, tp: TrainParams) -> dict[str, Any]:
        return {**self.details, "planned_epochs": tp.epochs, "warmup_epochs": tp.warmup_epochs,
                "spent_s": round(self.budget.spent_s(), 2), "budget_s": round(self.budget.minutes * 60, 2)}


def plan_budget(tp: TrainParams, min_warmup: int, state: Optional[dict[str, Any]], data: TrainData, net: Net,
                rt: Runtime, dist: distributed.Dist, probe_path: Optional[str]) -> tuple[Optional[BudgetPlan], TrainParams]:
    """(the plan, *tp* with the planned epochs and warmup); (None, *tp*) without a time budget.

    A resumed run (*state* with a ``budget``) continues its plan (re-fitted after each epoch as before).
    """
    if tp.time_budget_minutes is None:
        return None, tp
    saved = (state or {}).get("budget") or {}
    budget = TimeBudget(tp.time_budget_minutes, tp.epochs, spent_before_s=float(saved.get("spent_s", 0.0)))
    if saved:
        planned = int(saved["planned_epochs"])
        details = dict(saved.get("info", {}))
    else:
        planned, details = _initial_plan(budget, tp, data, net, rt, dist, probe_path)
    plan = BudgetPlan(budget, details, min_warmup)
    planned_tp = plan.apply(tp, planned)
    if "warmup_epochs" in saved:  # re-plans keep the first plan's warmup: the resumed schedule is the same curve
        planned_tp = planned_tp.model_copy(update={"warmup_epochs": int(saved["warmup_epochs"])})
    return plan, planned_tp


def _initial_plan(budget: TimeBudget, tp: TrainParams, data: TrainData, net: Net, rt: Runtime, dist: distributed.Dist,
                  probe_path: Optional[str]) -> tuple[int, dict[str, Any]]:
    """Epochs that fit, from measured step, eval and checkpoint times; and what was measured."""
    step_s, eval_s, save_s = measure_step_seconds(net, tp, data, rt, probe_path)
    n_val = len(data.val_loader.dataset) if data.val_loader is not None else 0
    compute = step_s * len(data.train_loader) + eval_s * n_val * (2 if net.ema is not None else 1)
    # one plan on every rank: compute averaged over ranks, plus rank 0's checkpoint save
    compute, save_s = distributed.all_sum([compute / dist.world_size, save_s], dist)
    est = compute + save_s  # one serialization per epoch: best.pt and last.pt share it (Checkpointer.save)
    planned = budget.fit(0, est)
    if tp.finetune == "staged":
        planned = min(max(planned, tp.freeze_epochs + 1), tp.epochs)
    details = {"minutes": tp.time_budget_minutes, "estimated_epoch_s": round(est, 3),
               "step_s": round(step_s, 5), "checkpoint_save_s": round(save_s, 3), "initial_plan": planned}
    info(f"time budget {tp.time_budget_minutes:.3g} min: ~{est:.2f}s per epoch measured -> {planned} epochs"
         f"{' (train.epochs caps it)' if planned == tp.epochs else ''}")
    return planned, details


def measure_step_seconds(net: Net, tp: TrainParams, data: TrainData, rt: Runtime, probe_path: Optional[str] = None,
                         steps: int = 6) -> tuple[float, float, float]:
    """(seconds per training step, seconds per image of an eval pass, seconds per checkpoint save),
    timed on a throw-away copy.

    Real batches through the real augmentation and the train step (:func:`time_train_steps`: forward, backward,
    optimizer), after one untimed warm-up step (allocator, oneDNN/cuDNN kernel choice, torch.compile);
    the last batch through the validation pass (:func:`evaluate`); and one real save of the model and
    optimizer state to *probe_path* (removed after). The model being trained, its optimizer and the
    training RNG streams are not touched.
    """
    import copy

    import torch

    rng = ckpt_lib.rng_state()  # restored after: timing must not shift the run's random streams
    probe = copy.deepcopy(net.model)
    opt = finetune.build_optimizer(probe, tp)
    loader = make_loader(data.train_ds, data.rank_batch, True, data.workers, tp.seed, rt.device.type == "cuda",
                         drop_last=len(data.train_ds) >= data.rank_batch)
    step_model = torch.compile(probe) if tp.compile else probe
    finetune.train_mode(probe)
    batches = cycle(loader)
    # at most PROBE_SHARE of the budget (at least one timed step): the in-epoch re-plans refine the estimate
    max_s = PROBE_SHARE * tp.time_budget_minutes * 60.0 if tp.time_budget_minutes else float("inf")
    step_s = time_train_steps(step_model, opt, batches, net.normalize, net.criterion, net.mixup, rt, steps, max_s)
    images, labels = next(batches)
    t0 = time.perf_counter()
    evaluate(probe, [(images, labels)], net.normalize, rt, net.eval_criterion)
    _synchronize(rt)
    eval_per_image = (time.perf_counter() - t0) / len(labels)
    save_s = 0.0
    if probe_path is not None:
        t0 = time.perf_counter()
        save_checkpoint(probe_path, {"model": probe.state_dict(), "optimizer": opt.state_dict()})
        save_s = time.perf_counter() - t0
        storage.remove(probe_path)
    del probe, opt, step_model, loader
    ckpt_lib.set_rng_state(rng)
    return step_s, eval_per_image, save_s


def _synchronize(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def replan_after_epoch(plan: BudgetPlan, run: RunState, epoch: int, walls: list[float], dist: distributed.Dist,
                       updates_per_epoch: int) -> bool:
    """Re-plan after 0-based ``epoch`` from the measured epoch *walls*; True when the run must end here."""
    wall, overhead = (x / dist.world_size for x in distributed.all_sum(
        [epoch_estimate(walls), max(walls[-1] - plan.train_s, 0.0)], dist))
    plan.overhead_s = overhead
    return _apply(plan, run, epoch, plan.budget.replan(epoch + 1, wall, current=run.tp.epochs), wall, updates_per_epoch)


def replan_in_epoch(plan: BudgetPlan, run: RunState, epoch: int, done: float, elapsed_s: float, dist: distributed.Dist,
                    updates_per_epoch: int) -> None:
    """Re-plan a ``done`` share (0-1) into 0-based ``epoch``, ``elapsed_s`` after it started, from this epoch's own
    pace: the freshest measure of the machine (a CPU hog that has just stopped, or started). Counting the
    current epoch, the plan never ends before it. An epoch costs its pace plus the last epoch's overhead
    (validation, checkpoint: :attr:`BudgetPlan.overhead_s`), the same measure the re-plan at the epoch's end
    uses; with the pace alone, plans grew inside an epoch and shrank at its end, cutting the cosine off."""
    pace = distributed.all_sum([elapsed_s / max(done, 1e-6)], dist)[0] / dist.world_size
    epoch_s, pending_s = pace + plan.overhead_s, (1.0 - done) * pace + plan.overhead_s
    new_plan = plan.budget.replan(epoch + 1, epoch_s, pending_s=pending_s, current=run.tp.epochs)
    _apply(plan, run, epoch, new_plan, epoch_s, updates_per_epoch)


def _apply(plan: BudgetPlan, run: RunState, epoch: int, new_plan: int, wall: float, updates_per_epoch: int) -> bool:
    """Switch the run to ``new_plan`` epochs; True when that ends it after 0-based ``epoch``.

    Every re-plan, at any point of the schedule, may grow or shrink it: the rest of the current phase's
    schedule is re-timed from where it stands (:meth:`RetimedScheduler.retimed`: the LR continues
    smoothly). The warmup keeps its length; a staged run keeps at least one unfrozen epoch.
    """
    tp = run.tp
    if tp.finetune == "staged" and epoch < tp.freeze_epochs:
        new_plan = max(new_plan, tp.freeze_epochs + 1)
    if new_plan == tp.epochs:
        return False
    info(f"time budget: {wall:.2f}s per epoch measured, {tp.epochs} -> {new_plan} epochs")
    run.tp = tp.model_copy(update={"epochs": new_plan})
    old_p0, old_p1 = finetune.phase_epochs(tp, run.phase.index)
    p0, p1 = finetune.phase_epochs(run.tp, run.phase.index)
    left = (p1 - p0) * updates_per_epoch - run.phase_updates  # > 0 mid-epoch: the plan keeps the current epoch
    if left > 0 and p1 - p0 != old_p1 - old_p0:  # this phase's length changed (a staged probe phase keeps its own)
        base = finetune.build_scheduler(run.phase.optimizer, run.tp, p1 - p0, updates_per_epoch)
        run.phase.scheduler = run.phase.scheduler.retimed(base, (p1 - p0) * updates_per_epoch, run.phase_updates)
        run.phase.scheduler.step_update(num_updates=run.phase_updates)
    return new_plan <= epoch + 1  # at an epoch's end: the deadline is here
