"""Training state that a resumed run needs: RNG states, dataset fingerprint, resume decision."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

# train.* keys that do not change what is learned: a `last` checkpoint written under
# other values of these is still resumed automatically.
NON_SEMANTIC_KEYS = ("workers", "auto_resume", "compile", "device")


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
