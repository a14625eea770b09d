"""Recipe bench: `cvpipe init` + `dvc repro` against the same loop with timm train.py's defaults.

    CVPIPE_REAL_DATA=../shared/data python bench/recipe.py [--digits-budget 1.5 --hymenoptera-budget 3] [--seeds 3] [--first-seed 45]

For each dataset (the built-in digits sample, and hymenoptera_data from scratch since no
pretrained weights can be downloaded here), two scratch git+DVC repositories, side by side:

* ``recipe``             ``cvpipe init SOURCE --time-budget B --max-archs 1``, then ``dvc repro``.
                         No params edited by hand.
* ``imagenet_defaults``  the same params.yaml with every training hyper-parameter that timm's
                         ``train.py`` defaults set replaced by those defaults (through params,
                         the same loop, the same time budget): SGD, momentum 0.9, weight decay
                         2e-5, LR rule 0.1 x batch/256 (batch 128), 5 warmup epochs, cosine to
                         0, label smoothing 0.1, RandomResizedCrop scale 0.08-1 / ratio 3/4-4/3,
                         horizontal flip 0.5, colour jitter 0.4, no dropout, no EMA, at most 300
                         epochs, and the checkpoint with the best validation top-1 is the one
                         tested (train.py's ``model_best``). The image
                         size stays the recipe's (timm would use the model's 224 px, which on a
                         CPU would only cost the baseline more epochs within the budget): the
                         comparison is of hyper-parameters, not of resolution.

Test accuracy from ``metrics/<arch>/seed<seed>/evaluate.json``; wall time is the whole ``dvc repro``
(ingest, preprocess, train within its budget, evaluate with exports, compare) of the first
seed. ``--seeds N`` trains each side N times (``bakeoff.seeds: [seed]``, seed+1, ...: each
``dvc repro`` runs only the new seed's cell; same split), and the
accuracies reported are the means (each run is in ``details``): on ~150 test images one
image is 0.65 points, and one seed's luck can be larger than the difference measured.
Prints one JSON object as its last line: ``recipe_acc``, ``imagenet_defaults_acc`` and
``wall_s`` per dataset, the accuracy ``margin`` (recipe - defaults) and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from repo_files import copy_pipeline  # noqa: E402  (what dvc repro needs, derived from dvc.yaml)
from _common import write_params  # noqa: E402  (bench/ is on sys.path)


def timm_defaults(image_size: int) -> dict:
    """timm train.py's defaults (v1.0 argparse) expressed as cvpipe params overrides."""
    batch = 128
    return {
        "train.optimizer": "sgd", "train.momentum": 0.9, "train.weight_decay": 2e-5,
        "train.batch_size": batch, "train.lr": 0.1 * batch / 256,  # --lr-base 0.1 --lr-base-size 256, linear for SGD
        "train.scheduler": "cosine", "train.warmup_epochs": 5, "train.min_lr": 0.0, "train.epochs": 300,
        "train.label_smoothing": 0.1, "train.mixup_alpha": 0.0, "train.cutmix_alpha": 0.0, "train.ema": False,
        "train.drop_rate": 0.0, "train.drop_path_rate": 0.0,
        "train.layer_decay": None, "train.head_lr": None, "train.class_balance": "none",
        # train.py keeps model_best by validation top-1 (--eval-metric top1), no EMA (--model-ema off)
        "train.monitor": "val_acc", "evaluate.checkpoint": "best", "evaluate.weights": "model",
        "augment.train": [
            {"RandomResizedCrop": {"size": [image_size, image_size], "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}},
            {"HorizontalFlip": {"p": 0.5}},
            {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0, "p": 1.0}},
        ],
    }


def env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1", "PATH": bindir + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": os.pathsep.join(p for p in [str(REPO / "src"), os.environ.get("PYTHONPATH", "")] if p)}


def run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def scratch_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    copy_pipeline(path)
    run(["git", "init", "-q"], path)
    run([sys.executable, "-m", "dvc", "init", "-q"], path)
    return path


def one(name: str, source: str, budget: float, work: Path, seeds: int = 1, first_seed: int | None = None) -> dict:
    recipe = scratch_repo(work / f"{name}-recipe")
    run([sys.executable, "-m", "cvpipe", "init", source, "--time-budget", str(budget), "--max-archs", "1"], recipe)
    params = yaml.safe_load((recipe / "params.yaml").read_text())
    arch = params["train"]["arch"]
    base = scratch_repo(work / f"{name}-imagenet-defaults")
    write_params(base, timm_defaults(params["preprocess"]["image_size"]), base=recipe / "params.yaml")  # the recipe's, timm's values set
    out: dict = {"arch": arch, "image_size": params["preprocess"]["image_size"], "time_budget_minutes": budget}
    init_seed = int(params["bakeoff"]["seeds"][0])  # the seed cvpipe init wrote (42: the default bakeoff.seeds)
    if first_seed is None:
        first_seed = init_seed
    for label, repo in (("recipe", recipe), ("imagenet_defaults", base)):
        runs = []
        for k in range(seeds):  # further seeds run only the new train@/evaluate@ cell and compare (same split)
            seed = first_seed + k
            if k or first_seed != init_seed:
                write_params(repo, {"bakeoff.seeds": [seed]}, base=repo / "params.yaml")
            wall = run([sys.executable, "-m", "dvc", "repro"], repo)
            ev = json.loads((repo / "metrics" / arch / f"seed{seed}" / "evaluate.json").read_text())
            tr = json.loads((repo / "reports" / arch / f"seed{seed}" / "train.json").read_text())
            runs.append({"seed": first_seed + k, "acc": ev["accuracy"], "macro_f1": ev.get("macro_f1"), "wall_s": round(wall, 1),
                         "train_s": tr["seconds"], "epochs": tr["epochs_run"],
                         "budget_spent_s": tr.get("time_budget", {}).get("spent_s")})
            print(f"{name} {label} seed {first_seed + k}: acc {ev['accuracy']:.4f} in {wall:.0f}s ({tr['epochs_run']} epochs)",
                  file=sys.stderr, flush=True)
        accs = [r["acc"] for r in runs]
        out[label] = {"acc": round(sum(accs) / len(accs), 4), "accs": accs, "n_test": ev.get("n_test"),
                      "wall_s": runs[0]["wall_s"], "runs": runs,
                      "lr": yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"]}
    return out


def machine() -> dict:
    import torch

    from cvpipe.torchkit.runtime import cpu_model, cpu_supports_bf16

    cpu = cpu_model() or platform.machine()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "cpu_bf16": cpu_supports_bf16(), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits-budget", type=float, default=1.5, help="train.time_budget_minutes for the digits")
    ap.add_argument("--hymenoptera-budget", type=float, default=3.0, help="train.time_budget_minutes for hymenoptera_data")
    ap.add_argument("--seeds", type=int, default=1,
                    help="training seeds per side (bakeoff.seeds: seed, seed+1, ...; the split stays fixed); accuracies are averaged")
    ap.add_argument("--first-seed", type=int, default=None,
                    help="seed of the first run (default: the bakeoff.seeds cvpipe init writes, [42]); to add seeds to an earlier run")
    ap.add_argument("--datasets", default="digits,hymenoptera", help="comma-separated subset of digits,hymenoptera")
    ap.add_argument("--keep", action="store_true", help="keep the scratch repositories")
    args = ap.parse_args()
    data = os.environ.get("CVPIPE_REAL_DATA")
    if not data or not (Path(data) / "hymenoptera_data").is_dir():
        sys.exit("set CVPIPE_REAL_DATA to the folder holding hymenoptera_data/")
    sys.path.insert(0, str(REPO / "src"))
    work = Path(tempfile.mkdtemp(prefix="cvpipe-recipe-bench-"))
    try:
        sources = {"digits": ("sample://digits", args.digits_budget),
                   "hymenoptera": (str(Path(data) / "hymenoptera_data"), args.hymenoptera_budget)}
        results = {name: one(name, *sources[name], work, args.seeds, args.first_seed) for name in args.datasets.split(",")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "recipe_acc": {k: v["recipe"]["acc"] for k, v in results.items()},
        "imagenet_defaults_acc": {k: v["imagenet_defaults"]["acc"] for k, v in results.items()},
        "wall_s": {k: {"recipe": v["recipe"]["wall_s"], "imagenet_defaults": v["imagenet_defaults"]["wall_s"]} for k, v in results.items()},
        "margin": {k: round(v["recipe"]["acc"] - v["imagenet_defaults"]["acc"], 4) for k, v in results.items()},
        "time_budget_minutes": {k: v["time_budget_minutes"] for k, v in results.items()},
        "details": results,
        "machine": machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
