"""Training throughput bench: cvpipe vs the compute-only ceiling vs a plain torchvision-tutorial loop.

    CVPIPE_REAL_DATA=../shared/data python bench/train.py [--arch resnet18 --size 128 --batch 64]

Side by side in one run, same model, image size and batch:

* ``cvpipe``   ``cvpipe train`` end to end on the preprocessed hymenoptera_data
               (memory-mapped uint8, albumentations, on-device normalization, default
               precision: bf16 autocast + channels_last where the CPU has bf16).
               Training img/s (history.csv), the median over the epochs after the first (whose
               first steps pay for oneDNN's kernel choice), i.e. the loop a user waits for.
* ``ceiling``  the same model/optimizer/precision/memory format stepping on a batch
               of tensors already in memory: nothing can train faster than this.
* ``tutorial`` the PyTorch transfer-learning tutorial loop: ImageFolder over the raw
               JPEGs, PIL, torchvision transforms, fp32, a fresh DataLoader each epoch.
* ``parity``   (``--parity``) digits trained with bf16 autocast and with fp32: final val accuracy.

* ``cvpipe`` on shards: the same, preprocessed as JPEG WebDataset shards (``preprocess.format: shards``)
               and streamed by :class:`cvpipe.torchkit.streaming.ShardStream`.

Prints one JSON object as its last line with ``ceiling_ratio`` (cvpipe / ceiling,
target >= 0.9), ``shards_ceiling_ratio`` (cvpipe on shards / ceiling, target >= 0.9) and
``tutorial_ratio`` (cvpipe / tutorial, target >= 2.5).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


from _common import REPO, cvpipe, write_params  # noqa: E402  (bench/ is on sys.path)


SEED = 42  # train.seed of every run here: the run folder is <arch>/seed42 (cvpipe.core.config.run_name)


def steady_img_per_s(folder: Path, arch: str) -> float:
    """Median training img/s of the epochs after the first: one epoch of the sample is ~5 steps, so a
    single epoch's figure moves with any neighbour's burst on a shared machine."""
    with open(folder / "plots" / arch / f"seed{SEED}" / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(statistics.median(float(r["img_per_s"]) for r in rows[1:] or rows))


def bench_cvpipe(work: Path, src: Path, a, fmt: str = "arrays") -> tuple[float, dict]:
    work.mkdir(parents=True, exist_ok=True)
    write_params(work, {"preprocess.format": fmt,
        # train/ and val/ as two class-folder sources (SHA256SUMS beside them is not an image folder)
        "ingest.source": [str(src / "train"), str(src / "val")], "preprocess.image_size": a.size,
        "augment.train": [{"HorizontalFlip": {"p": 0.5}}, {"Affine": {"scale": [0.8, 1.0], "translate_percent": [-0.1, 0.1], "p": 0.8}}],
        "train.arch": a.arch, "train.batch_size": a.batch, "train.epochs": a.epochs, "train.warmup_epochs": 0,
        "train.auto_resume": False, "train.seed": SEED,
    })
    cvpipe(["ingest", "-q"], work)
    cvpipe(["preprocess", "-q"], work)
    cvpipe(["train", "-q"], work)
    meta = json.loads((work / "reports" / a.arch / f"seed{SEED}" / "train.json").read_text())
    return steady_img_per_s(work, a.arch), meta


def bench_ceiling(a, amp: str, steps: int) -> float:
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    model = timm.create_model(a.arch, num_classes=2).train()
    cl = True
    model.to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    y = torch.randint(0, 2, (a.batch,))
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=amp == "bf16"):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * a.batch / (time.perf_counter() - t0)


def bench_tutorial(src: Path, a) -> float:
    """https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html, at our size and batch."""
    import timm
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(a.size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(str(src / "train"), tf)
    model = timm.create_model(a.arch, num_classes=len(ds.classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    rate = 0.0
    for _epoch in range(a.epochs):
        loader = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=os.cpu_count() or 2)
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            n += len(y)
        rate = n / (time.perf_counter() - t0)  # the last epoch's, like cvpipe's figure
    return rate


def bench_parity(work: Path, epochs: int) -> dict:
    out = {}
    base = work / "digits"
    base.mkdir()
    write_params(base, {"train.epochs": epochs, "train.auto_resume": False, "train.seed": SEED})
    cvpipe(["ingest", "-q"], base)
    cvpipe(["preprocess", "-q"], base)
    for amp in ("bf16", "off"):
        cvpipe(["train", "-q", "-S", f"train.amp='{amp}'"], base)  # quoted: bare off is YAML false
        m = json.loads((base / "reports" / "resnet18" / f"seed{SEED}" / "train.json").read_text())
        out[amp] = {"final_val_acc": m["final_val_acc"], "best_val_acc": m["best_val_acc"], "img_per_s": m["img_per_s"], "seconds": m["seconds"]}
    out["abs_diff_final_val_acc"] = round(abs(out["bf16"]["final_val_acc"] - out["off"]["final_val_acc"]), 6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVPIPE_REAL_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per cvpipe run (the median after the first is "
                    "measured) and per tutorial loop (the last is)")
    ap.add_argument("--steps", type=int, default=24, help="ceiling steps")
    ap.add_argument("--parity", type=int, default=0, metavar="EPOCHS", help="also train digits bf16 vs fp32 for EPOCHS")
    a = ap.parse_args()
    import torch

    from cvpipe.torchkit.runtime import cpu_supports_bf16

    src = Path(a.data) / "hymenoptera_data"
    if not src.is_dir():
        sys.exit(f"{src} not found: set CVPIPE_REAL_DATA or --data")
    amp = "bf16" if cpu_supports_bf16() else "off"
    work = Path(tempfile.mkdtemp(prefix="cvpipe-bench-"))
    try:
        t0 = time.perf_counter()
        cv, meta = bench_cvpipe(work, src, a)
        print(f"cvpipe   {cv:8.1f} img/s ({meta['amp']}, channels_last)", flush=True)
        cv_shards, _ = bench_cvpipe(work / "shards", src, a, "shards")
        print(f"cvpipe   {cv_shards:8.1f} img/s on JPEG shards (preprocess.format: shards)", flush=True)
        ceiling = bench_ceiling(a, amp, a.steps)
        print(f"ceiling  {ceiling:8.1f} img/s ({amp}, channels_last, tensors in memory)", flush=True)
        tut = bench_tutorial(src, a)
        print(f"tutorial {tut:8.1f} img/s (fp32, ImageFolder + PIL + torchvision, fresh DataLoader)", flush=True)
        parity = bench_parity(work, a.parity) if a.parity else None
        result = {
            "arch": a.arch, "image_size": a.size, "batch_size": a.batch, "precision": amp,
            "cvpipe_img_per_s": round(cv, 2), "ceiling_img_per_s": round(ceiling, 2), "tutorial_img_per_s": round(tut, 2),
            "cvpipe_shards_img_per_s": round(cv_shards, 2),
            "ceiling_ratio": round(cv / ceiling, 3), "shards_ceiling_ratio": round(cv_shards / ceiling, 3),
            "tutorial_ratio": round(cv / tut, 3),
            "bf16_fp32_parity": parity,
            "machine": {
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "bf16": cpu_supports_bf16(), "torch": torch.__version__, "python": platform.python_version(),
                "loadavg_1m": os.getloadavg()[0],
            },
            "bench_seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
