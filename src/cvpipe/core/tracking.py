"""Experiment tracking with Weights & Biases: always on, never required.

* With ``WANDB_API_KEY`` set (or ``wandb.mode: online``) runs go to the W&B server.
* Without a key the run is written offline under ``paths.wandb`` and can be
  uploaded later with ``wandb sync <paths.wandb>/wandb/offline-run-*``.
* ``WANDB_MODE`` in the environment wins over ``wandb.mode: auto``.
* Tracking never prompts and never fails a stage: if W&B cannot start, a warning
  is printed and the stage continues with a no-op tracker.
* Lineage: each stage logs what it wrote as an artifact (:meth:`Tracker.log_artifact`) and
  records what it read (:meth:`Tracker.use_artifact`), so W&B links the runs
  preprocess (``dataset``) -> train (``checkpoint-*``) -> evaluate (``model-*``) -> compare
  (``model-promoted``, linked into the registry by :meth:`Tracker.link_artifact`). Offline,
  wandb 0.31 refuses ``use_artifact`` and ``link_artifact``; both are recorded in the offline run
  (see their docstrings) so that ``wandb sync`` (and :func:`link_pending`) carry them to the server.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from cvpipe.core.config import Params
from cvpipe.core.console import warn

# what an artifact holds: one file, a folder, or {name inside the artifact: local file}
ArtifactFiles = Union[str, Path, Mapping[str, Union[str, Path]]]


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
        self._links: list[dict[str, Any]] = []  # registry links recorded offline (see link_artifact)

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

    @property
    def offline(self) -> bool:
        return bool(self.run is not None and getattr(self.run, "offline", False))

    def log_artifact(self, path: ArtifactFiles, name: str, type: str, metadata: Optional[dict] = None,
                     aliases=None) -> Any:
        """Log *path* (a file, a folder, or ``{name in the artifact: file}``) as this run's output artifact;
        returns the ``wandb.Artifact`` (None when tracking is off or W&B failed)."""
        def _do():
            art = build_artifact(name, type, path, metadata)
            self.run.log_artifact(art, aliases=aliases or ["latest"])
            return art

        return self._safe("artifact", _do)

    def use_artifact(self, path: ArtifactFiles, name: str, type: str, metadata: Optional[dict] = None) -> Any:
        """Record that this run read *path*, the files of artifact *name* another run logged: W&B's lineage edge.

        The artifact is rebuilt from the files this stage actually read (same names, so the same content gives
        the same digest and W&B resolves it to the producer's version; different content becomes a new version,
        which is the truth). Online this is W&B's documented ``run.use_artifact(<draft artifact>)``. Offline,
        ``run.use_artifact`` refuses to run (wandb 0.31), so the same record it would send is written to the
        offline run: an artifact record with ``use_after_commit`` that ``wandb sync`` replays as log + use.
        Files are referenced in place (``policy="immutable"``): a stage's inputs are not rewritten under it.
        """
        def _do():
            art = build_artifact(name, type, path, metadata, policy="immutable")
            if self.offline:  # what run.use_artifact(draft) does online, minus its offline refusal (wandb 0.31)
                self.run._log_artifact(art, aliases=[], is_user_created=True, use_after_commit=True)
            else:
                self.run.use_artifact(art)
            return art

        return self._safe("use_artifact", _do)

    def link_artifact(self, artifact: Any, target: str, aliases: list[str]) -> None:
        """Link a logged *artifact* to the registry collection *target* (``wandb-registry-<registry>/<collection>``,
        or ``<project>/<collection>`` for the legacy model registry) under *aliases*.

        Online: ``run.link_artifact``, as W&B documents. Offline, wandb 0.31 raises NotImplementedError and writes
        nothing, so the link is recorded in the run's summary under ``registry/links`` (artifact name, type,
        digest, target, aliases); after ``wandb sync``, :func:`link_pending` makes those links on the server.
        """
        if artifact is None:
            return

        def _do():
            if not self.offline:
                self.run.link_artifact(artifact, target_path=target, aliases=list(aliases))
                return
            self._links.append({"artifact": artifact.name.split(":")[0], "type": artifact.type,
                                "digest": artifact.digest, "target": target, "aliases": list(aliases)})
            self.run.summary.update({"registry/links": list(self._links)})

        self._safe("link_artifact", _do)

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


def checkpoint_artifact(arch: str, seed: int) -> str:
    """W&B name of a run's checkpoints (best.pt + last.pt, optimizer state included; type ``checkpoint``)."""
    return f"checkpoint-{arch}-seed{seed}"


def model_artifact(arch: str, seed: int) -> str:
    """W&B name of "the model" of a run: the weights evaluate scored (safetensors + timm config; type ``model``)."""
    return f"model-{arch}-seed{seed}"


PROMOTED_ARTIFACT = "model-promoted"  # compare's promoted bundle (models/best), linked into the registry
PROMOTED_ALIAS = "best"  # the registry alias of the promoted model


def build_artifact(name: str, type: str, files: ArtifactFiles, metadata: Optional[dict] = None,
                   policy: str = "mutable") -> Any:
    """A draft ``wandb.Artifact`` of *files*: one file, a folder (every file under it, relative names), or a
    ``{name in the artifact: local file}`` mapping (so producer and consumer name the same files alike)."""
    import wandb

    art = wandb.Artifact(name=name, type=type, metadata=metadata or {})
    if isinstance(files, Mapping):
        for entry, local in sorted(files.items()):
            art.add_file(str(local), name=entry, policy=policy)
    elif Path(files).is_dir():
        art.add_dir(str(files), policy=policy)
    else:
        art.add_file(str(files), policy=policy)
    return art


def link_pending(run_path: str) -> list[str]:
    """Make the registry links an offline run recorded (``registry/links`` in its summary, see
    :meth:`Tracker.link_artifact`) once it is synced: ``wandb sync <run folder>``, then
    ``python -c "from cvpipe.core.tracking import link_pending; link_pending('<entity>/<project>/<run id>')"``.

    Each link names the artifact by name and digest; the version the run logged with that digest is linked.
    Returns the linked ``target:alias`` strings. Needs W&B credentials (``WANDB_API_KEY``).
    """
    import wandb

    api = wandb.Api()
    run = api.run(run_path)
    done = []
    for link in run.summary.get("registry/links") or []:
        matches = [a for a in run.logged_artifacts() if a.name.split(":")[0] == link["artifact"] and a.digest == link["digest"]]
        if not matches:
            raise RuntimeError(f"run {run_path} logged no artifact {link['artifact']} with digest {link['digest']}")
        matches[0].link(link["target"], aliases=link["aliases"])
        done += [f"{link['target']}:{alias}" for alias in link["aliases"]]
    return done


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
