"""The ``cvpipe`` command line.

Every stage command reads params.yaml (``--params``), applies overrides (its own
flags and any ``--set section.key=value``), validates everything, then runs.
Exit codes: 0 success, 2 bad usage or bad params (nothing written), 1 the stage
failed. Errors print one line; ``--debug`` (or ``CVPIPE_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import inspect
import os
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from cvpipe import __version__
from cvpipe.core.config import DEFAULT_PARAMS_FILE, Params, load_params, parse_override
from cvpipe.core.console import console, info, route_warnings, set_quiet
from cvpipe.core.errors import CvpipeError, ParamsError, StageError

app = typer.Typer(
    name="cvpipe",
    help="Reproducible computer-vision fine-tuning: ingest -> preprocess -> train -> evaluate -> compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = bool(os.environ.get("CVPIPE_DEBUG"))

# -- options shared by every stage command ------------------------------------------------
ParamsOpt = typer.Option(
    Path(DEFAULT_PARAMS_FILE), "--params", "-p", help="params.yaml to read (all sections are validated).",
    dir_okay=False,
)
SetOpt = typer.Option(
    None, "--set", "-S", metavar="KEY=VALUE",
    help="Override any param, e.g. -S train.epochs=3 (value parsed as YAML). Repeatable.",
)
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or tables (for CI logs).")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")


def _load(params_path: Path, sets: Optional[list[str]], flags: dict[str, Any]) -> Params:
    overrides: dict[str, Any] = {}
    for item in sets or []:
        k, v = parse_override(item)
        overrides[k] = v
    overrides.update({k: v for k, v in flags.items() if v is not None})
    explicit = params_path != Path(DEFAULT_PARAMS_FILE)
    return load_params(params_path if (explicit or params_path.exists()) else None, overrides)


def _explicit_train_keys(sets: Optional[list[str]], flags: dict[str, Any]) -> frozenset[str]:
    """train.* keys given on the command line: they win over bakeoff.archs.<arch> overrides."""
    keys = [parse_override(item)[0] for item in sets or []] + [k for k, v in flags.items() if v is not None]
    return frozenset(k.split(".", 1)[1] for k in keys if k.startswith("train.") and k.count(".") == 1)


def _stage(quiet: bool, debug: bool, fn: Callable[[], Any]) -> None:
    """Run a stage body, turning errors into one line and an exit code.

    Usage errors of the command line itself (unknown option, wrong type) are
    handled by typer before this point and exit with code 2.
    """
    global _debug
    _debug = _debug or debug
    set_quiet(quiet)
    try:
        fn()
    except CvpipeError as exc:
        if _debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # a value may look like markup
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # unexpected: still one line unless --debug
        if _debug:
            traceback.print_exc()
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)", soft_wrap=True)
        raise typer.Exit(1) from None


@dataclass
class _Frame:
    """What the shared options of a stage command (``--params``, ``--set``, ``--quiet``) give its body."""

    params_path: Path
    sets: Optional[list[str]]
    quiet: bool

    def load(self, flags: dict[str, Any]) -> Params:
        """The params file (or the defaults) with ``--set`` and the command's own *flags* applied, validated."""
        return _load(self.params_path, self.sets, flags)

    def for_arch(self, p: Params, flags: dict[str, Any]) -> Params:
        """*p* with the ``bakeoff.archs.<arch>`` overrides of its ``train.arch``; ``train.*`` keys given
        on the command line (``--set`` or these *flags*) still win."""
        return p.for_arch(p.train.arch, keep=_explicit_train_keys(self.sets, flags))


_SHARED = (("params", Path, ParamsOpt), ("set_", Optional[list[str]], SetOpt), ("quiet", bool, QuietOpt),
           ("debug", bool, DebugOpt))


def _stage_command(body: Callable[..., None]) -> Callable[..., None]:
    """Register *body* as the command of its name: its own options (every parameter after the first), then
    the shared ``--params``/``--set``/``--quiet``/``--debug``; it gets a :class:`_Frame` first and runs
    inside :func:`_stage` (one-line errors, exit codes)."""
    own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann) for name, ann, opt in _SHARED]

    def command(*, params: Path, set_: Optional[list[str]], quiet: bool, debug: bool, **options: Any) -> None:
        _stage(quiet, debug, lambda: body(_Frame(params, set_, quiet), **options))

    command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__qualname__, body.__doc__
    command.__signature__ = inspect.Signature(own + shared, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in own + shared}
    app.command()(command)
    return body


def _print_version(value: bool) -> None:
    """``--version``: runs while the options are parsed (eager), so no command is needed; the root
    callback's body would only run after click had already failed with 'Missing command'."""
    if value:
        console.print(f"cvpipe {__version__}", markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version, expose_value=False),
) -> None:
    route_warnings()


@app.command()
def init(
    source: list[str] = typer.Argument(
        ..., metavar="SOURCE", show_default=False,
        help="What ingest.source accepts: a class-folder path (train/ val/ test/ layouts too), gs://bucket/prefix, "
        "an http(s) .zip/.tar(.gz) URL, a CSV/JSONL manifest of uri,label rows, or sample://digits. Several are combined.",
    ),
    params: Path = typer.Option(
        Path(DEFAULT_PARAMS_FILE), "--params", "-p", dir_okay=False,
        help="params.yaml to write (complete: every section, each choice with its reason as a comment).",
    ),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", metavar="MIN",
        help="Minutes of training per architecture (train.time_budget_minutes): epochs are planned from measured "
        "throughput and train.epochs becomes a generous cap. Default: no budget, epochs from the dataset size.",
    ),
    max_archs: int = typer.Option(3, "--max-archs", min=1, help="Most architectures in the bake-off (bakeoff.archs)."),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="timm architecture to put first in the bake-off (required with --pretrained-path: the weights' architecture)."
    ),
    pretrained: bool = typer.Option(
        False, "--pretrained", help="Fine-tune timm hub weights (train.pretrained; the train machine needs network): pretrained LR rule."
    ),
    pretrained_path: Optional[str] = typer.Option(
        None, "--pretrained-path", metavar="PATH",
        help="Fine-tune these .safetensors/.pth weights (local or gs://; give --arch): pretrained LR rule, layer decay, 10x head LR.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing params file (otherwise exit 2, file untouched)."),
    scan_limit: int = typer.Option(
        2000, "--scan-limit", min=1,
        help="Files whose bytes are read (header for the resolution, hash for duplicates), spread over the listing; every file is counted.",
    ),
    no_flip: bool = typer.Option(False, "--no-flip", help="No horizontal flips: for text, digits, signs, anything a mirror changes."),
    estimate: bool = typer.Option(
        True, "--estimate/--no-estimate",
        help="Time a few training steps of each planned architecture and say how long `dvc repro` takes here.",
    ),
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Scan a dataset and this machine, write a params.yaml whose first `dvc repro` is a strong baseline."""
    def go():
        from cvpipe.init import stage
        from cvpipe.init.recipe import RecipeOptions

        options = RecipeOptions(
            time_budget_minutes=time_budget, max_archs=max_archs, arch=arch, pretrained=pretrained,
            pretrained_path=pretrained_path, no_flip=no_flip,
        )
        command = " ".join(["cvpipe", *(shlex.quote(a) for a in sys.argv[1:])])
        stage.run(list(source), params, options, command=command, force=force, scan_limit=scan_limit, estimate=estimate)

    _stage(quiet, debug, go)


@_stage_command
def ingest(
    cli: _Frame,
    source: Optional[list[str]] = typer.Option(
        None, "--source", help="Override ingest.source: a class-folder path, gs://bucket/prefix, an http(s) .zip/.tar(.gz) URL, a CSV/JSONL manifest of uri,label rows, or sample://digits. Repeatable."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Override paths.raw (where images and manifest go)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Override ingest.workers (0 = one per core)."),
) -> None:
    """Collect raw images, validate each one, quarantine the bad ones with a reason, write the manifest."""
    src: Any = None if not source else (source[0] if len(source) == 1 else list(source))
    p = cli.load({"ingest.source": src, "paths.raw": out, "ingest.workers": workers})
    from cvpipe.ingest import stage

    stage.run(p)


@_stage_command
def preprocess(
    cli: _Frame,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Override preprocess.image_size (pixels, >= 16)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Override preprocess.workers (0 = one per core)."),
    out: Optional[str] = typer.Option(None, "--out", help="Override paths.prepared."),
) -> None:
    """Resize, split (seeded, stratified) and write the memory-mapped training format."""
    p = cli.load({"preprocess.image_size": image_size, "preprocess.workers": workers, "paths.prepared": out})
    from cvpipe.preprocess import stage

    stage.run(p)


@_stage_command
def train(
    cli: _Frame,
    arch: Optional[str] = typer.Option(None, "--arch", help="Override train.arch: any timm architecture name."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Override train.seed: the run's folder is <arch>/seed<seed> (bakeoff.seeds lists dvc.yaml's)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override train.epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override train.batch_size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Override train.lr (peak learning rate)."),
    device: Optional[str] = typer.Option(None, "--device", help="Override train.device: auto, cpu, cuda, cuda:N, mps."),
    resume: bool = typer.Option(False, "--resume", help="Continue models/<arch>/seed<seed>/last.pt (and its W&B run) even if params changed."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine (runs torchrun --nproc_per_node N)."),
    find_lr: bool = typer.Option(
        False, "--find-lr",
        help="Run a learning-rate range test instead of training: plots/<arch>/seed<seed>/lr_finder.png, metrics/<arch>/seed<seed>/lr_finder.json "
        "and a suggested train.lr (where the smoothed loss falls fastest).",
    ),
    write_lr: bool = typer.Option(
        False, "--write-lr",
        help="With --find-lr: write the suggestion into --params (bakeoff.archs.<arch>.lr when the arch is listed there, else train.lr).",
    ),
    lr_min: float = typer.Option(1e-5, "--lr-min", help="With --find-lr: first LR of the range test."),
    lr_max: float = typer.Option(1.0, "--lr-max", help="With --find-lr: last LR (the test stops earlier when the loss diverges)."),
    lr_steps: int = typer.Option(100, "--lr-steps", min=20, help="With --find-lr: updates over the LR range."),
) -> None:
    """Fine-tune (or train from scratch) a timm model; save best/last checkpoints; log to W&B."""
    flags = {"train.arch": arch, "train.seed": seed, "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr, "train.device": device}
    if write_lr and not find_lr:
        raise ParamsError("--write-lr: only with --find-lr")
    # bakeoff.archs.<arch> overrides, if the arch is listed there (command-line train.* flags still win)
    p = cli.for_arch(cli.load(flags), flags)
    if find_lr:
        from cvpipe.train import lr_finder

        result = lr_finder.run(p, lr_min=lr_min, lr_max=lr_max, steps=lr_steps)
        if write_lr:
            key = lr_finder.write_lr(cli.params_path, p.train.arch, result["suggested"])
            _load(cli.params_path, None, {})  # the edited file must still validate
            info(f"wrote {key} = {result['suggested']:.2g} to {cli.params_path}")
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_torchrun(nproc, p)
        return
    from cvpipe.train import stage

    stage.run(p, resume=resume)


def _relaunch_torchrun(nproc: int, p: Params) -> None:
    """Run this same command under ``torchrun --standalone --nproc_per_node N`` (params validated first)."""
    from cvpipe.train.distributed import torchrun_command

    if p.train.batch_size % nproc:
        raise ParamsError(f"train.batch_size: {p.train.batch_size} must be divisible by --nproc {nproc}")
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    rc = subprocess.run(torchrun_command(nproc, argv), env=env).returncode
    if rc != 0:
        raise StageError(f"distributed training with {nproc} processes failed (exit code {rc})")


@_stage_command
def vertex_job(
    cli: _Frame,
    arch: Optional[str] = typer.Option(None, "--arch", help="Override train.arch (its bakeoff.archs overrides apply, as in `cvpipe train`)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override train.seed."),
    image: Optional[str] = typer.Option(None, "--image", help="Override vertex.image_uri: the train image in Artifact Registry."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Override vertex.nodes: machines in the job."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the spec here (local or gs://) instead of stdout."),
) -> None:
    """Write a Vertex AI custom job spec (YAML, for `gcloud ai custom-jobs create --config`) that runs `cvpipe train`
    from the train image with these params on vertex.nodes machines (torchrun, c10d rendezvous)."""
    flags = {"train.arch": arch, "train.seed": seed, "vertex.image_uri": image, "vertex.nodes": nodes}
    p = cli.for_arch(cli.load(flags), flags)
    from cvpipe.train import vertex

    vertex.write(vertex.job_spec(p), out)
    if out is not None:
        info(f"wrote the Vertex AI job spec for {p.run_name} on {p.vertex.nodes} node(s) to {out}")


@_stage_command
def evaluate(
    cli: _Frame,
    arch: Optional[str] = typer.Option(None, "--arch", help="Override train.arch: which trained model to evaluate."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Override train.seed: evaluates models/<arch>/seed<seed>/."
    ),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Override evaluate.checkpoint: best or last."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override evaluate.batch_size."),
) -> None:
    """Test-split metrics, calibration, mistakes gallery, model cost, TorchScript/ONNX export with parity; log to W&B."""
    p = cli.load({"train.arch": arch, "train.seed": seed, "evaluate.checkpoint": checkpoint, "evaluate.batch_size": batch_size})
    from cvpipe.evaluate import stage

    stage.run(cli.for_arch(p, {"train.seed": seed}))


@_stage_command
def audit(
    cli: _Frame,
    folds: Optional[int] = typer.Option(None, "--folds", help="Override audit.folds: cross-fitting folds."),
) -> None:
    """Suspected label errors in train+val (cleanlab on cross-fitted probabilities): reports/label_issues.csv."""
    p = cli.load({"audit.folds": folds})
    from cvpipe.audit import stage

    stage.run(p)


@_stage_command
def compare(
    cli: _Frame,
    metric: Optional[str] = typer.Option(None, "--metric", help="Override compare.metric: accuracy, macro_f1, weighted_f1, roc_auc, top_k_accuracy."),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Override compare.max_latency_ms."),
    max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", help="Override compare.max_size_mb."),
    cost: Optional[str] = typer.Option(
        None, "--cost", help="Override compare.cost: latency_ms, size_mb or gflops (promotes the cheapest model tied with the best)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Override compare.alpha (significance level of the paired tests)."),
) -> None:
    """Leaderboard (mean and interval over seeds) + Pareto plot of the evaluated bake-off; test the best against the
    others on the same test images and promote the cheapest model tied with it to models/best/."""
    p = cli.load({"compare.metric": metric, "compare.max_latency_ms": max_latency_ms, "compare.max_size_mb": max_size_mb,
                  "compare.cost": cost, "compare.alpha": alpha})
    from cvpipe.compare import stage

    stage.run(p)


@_stage_command
def serve(
    cli: _Frame,
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Override serve.model: a promoted model folder (models/best) or a train checkpoint (.pt); local or gs://.",
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Override serve.host (0.0.0.0 to listen on every interface)."),
    port: Optional[int] = typer.Option(None, "--port", help="Override serve.port."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Override serve.top_k."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="Override serve.backend: auto (onnxruntime for a folder with a uint8-pixel model.onnx, "
        "else torch), onnx or torch.",
    ),
    review: Optional[bool] = typer.Option(
        None, "--review/--no-review",
        help="Override serve.review: mount the label review page /review over the audit's suspects.",
    ),
    abstain_below: Optional[float] = typer.Option(
        None, "--abstain-below",
        help="Override serve.abstain_below: answer 'unsure' (label null, with the top-k) when the calibrated top-1 "
        "probability is below this, in [0, 1); 0 = never.",
    ),
) -> None:
    """Serve a trained model: web page at /, POST /predict, GET /model, GET /healthz, API docs at /docs."""
    p = cli.load({"serve.model": model, "serve.host": host, "serve.port": port, "serve.top_k": top_k,
                  "serve.review": review, "serve.backend": backend, "serve.abstain_below": abstain_below})
    import uvicorn

    from cvpipe.serve import memory
    from cvpipe.serve.app import create_app
    from cvpipe.serve.guards import ServeLimits, uvicorn_options
    from cvpipe.serve.model import load_model
    from cvpipe.serve.review import ReviewStore

    memory.tune_malloc()  # before uvicorn's threads: freed image buffers go back to the system
    s = p.serve
    review_store = ReviewStore.from_params(p) if s.review else None  # before the model: a bad setting fails fast
    served = load_model(s.model, device=s.device, metrics_dir=p.paths.metrics, plots_dir=p.paths.plots,
                        reports_dir=p.paths.reports, torch_threads=s.torch_threads, backend=s.backend, onnx_threads=s.onnx_threads,
                        concurrent_runs=1 if s.batch_window_ms > 0 else s.inference_threads)  # the batcher: one run at a time
    console.print(  # served.source: the model URL without its credentials
        f"serving {served.arch} ({len(served.classes)} classes) from {served.source} on {served.backend.name} "
        f"at http://{s.host}:{s.port}/"
        + (f", unsure below {s.abstain_below:g} (temperature {served.temperature.text})" if s.abstain_below > 0 else ""),
        soft_wrap=True, markup=False,
    )
    limits = ServeLimits.from_params(s)  # idle/header timeouts, request and connection caps: cvpipe.serve.guards
    uvicorn.run(
        create_app(served, s, limits, review=review_store), host=s.host, port=s.port,
        log_level="warning" if cli.quiet else "info", timeout_graceful_shutdown=5, **uvicorn_options(limits),
    )


def main() -> None:
    """Entry point (``cvpipe``)."""
    if "--debug" in sys.argv[1:]:
        global _debug
        _debug = True
    app(prog_name="cvpipe")


if __name__ == "__main__":  # pragma: no cover
    main()
