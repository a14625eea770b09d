"""Experiment tracking with Weights & Biases: always on, never required.

* With ``WANDB_API_KEY`` set (or ``wandb.mode: online``) runs go to the W&B server.
* Without a key the run is written offline under ``paths.wandb`` and can be
  uploaded later with ``wandb sync <paths.wandb>/wandb/offline-run-*``.
* ``WANDB_MODE`` in the environment wins over ``wandb.mode: auto``.
* Tracking never prompts and never fails a stage: if W&B cannot start, a warning
  is printed and the stage continues with a no-op tracker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from cvpipe.core.config import Params
from cvpipe.core.console import warn


def group_name(params: Params, dataset_hash: Optional[str]) -> str:
    """The W&B group of a dataset's runs (train, evaluate and compare sit together):
    ``wandb.group``, else ``<prepared folder>-<first 8 hex of the dataset hash>``."""
    return params.wandb.group or f"{Path(str(params.paths.prepared)).name}-{str(dataset_hash or '')[:8]}"


def resolve_mode(params: Params) -> str:
    mode = params.wandb.mode
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """A thin, failure-proof wrapper around a wandb run (or nothing)."""

    def __init__(self, run: Any = None):
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def id(self) -> Optional[str]:
        return getattr(self.run, "id", None)

    @property
    def dir(self) -> Optional[str]:
        return getattr(self.run, "dir", None)

    def _safe(self, what: str, fn, *a, **kw) -> Any:
        if self.run is None:
            return None
        try:
            return fn(*a, **kw)
        except Exception as exc:  # tracking must never break training
            warn(f"W&B {what} failed: {exc}")
            return None

    def log(self, data: dict[str, Any], step: Optional[int] = None) -> None:
        self._safe("log", lambda: self.run.log(data, step=step))

    def summary(self, data: dict[str, Any]) -> None:
        self._safe("summary", lambda: self.run.summary.update(data))

    def config(self, data: dict[str, Any]) -> None:
        self._safe("config", lambda: self.run.config.update(data, allow_val_change=True))

    def define_metric(self, name: str, **kw: Any) -> None:
        self._safe("define_metric", lambda: self.run.define_metric(name, **kw))

    def log_artifact(self, path: str | Path, name: str, type: str, metadata: Optional[dict] = None, aliases=None) -> None:
        def _do():
            import wandb

            art = wandb.Artifact(name=name, type=type, metadata=metadata or {})
            p = Path(path)
            if p.is_dir():
                art.add_dir(str(p))
            else:
                art.add_file(str(p))
            self.run.log_artifact(art, aliases=aliases or ["latest"])

        self._safe("artifact", _do)

    def image(self, path: str | Path, caption: str = "") -> Any:
        try:
            import wandb

            return wandb.Image(str(path), caption=caption)
        except Exception:
            return None

    def finish(self, exit_code: int = 0) -> None:
        self._safe("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _prepare_dirs(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    # keep every W&B file inside the project (artifact staging defaults to ~/.local/share)
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        if not os.environ.get(var):
            (root / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(root / sub)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def start(
    params: Params,
    *,
    job_type: str,
    name: Optional[str] = None,
    config: Optional[dict[str, Any]] = None,
    group: Optional[str] = None,
    tags: Optional[list[str]] = None,
    resume_id: Optional[str] = None,
) -> Tracker:
    mode = resolve_mode(params)
    if mode == "disabled":
        return Tracker(None)
    root = Path(os.environ.get("WANDB_DIR") or params.paths.wandb).resolve()
    try:
        _prepare_dirs(root)
        import wandb

        run = wandb.init(
            project=params.wandb.project,
            entity=params.wandb.entity,
            job_type=job_type,
            name=name,
            group=group or params.wandb.group,
            tags=sorted(set((tags or []) + list(params.wandb.tags))),
            config=config,
            mode=mode,
            dir=str(root),
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(
                console="off", silent=True, x_disable_stats=True, init_timeout=60, disable_git=False
            ),
        )
        return Tracker(run)
    except Exception as exc:
        warn(f"W&B could not start ({type(exc).__name__}: {exc}); continuing without tracking")
        return Tracker(None)
