"""GPU training bench: img/s and model FLOPs utilization (MFU) of `cvpipe train` against a bare torch loop.

    python bench/gpu.py                       # on a CUDA machine: resnet50, convnext_tiny, vit_small_patch16_224
    python bench/gpu.py --archs resnet50 --batch 256 --images 8192
    python bench/gpu.py --dry-run-cpu         # the same code path on CPU: a tiny model, 32 px, one step
    CVPIPE_GPU_PEAK_TFLOPS=989 python bench/gpu.py   # a GPU the peak table does not know

For each architecture, at 224 px with bf16 autocast and channels_last, with and without ``torch.compile``
(``train.compile``), side by side:

* ``cvpipe``  ``cvpipe train`` end to end (the real CLI: memory-mapped prepared dataset, DataLoader workers,
              albumentations flip, on-device normalization, AdamW, label smoothing, the epoch's bookkeeping),
              training img/s of its last epoch (``history.csv``; the first epochs absorb compilation and warm-up).
              EMA, mixup and the time budget are off, so both loops do the same math.
* ``bare``    the same model (``cvpipe.torchkit.models.create``), optimizer, loss, precision and memory format
              stepping on one batch of tensors already on the GPU: the ceiling. ``ratio`` = cvpipe / bare
              shows what cvpipe's data pipeline and loop cost.
* ``--nproc`` with two or more GPUs, ``cvpipe train --nproc <all GPUs>`` (DDP, the same per-GPU batch).

MFU = FLOPs of one training image (``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward)
x img/s / (the GPU's dense bf16 peak x GPUs). The peak comes from ``PEAK_BF16_TFLOPS`` by
``torch.cuda.get_device_name`` or from ``CVPIPE_GPU_PEAK_TFLOPS``; unknown, MFU is null.

The data: random uint8 images written by the project's own prepared-dataset writer
(``cvpipe.data.prepared.SplitWriter`` / ``write_meta``), the format ``cvpipe preprocess`` writes.
Without CUDA it prints one line saying so and a JSON line ``{"skipped": "no CUDA", ...}`` (exit 0).
Never part of the tests. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import cvpipe, machine, write_params  # noqa: E402  (bench/ is on sys.path)

ARCHS = ["resnet50", "convnext_tiny", "vit_small_patch16_224"]
SEED = 42
CLASSES = 10
PEAK_ENV = "CVPIPE_GPU_PEAK_TFLOPS"
# Dense bf16 tensor-core peak (TFLOPS, no sparsity) by a substring of torch.cuda.get_device_name(), most specific
# first (NVIDIA data sheets). H100 SXM is sold as "H100 80GB HBM3".
PEAK_BF16_TFLOPS = [
    ("GH200", 989.4), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 6000 Ada", 364.0), ("A6000", 154.8),
]


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """The dense bf16 peak of one GPU and where the number came from (the env override wins)."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            return float(override), PEAK_ENV
        except ValueError:
            sys.exit(f"bench/gpu.py: {PEAK_ENV}={override!r} is not a number of TFLOPS")
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, f"table ({key})"
    return None, f"unknown GPU {device_name!r}: set {PEAK_ENV}"


def write_dataset(root: Path, n_train: int, n_val: int, size: int) -> None:
    """A prepared dataset of random images in the format preprocess writes (same writer, same meta)."""
    import numpy as np

    from cvpipe.core.config import AugmentParams
    from cvpipe.data import augment
    from cvpipe.data.prepared import SplitWriter, write_meta

    rng = np.random.default_rng(SEED)
    counts = {}
    for name, n in (("train", n_train), ("val", n_val)):
        writer = SplitWriter(root, name, n, size)
        for s in range(0, n, 512):
            k = min(512, n - s)
            writer.images[s:s + k] = rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8)
        labels = [i % CLASSES for i in range(n)]
        rows = [{"id": f"{name}{i:07d}", "label": str(c), "source_uri": f"random://{name}/{i}"} for i, c in enumerate(labels)]
        writer.finish(labels, rows)
        counts[name] = n
    pipeline = augment.build(AugmentParams(train=[{"HorizontalFlip": {"p": 0.5}}]), seed=SEED)
    (root / "augment.json").write_text(augment.to_json(pipeline))
    (root / "eval_transform.json").write_text(augment.to_json(augment.eval_pipeline(size)))
    meta = {"image_size": size, "resize_mode": "shorter_side_center_crop", "split_strategy": "stratified",
            "mean": [0.5, 0.5, 0.5], "std": [0.289, 0.289, 0.289], "label_review": None}
    write_meta(root, [str(c) for c in range(CLASSES)], meta, {"splits": counts})


def train_params(work: Path, prepared: Path, a, arch: str, compiled: bool, nproc: int) -> None:
    """params.yaml of one cvpipe run: the repository's, with the bench's model, precision and loop."""
    write_params(work, {
        "paths.prepared": str(prepared), "wandb.mode": "disabled",
        "train.arch": arch, "train.seed": SEED, "train.epochs": a.epochs, "train.batch_size": a.batch * nproc,
        "train.device": a.device, "train.amp": a.amp, "train.channels_last": True, "train.compile": compiled,
        "train.optimizer": "adamw", "train.lr": 1e-3, "train.weight_decay": 0.05, "train.label_smoothing": 0.1,
        "train.warmup_epochs": 0, "train.ema": False, "train.monitor": "val_acc", "train.mixup_alpha": 0.0,
        "train.cutmix_alpha": 0.0, "train.auto_resume": False, "train.time_budget_minutes": None,
        "train.workers": a.workers,
    })


def bench_cvpipe(work: Path, prepared: Path, a, arch: str, compiled: bool, nproc: int) -> dict:
    """``cvpipe train`` (``--nproc`` > 1: DDP); the last epoch's training img/s from history.csv."""
    from cvpipe.core.config import run_name

    folder = work / f"{arch}-{'compiled' if compiled else 'eager'}-x{nproc}"
    train_params(folder, prepared, a, arch, compiled, nproc)
    wall = cvpipe(["train", "-q", *(["--nproc", str(nproc)] if nproc > 1 else [])], folder)
    with open(folder / "plots" / run_name(arch, SEED) / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    shutil.rmtree(folder / "models", ignore_errors=True)  # checkpoints are not needed: keep the disk small
    return {"img_per_s": float(rows[-1]["img_per_s"]), "epoch_img_per_s": [float(r["img_per_s"]) for r in rows],
            "wall_s": round(wall, 1)}


def _model_and_step(arch: str, a, device, compiled: bool):
    """The bare loop's model and one training step (the same model, optimizer, loss and precision as cvpipe's)."""
    import torch
    from timm.optim import create_optimizer_v2

    from cvpipe.torchkit.models import create

    model = create(arch, num_classes=CLASSES).to(device).to(memory_format=torch.channels_last).train()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = torch.compile(model) if compiled else model
    dtype = torch.bfloat16 if a.amp == "bf16" else torch.float32

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=a.amp == "bf16"):
            loss = crit(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def bench_bare(arch: str, a, device, compiled: bool) -> float:
    """img/s of the bare loop on one batch already on the device (after warm-up steps that compile)."""
    import torch

    _, step = _model_and_step(arch, a, device, compiled)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (a.batch,), device=device)
    for _ in range(a.warmup):
        step(x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step(x, y)
    sync()
    return a.steps * a.batch / (time.perf_counter() - t0)


def train_flops_per_image(arch: str, a, device) -> float:
    """FLOPs of one forward + backward of one image (FlopCounterMode over a batch of 2, halved)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cvpipe.torchkit.models import create

    model = create(arch, num_classes=CLASSES).to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, a.size, a.size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp == "bf16"):
        model(x).float().sum().backward()
    return counter.get_total_flops() / 2


def bench_arch(work: Path, prepared: Path, a, arch: str, device, peak: float | None, gpus: int) -> dict:
    """One architecture: FLOPs, then eager and compiled, cvpipe and bare (and DDP over every GPU)."""
    flops = train_flops_per_image(arch, a, device)
    out: dict = {"train_gflops_per_image": round(flops / 1e9, 3)}

    def mfu(img_s: float, n: int = 1) -> float | None:
        return round(flops * img_s / (peak * 1e12 * n), 4) if peak else None

    for compiled in [v == "compiled" for v in a.variants.split(",")]:
        cv = bench_cvpipe(work, prepared, a, arch, compiled, 1)
        bare = bench_bare(arch, a, device, compiled)
        cell = {"cvpipe_img_per_s": round(cv["img_per_s"], 1), "bare_img_per_s": round(bare, 1),
                "ratio": round(cv["img_per_s"] / bare, 3), "cvpipe_mfu": mfu(cv["img_per_s"]), "bare_mfu": mfu(bare),
                "cvpipe_epochs_img_per_s": cv["epoch_img_per_s"], "cvpipe_wall_s": cv["wall_s"]}
        if gpus >= 2:
            ddp = bench_cvpipe(work, prepared, a, arch, compiled, gpus)
            cell.update({f"cvpipe_nproc{gpus}_img_per_s": round(ddp["img_per_s"], 1),
                         f"cvpipe_nproc{gpus}_mfu": mfu(ddp["img_per_s"], gpus),
                         f"nproc{gpus}_scaling": round(ddp["img_per_s"] / cv["img_per_s"], 3)})
        out["compiled" if compiled else "eager"] = cell
        print(f"{arch} {'compiled' if compiled else 'eager   '}: cvpipe {cell['cvpipe_img_per_s']:8.1f} img/s, "
              f"bare {cell['bare_img_per_s']:8.1f} img/s (ratio {cell['ratio']:.2f}), MFU {cell['cvpipe_mfu']}",
              file=sys.stderr, flush=True)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated timm names")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    ap.add_argument("--images", type=int, default=8192, help="train images (random); an epoch of cvpipe train")
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3, help="cvpipe epochs; the last one is measured")
    ap.add_argument("--steps", type=int, default=50, help="timed steps of the bare loop")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of the bare loop (compilation)")
    ap.add_argument("--workers", type=int, default=None, help="train.workers (default: cvpipe's auto)")
    ap.add_argument("--variants", default="eager,compiled", help="eager and/or compiled (train.compile)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="the same code path on CPU: test_resnet, 32 px, batch 4, one step of each loop")
    a = ap.parse_args(argv)
    if not a.variants or set(a.variants.split(",")) - {"eager", "compiled"}:
        ap.error(f"--variants: a comma-separated subset of eager,compiled (got {a.variants!r})")
    a.device, a.amp = "cuda", "bf16"
    if a.dry_run_cpu:
        from cvpipe.torchkit.runtime import cpu_supports_bf16

        a.archs, a.size, a.batch, a.images, a.val_images, a.epochs = "test_resnet", 32, 4, 4, 4, 1
        a.steps, a.warmup, a.workers, a.device = 1, 1, 0, "cpu"
        a.amp = "bf16" if cpu_supports_bf16() else "off"
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not a.dry_run_cpu:
        print(f"bench/gpu.py: skipped: no CUDA device (torch {torch.__version__}); --dry-run-cpu runs its plumbing on CPU",
              file=sys.stderr)
        print(json.dumps({"skipped": "no CUDA", "machine": machine()}))
        return
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak, peak_source = peak_tflops(name) if device.type == "cuda" else (None, "cpu: no bf16 peak table")
    if a.dry_run_cpu and os.environ.get(PEAK_ENV):
        peak, peak_source = peak_tflops(name)
    work = Path(tempfile.mkdtemp(prefix="cvpipe-gpu-bench-"))
    try:
        t0 = time.perf_counter()
        prepared = work / "prepared"
        write_dataset(prepared, a.images, a.val_images, a.size)
        results = {arch: bench_arch(work, prepared, a, arch, device, peak, gpus if device.type == "cuda" else 0)
                   for arch in a.archs.split(",")}
        print(json.dumps({
            "dry_run_cpu": a.dry_run_cpu, "image_size": a.size, "batch_per_gpu": a.batch, "train_images": a.images,
            "precision": a.amp, "channels_last": True, "device": name, "gpus": gpus,
            "peak_bf16_tflops_per_gpu": peak, "peak_source": peak_source, "archs": results,
            "machine": {**machine(), "cuda": torch.version.cuda}, "bench_seconds": round(time.perf_counter() - t0, 1),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
