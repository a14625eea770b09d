"""Setting up a train run: the resume decision, data, model, optimization phases and the loop's state.

The data and its samplers (:func:`build_data`), the model with its training parts: EMA,
criteria, mixup, grad scaler (:func:`build_net`), an optimization phase: optimizer, scheduler,
DDP/compile wrapper (:func:`build_phase`), and the loop's mutable state (:class:`RunState`),
restored from ``last.pt`` on resume (:func:`start_run_state`).

:mod:`cvpipe.train.stage` calls these in a fixed order (the order fixes the random streams:
model initialization draws from the seed, nothing before it may).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage
from cvpipe.core.config import TrainParams
from cvpipe.core.console import info, warn
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.data.prepared import PreparedDataset, Split
from cvpipe.torchkit.loaders import (ArrayDataset, BatchNormalizer, RowBatches, SkippingSampler, collate_uint8, make_loader,
                                    train_dataset)
from cvpipe.torchkit.models import data_config, load_checkpoint
from cvpipe.torchkit.runtime import Runtime
from cvpipe.train import checkpoint as ckpt_lib
from cvpipe.train import distributed, finetune
from cvpipe.train.budget import RetimedScheduler
from cvpipe.train.early_stop import EarlyStopping

# ----------------------------------------------------------------------------- resume


def load_resume_state(tp: TrainParams, ds: PreparedDataset, last_path: str, identity: str, resume: bool) -> Optional[dict[str, Any]]:
    """The ``last.pt`` to continue, or None for a fresh run.

    ``resume`` (``--resume``) insists: no resumable checkpoint is an error. Otherwise
    (``train.auto_resume``) only an unfinished run with the same params and data is resumed.
    """
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
        return None
    if state is not None:
        if list(state["classes"]) != ds.classes or state["arch"] != tp.arch:
            raise StageError(f"cannot resume from {last_path}: it was trained for {state['arch']} on classes {state['classes']}")
        step = (state.get("epoch_progress") or {}).get("step")
        at = f"epoch {state['epoch']}" + (f" and {step} step{'s' * (step != 1)} of epoch {state['epoch'] + 1}" if step else "")
        info(f"resuming {last_path} after {at} ({why})")
    return state


# ----------------------------------------------------------------------------- data


def rank_batch_size(tp: TrainParams, dist: distributed.Dist) -> int:
    if tp.batch_size % dist.world_size:
        raise ParamsError(f"train.batch_size: {tp.batch_size} must be divisible by the {dist.world_size} processes")
    return tp.batch_size // dist.world_size


def check_splits(tp: TrainParams, train_split: Split, rank_batch: int) -> None:
    if len(train_split) == 0:
        raise StageError("the train split is empty")
    if tp.uses_mixup and rank_batch % 2:
        raise ParamsError(f"train.batch_size: mixup/cutmix needs an even batch per process (got {rank_batch})")


@dataclass
class TrainData:
    ds: PreparedDataset
    train_split: Split
    train_ds: Any  # ArrayDataset (arrays), or ShardStream (shards); each augments per image
    sampler: Any
    gen: Any  # the train loader's torch.Generator: its state goes into the checkpoint
    train_loader: Any
    val_loader: Any  # this rank's shard of the val split; None without one
    rank_batch: int
    workers: int

    def skip_batches(self, step: int) -> None:
        """Start the epoch's next pass after this rank's first *step* batches (a mid-epoch resume),
        in the order the uninterrupted pass had, without loading the skipped images."""
        if self.train_split.shards is not None:
            self.train_ds.resume(step)
        else:
            self.train_loader.sampler.skip = step * self.rank_batch


def build_data(tp: TrainParams, ds: PreparedDataset, train_split: Split, val_split: Optional[Split], pipeline,
               dist: distributed.Dist, rt: Runtime, rank_batch: int, workers: int) -> TrainData:
    """The train loader (one sampler per strategy; its generator's state is checkpointed) and this rank's val loader."""
    import torch
    from torch.utils.data import DataLoader, Subset

    pin = rt.device.type == "cuda"
    gen = torch.Generator()
    gen.manual_seed(tp.seed + dist.rank)
    # mixup needs full batches; BatchNorm cannot train on a final batch of one sample
    per_rank = len(train_split) // dist.world_size if tp.class_balance == "sampler" else -(-len(train_split) // dist.world_size)
    drop_last = (tp.uses_mixup and len(train_split) >= tp.batch_size) or (per_rank > rank_batch and per_rank % rank_batch == 1)
    train_ds = train_dataset(train_split, pipeline, tp.seed, rank_batch, drop_last, tp.shuffle_buffer, dist.rank,
                             dist.world_size, workers)
    if train_split.shards is not None:  # a stream orders itself (per epoch, per rank and worker)
        if tp.class_balance == "sampler":
            raise ParamsError("train.class_balance: sampler draws images at random, which a sharded split "
                              "(preprocess.format: shards) cannot serve; use loss, or preprocess.format: arrays")
        sampler = None
        train_loader = make_loader(train_ds, rank_batch, True, workers, tp.seed, pin, generator=gen)
    else:
        sampler = _train_sampler(tp, ds, train_split, train_ds, dist, gen, drop_last)
        train_loader = DataLoader(
            train_ds, batch_size=rank_batch, sampler=SkippingSampler(sampler), num_workers=workers, collate_fn=collate_uint8,
            pin_memory=pin, drop_last=drop_last, persistent_workers=workers > 0, generator=gen,
        )
    val_loader = None
    if val_split is not None and len(val_split) and val_split.shards is not None:
        rows = np.array_split(np.arange(len(val_split)), dist.world_size)[dist.rank]  # a contiguous share: ranged reads
        val_loader = make_loader(RowBatches(val_split, rows, max(rank_batch, 128)), 0, False, workers, tp.seed, pin)
    elif val_split is not None and len(val_split):
        shard = Subset(ArrayDataset(val_split), list(range(dist.rank, len(val_split), dist.world_size)))
        val_loader = make_loader(shard, max(rank_batch, 128), False, workers, tp.seed, pin)
    return TrainData(ds, train_split, train_ds, sampler, gen, train_loader, val_loader, rank_batch, workers)


def _train_sampler(tp: TrainParams, ds: PreparedDataset, train_split: Split, train_ds, dist: distributed.Dist, gen, drop_last: bool):
    """Inverse-frequency weighted sampling (``class_balance: sampler``), a DDP shard, or a plain shuffle."""
    import torch
    from torch.utils.data import RandomSampler, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if tp.class_balance == "sampler":
        w = finetune.inverse_frequency(train_split.labels, ds.num_classes)[np.asarray(train_split.labels)]
        return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(train_split) // dist.world_size,
                                     replacement=True, generator=gen)
    if dist.enabled:
        return DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=tp.seed, drop_last=drop_last)
    return RandomSampler(train_ds, generator=gen)


# ----------------------------------------------------------------------------- model


@dataclass
class Net:
    """The model and what trains it, built once per run."""

    model: Any
    norm_cfg: dict[str, Any]  # the input normalization the architecture expects (saved in checkpoints)
    normalize: BatchNormalizer
    ema: Any  # timm ModelEmaV3, or None
    criterion: Any  # the training loss (soft targets with mixup, class weights with class_balance: loss)
    eval_criterion: Any  # plain cross-entropy: validation losses stay comparable across recipes
    mixup: Any  # timm Mixup, or None
    scaler: Any  # torch GradScaler (fp16 on CUDA), or None

    @property
    def params_m(self) -> float:
        return round(sum(p.numel() for p in self.model.parameters()) / 1e6, 4)


def build_net(tp: TrainParams, ds: PreparedDataset, train_split: Split, rt: Runtime, dist: distributed.Dist,
              state: Optional[dict[str, Any]]) -> Net:
    """The timm model (resumed weights when *state*), normalizer, EMA, criteria, mixup and grad scaler."""
    import torch

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
    return Net(
        model, norm_cfg, normalize, ema, criterion, eval_criterion=torch.nn.CrossEntropyLoss(),
        mixup=finetune.make_mixup(tp, ds.num_classes),
        scaler=torch.amp.GradScaler(rt.device.type) if rt.use_scaler else None,
    )


# ----------------------------------------------------------------------------- phases and the loop's state


@dataclass
class Phase:
    """One optimization phase: the whole run, or (``staged``) the linear probe, then the unfrozen rest."""

    index: int  # 0, or 1 after a staged unfreeze
    start: int  # its first (0-based) epoch
    optimizer: Any
    scheduler: Any  # a RetimedScheduler: the time budget stretches or shrinks the phase's rest
    train_model: Any  # the model as the train step calls it: DDP- and/or torch.compile-wrapped


def build_phase(model, tp: TrainParams, epoch: int, updates_per_epoch: int, dist: distributed.Dist, rt: Runtime) -> Phase:
    """Freeze/unfreeze for ``epoch``, then a fresh optimizer, scheduler and (DDP/compile) wrapper."""
    import torch

    finetune.set_backbone_frozen(model, finetune.backbone_frozen_for_epoch(tp, epoch))
    index = finetune.phase_of_epoch(tp, epoch)
    p0, p1 = finetune.phase_epochs(tp, index)
    opt = finetune.build_optimizer(model, tp)
    warmup = min(tp.warmup_epochs, max(p1 - p0 - 1, 0))  # as build_scheduler clips it
    sched = RetimedScheduler(finetune.build_scheduler(opt, tp, p1 - p0, updates_per_epoch), (p1 - p0) * updates_per_epoch,
                             warmup * updates_per_epoch)
    wrapped = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if tp.compile:
        wrapped = torch.compile(wrapped)
    return Phase(index, p0, opt, sched, wrapped)


@dataclass
class RunState:
    """Everything the epoch loop changes, in one place; checkpointed at every epoch end."""

    tp: TrainParams  # the plan: the time budget may change epochs and warmup_epochs
    phase: Phase
    stopper: EarlyStopping  # the best epoch so far and the epochs without improvement
    history: list[dict[str, Any]] = field(default_factory=list)
    phase_updates: int = 0  # optimizer updates in this phase (the scheduler's clock)
    total_updates: int = 0  # optimizer updates in the run (EMA warmup, W&B step)
    steps_here: int = 0  # batches this process ran (fault injection)
    # a mid-epoch last.pt being resumed: where the epoch stopped, its train sums so far (this rank's share)
    # and this rank's augmentation RNG states; train_epoch consumes it
    partial: Optional[dict[str, Any]] = None


def start_run_state(tp: TrainParams, phase: Phase, net: Net, data: TrainData, dist: distributed.Dist,
                    state: Optional[dict[str, Any]], last_path: str) -> RunState:
    """A fresh loop state, or the resumed one: optimizer, scheduler, scaler, history, early-stopping and RNG states."""
    run = RunState(tp, phase, EarlyStopping(tp.monitor, tp.early_stop_patience, tp.early_stop_min_delta))
    if not state:
        return run
    if int(state.get("phase", 0)) == phase.index:
        phase.optimizer.load_state_dict(state["optimizer"])
        phase.scheduler.load_state_dict(state["scheduler"])
        run.phase_updates = int(state.get("phase_updates", 0))
    # else the checkpoint closed the staged probe: the unfrozen phase starts with a fresh optimizer and warmup,
    # as in the uninterrupted run (the probe's optimizer holds the head's parameters only)
    if net.scaler is not None and state.get("scaler"):
        net.scaler.load_state_dict(state["scaler"])
    run.history = list(state.get("history", []))
    run.stopper.best = state.get("best")
    run.stopper.bad_epochs = int(state.get("bad_epochs", 0))
    run.total_updates = int(state.get("num_updates", 0))
    rngs = state["rng"]
    same_world = isinstance(rngs, list) and len(rngs) == dist.world_size
    if isinstance(rngs, list):
        if not same_world:
            warn(f"{last_path} was written by {len(rngs)} processes, now {dist.world_size}: RNG streams restart")
        else:
            ckpt_lib.set_rng_state(rngs[dist.rank], data.gen)
    progress = state.get("epoch_progress")
    if progress:
        # the epoch's sums so far count once, on rank 0 (the epoch end sums over ranks)
        sums = {k: progress[k] if dist.is_main else 0 for k in ("loss_sum", "correct", "seen")}
        run.partial = {"step": int(progress["step"]), "seconds": float(progress["seconds"]), **sums}
    return run


@dataclass
class Context:
    """What a run built once. The epoch loop, the checkpointer and the summary read it; nothing rebinds it."""

    rt: Runtime
    dist: distributed.Dist
    data: TrainData
    net: Net
    out: dict[str, str]  # stage.output_paths
    updates_per_epoch: int
    start_epoch: int
    fingerprint: str  # the prepared dataset's
    tracker: Any  # W&B (a disabled tracker on ranks > 0)
    budget: Any = None  # budget_run.BudgetPlan with train.time_budget_minutes, else None
    kill_after: int = 0  # fault injection: SIGKILL after this many batches (0 = never)
