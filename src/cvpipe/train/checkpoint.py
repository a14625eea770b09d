"""Training state that a resumed run needs: RNG states, dataset fingerprint, resume decision, and the
:class:`Checkpointer` that writes ``best.pt``/``last.pt`` at epoch ends and, with
``train.checkpoint_every_updates``, ``last.pt`` inside an epoch."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from cvpipe.core import storage
from cvpipe.torchkit.models import save_checkpoint

if TYPE_CHECKING:
    from cvpipe.train.build import Context, RunState

# train.* keys that do not change what is learned: a `last` checkpoint written under
# other values of these is still resumed automatically.
NON_SEMANTIC_KEYS = ("workers", "auto_resume", "compile", "device", "checkpoint_every_updates")


def rng_state(loader_generator=None) -> dict[str, Any]:
    import torch

    st = random.getstate()
    np_st = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_st[1], dtype=np.int64)), "pos": int(np_st[2]),
                  "has_gauss": int(np_st[3]), "cached_gaussian": float(np_st[4])},
        "python": {"version": st[0], "state": list(st[1]), "gauss": st[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator=None) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def dataset_fingerprint(root: str | Path) -> str:
    """blake2b over the prepared dataset's metadata, labels and image arrays (16 hex digits)."""
    root = Path(root)
    h = hashlib.blake2b(digest_size=8)
    for rel in ("classes.json", "meta.json"):
        p = root / rel
        if p.exists():
            h.update(p.read_bytes())
    for split in ("train", "val", "test"):
        for name in ("labels.npy", "images.npy"):
            p = root / split / name
            if not p.exists():
                continue
            h.update(f"{split}/{name}".encode())
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def identity(resolved_train: dict[str, Any], fingerprint: str) -> str:
    """What must match for a `last` checkpoint to be resumed automatically."""
    t = {k: v for k, v in resolved_train.items() if k not in NON_SEMANTIC_KEYS}
    return hashlib.sha256(json.dumps({"train": t, "data": fingerprint}, sort_keys=True).encode()).hexdigest()[:16]


def resume_decision(ckpt: Optional[dict[str, Any]], ident: str, epochs: int, forced: bool) -> tuple[bool, str]:
    """(resume?, reason)."""
    if ckpt is None:
        return False, "no last checkpoint"
    if "optimizer" not in ckpt or "rng" not in ckpt:
        return False, "last checkpoint holds no training state"
    done = int(ckpt.get("epoch", 0))
    finished = bool(ckpt.get("finished"))
    if forced:
        if finished and done >= epochs:
            return False, f"last checkpoint already finished {done}/{epochs} epochs"
        return True, "--resume"
    if ckpt.get("identity") != ident:
        return False, "last checkpoint was trained with other params or data"
    if finished or done >= epochs:
        return False, "last checkpoint is a finished run"
    return True, "an unfinished run with the same params and data"


class Checkpointer:
    """Writes the checkpoints of a run (rank 0 only): ``last.pt`` every epoch, ``best.pt`` when the epoch improved,
    and ``last.pt`` every ``train.checkpoint_every_updates`` updates inside an epoch (:meth:`save_mid_epoch`).

    A checkpoint holds the model, EMA, optimizer, scheduler and scaler states, the run's counters,
    history and early-stopping state, each rank's RNG states, and what evaluate and serve need
    (arch, classes, image size, normalization, resize mode).
    """

    def __init__(self, ctx: "Context", resolved: dict[str, Any], ident: str):
        self.ctx = ctx
        self.resolved = resolved
        self.identity = ident
        self.best_path = storage.join(ctx.out["model_dir"], "best.pt")
        self.last_path = storage.join(ctx.out["model_dir"], "last.pt")

    def state(self, run: "RunState", epoch: int, rngs: list, finished: bool) -> dict[str, Any]:
        """The checkpoint after ``epoch`` epochs; *rngs* holds every rank's RNG states (index = rank), each
        with the train loader generator's state at the start of the epoch the checkpoint resumes into."""
        ctx, net, tp = self.ctx, self.ctx.net, run.tp
        ds = ctx.data.ds
        return {
            "arch": tp.arch,
            "classes": ds.classes,
            "image_size": ds.image_size,
            "normalize": net.norm_cfg,
            "resize_mode": ds.meta.get("resize_mode"),
            "model": net.model.state_dict(),
            "ema": net.ema.module.state_dict() if net.ema is not None else None,
            "optimizer": run.phase.optimizer.state_dict(),
            "scheduler": run.phase.scheduler.state_dict(),
            "scaler": net.scaler.state_dict() if net.scaler else None,
            "epoch": epoch,
            "phase": run.phase.index,
            "phase_updates": run.phase_updates,
            "num_updates": run.total_updates,
            "finished": finished,
            "metrics": run.history[-1] if run.history else {},
            "history": run.history,
            "best": run.stopper.best,
            "bad_epochs": run.stopper.bad_epochs,
            "params": self.resolved,
            "identity": self.identity,
            "dataset_hash": ctx.fingerprint,
            "world_size": ctx.dist.world_size,
            "wandb_run_id": ctx.tracker.id if ctx.dist.is_main else None,
            "rng": rngs,
            "budget": ctx.budget.checkpoint_entry(tp) if ctx.budget is not None else None,
        }

    def save(self, run: "RunState", epoch: int, rngs: list, finished: bool, improved: bool) -> None:
        """best.pt first when the epoch improved, so last.pt is never newer than best.pt; the second
        file is then the same bytes (a hard link locally), not a second serialization and write."""
        st = self.state(run, epoch, rngs, finished)
        if improved:
            save_checkpoint(self.best_path, st)
            storage.copy_file(self.best_path, self.last_path)
        else:
            save_checkpoint(self.last_path, st)

    def save_mid_epoch(self, run: "RunState", epoch: int, rngs: list, progress: dict[str, Any]) -> None:
        """``last.pt`` inside 0-based ``epoch``: ``epoch`` epochs done plus *progress* (``step``: batches each rank
        took in this epoch, and the epoch's train sums so far over all ranks: ``loss_sum``, ``correct``, ``seen``,
        ``seconds``). *rngs* are each rank's current RNG states (augmentation needs none: it is seeded per image)."""
        save_checkpoint(self.last_path, {**self.state(run, epoch, rngs, False), "epoch_progress": progress})
