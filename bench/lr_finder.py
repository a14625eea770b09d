"""LR finder bench: the range test's suggestion against the best LR of a training grid, over seeds.

    python bench/lr_finder.py [--seeds 2] [--first-seed 42] [--lrs 0.01,0.03,0.1,0.3] [--epochs 3] [--lr-steps 100]

On the built-in digits sample (1,797 scans, ingested and preprocessed once at the repository's
32 px), the repository's params.yaml recipe (resnet18 from scratch, Nesterov SGD, batch 64),
without EMA, the checkpoint ranked by its own validation accuracy (an EMA lags too far behind
in a few epochs to rank LRs), for each seed (train.seed = first seed, +1, ...; the split stays
fixed):

* ``suggestions``  ``cvpipe train --find-lr --lr-steps N`` (range 1e-5..1, the CLI's default):
                   the suggested train.lr (steepest descent of the smoothed loss).
* ``grid``         ``cvpipe train --lr LR --epochs E`` for each LR of ``--lrs`` (1 warmup epoch,
                   cosine): the best validation accuracy and loss (reports/<arch>/seed<seed>/train.json).

The best grid LR is the one with the highest validation accuracy averaged over the seeds (ties:
lower mean validation loss); ``best_lr_per_seed`` ranks each seed alone. ``ratio`` per seed is
max(suggestion, best_lr) / min(suggestion, best_lr): 1 is a perfect pick, and the old test's bar
was 3. Both the range test's curve and the grid's accuracies rest on the CPU's bf16 kernels
(oneDNN picks them per ISA), so the machine is part of the result: an Intel Xeon and an AMD EPYC
do not rank the grid the same way.

Prints one JSON object as its last line: ``suggestions`` and ``ratio`` (per seed), ``grid_acc``
(per lr, per seed), ``best_lr``, ``best_lr_per_seed``, ``max_ratio``, the settings and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


from _common import cvpipe, write_params  # noqa: E402  (bench/ is on sys.path; it puts src there too)


def prepare_digits(work: Path) -> Path:
    root = work / "data-project"
    write_params(root, {"ingest.source": "sample://digits", "ingest.workers": 1, "preprocess.workers": 1})
    cvpipe(["ingest", "-q"], root)
    cvpipe(["preprocess", "-q"], root)
    return root / "data" / "prepared"


def project(folder: Path, prepared: Path, arch: str, seed: int, epochs: int) -> Path:
    # bakeoff.archs.<arch> emptied: the repository's per-arch overrides must not differ between the range test and the grid
    write_params(folder, {"paths.prepared": str(prepared), "train.arch": arch, "train.seed": seed, "train.batch_size": 64,
                          "train.workers": 0, "train.warmup_epochs": 1, "train.epochs": epochs, "train.ema": False,
                          "train.monitor": "val_acc", "train.time_budget_minutes": None, "wandb.mode": "disabled",
                          "bakeoff.archs": {arch: {}}})
    return folder


def machine() -> dict:
    import torch

    from cvpipe.torchkit.runtime import cpu_model, cpu_supports_bf16

    return {"cpu": cpu_model() or platform.machine(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "cpu_bf16": cpu_supports_bf16(),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="train.seed values (first seed, +1, ...): one range test and one grid each")
    ap.add_argument("--first-seed", type=int, default=42, help="train.seed of the first run (42: the TrainParams default)")
    ap.add_argument("--lrs", default="0.01,0.03,0.1,0.3", help="comma-separated train.lr grid")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each grid run (1 of warmup, then cosine)")
    ap.add_argument("--lr-steps", type=int, default=100, help="updates of each range test (cvpipe train --lr-steps)")
    ap.add_argument("--arch", default="resnet18", help="train.arch (the digits recipe's)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed on stderr)")
    args = ap.parse_args()
    grid = [float(v) for v in args.lrs.split(",")]
    seeds = [args.first_seed + k for k in range(args.seeds)]
    work = Path(tempfile.mkdtemp(prefix="cvpipe-lr-finder-bench-"))
    print(f"scratch folder: {work}", file=sys.stderr, flush=True)
    suggestions, finder, scores = {}, {}, {lr: {} for lr in grid}
    t0 = time.perf_counter()
    try:
        prepared = prepare_digits(work)
        for seed in seeds:
            folder = project(work / f"find-lr-{seed}", prepared, args.arch, seed, args.epochs)
            wall = cvpipe(["train", "--find-lr", "--lr-steps", str(args.lr_steps), "-q"], folder)
            result = json.loads((folder / "metrics" / args.arch / f"seed{seed}" / "lr_finder.json").read_text())
            suggestions[seed] = result["suggested"]
            finder[seed] = {"steps_run": result["steps_run"], "min_loss_lr": result["min_loss_lr"], "wall_s": round(wall, 1)}
            print(f"seed {seed}: suggested {result['suggested']:.3g} ({result['steps_run']} steps, {wall:.0f}s)", file=sys.stderr, flush=True)
            for lr in grid:
                folder = project(work / f"grid-{seed}-{lr:g}", prepared, args.arch, seed, args.epochs)
                wall = cvpipe(["train", "--lr", repr(lr), "-q"], folder)
                tr = json.loads((folder / "reports" / args.arch / f"seed{seed}" / "train.json").read_text())
                scores[lr][seed] = {"acc": tr["best_val_acc"], "loss": tr["best_val_loss"], "epochs": tr["epochs_run"], "wall_s": round(wall, 1)}
                print(f"seed {seed} lr {lr:g}: val acc {tr['best_val_acc']:.4f}, val loss {tr['best_val_loss']:.4f} ({wall:.0f}s)",
                      file=sys.stderr, flush=True)
                shutil.rmtree(folder / "models", ignore_errors=True)  # checkpoints are not needed: keep the disk small
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    best_lr = max(grid, key=lambda lr: (mean(s["acc"] for s in scores[lr].values()), -mean(s["loss"] for s in scores[lr].values())))
    best_per_seed = {seed: max(grid, key=lambda lr: (scores[lr][seed]["acc"], -scores[lr][seed]["loss"])) for seed in seeds}
    ratio = {seed: round(max(suggestions[seed], best_lr) / min(suggestions[seed], best_lr), 3) for seed in seeds}
    summary = {
        "suggestions": {str(s): round(v, 5) for s, v in suggestions.items()},
        "grid_acc": {f"{lr:g}": {str(s): v["acc"] for s, v in scores[lr].items()} for lr in grid},
        "grid_mean_acc": {f"{lr:g}": round(mean(v["acc"] for v in scores[lr].values()), 6) for lr in grid},
        "best_lr": best_lr,
        "best_lr_per_seed": {str(s): v for s, v in best_per_seed.items()},
        "ratio": {str(s): v for s, v in ratio.items()},
        "max_ratio": max(ratio.values()),
        "settings": {"arch": args.arch, "seeds": seeds, "lrs": grid, "epochs": args.epochs, "lr_steps": args.lr_steps,
                     "batch_size": 64, "dataset": "sample://digits"},
        "details": {"finder": {str(s): v for s, v in finder.items()},
                    "grid": {f"{lr:g}": {str(s): v for s, v in scores[lr].items()} for lr in grid}},
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
