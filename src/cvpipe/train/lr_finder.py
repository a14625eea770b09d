"""Learning-rate range test (``cvpipe train --find-lr``).

Leslie Smith's test (*Cyclical Learning Rates for Training Neural Networks*, 2017), as
fastai's ``lr_find`` and pytorch-lightning's ``Tuner.lr_find`` run it: train the real model
with the real optimizer, data and augmentation for a few hundred updates while the LR
grows exponentially from ``lr_min`` to ``lr_max``; record the (bias-corrected, exponentially
smoothed) loss; stop once it diverges. The suggestion is the LR where the smoothed loss
falls fastest (steepest descent per decade, before its minimum; Lightning's rule). The
other classic rule, a tenth of the minimum's LR, is reported too but not used: with 100
steps over five decades the smoothing lags the loss by about half a decade (beta 0.98:
~50 steps), so the minimum moves with the smoothing and the range, while the steepest
point barely does. On the digits, the steepest point sits within 1.5x of the best LR of a
training grid (``bench/lr_finder.py``, which measures it over seeds; Nesterov SGD: 0.096 and
0.079 against 0.1 on an Intel Xeon, 0.069 on an AMD EPYC; AdamW: 2.5e-3 against 3e-3, where a
tenth of the minimum missed it by 8x).

It is written here rather than taken from a library because none fits: fastai's needs its
Learner, Lightning's its Trainer, ``torch-lr-finder`` is unmaintained; the test itself is a
short loop over cvpipe's own loader, normalizer, training step (:func:`cvpipe.torchkit.step.forward_loss`,
the train loop's forward/loss/mixup) and timm optimizer (with its layer-decay
``lr_scale`` groups, so the suggested value is ``train.lr`` as the train stage uses it).

Writes ``<paths.plots>/<run>/lr_finder.png`` (loss vs LR, suggestion marked) and
``<paths.metrics>/<run>/lr_finder.json`` (``<run>`` = ``params.run_name``, ``<arch>/seed<seed>``); ``--write-lr`` stores the suggestion in params.yaml
(``bakeoff.archs.<arch>.lr`` when the arch is listed there, else ``train.lr``), comments kept.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage
from cvpipe.core.config import Params
from cvpipe.core.console import info, progress
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.data import augment
from cvpipe.data.prepared import PreparedDataset
from cvpipe.torchkit.models import data_config
from cvpipe.torchkit.runtime import resolve_runtime, seed_everything
from cvpipe.train import finetune

SMOOTHING = 0.98
DIVERGE_FACTOR = 4.0


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam's first moment)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 10) -> dict[str, float]:
    """``suggested`` = the steepest descent of the smoothed loss before its minimum; also the minimum's LR."""
    if len(lrs) < skip_start + 5:
        raise StageError(f"the LR range test stopped after {len(lrs)} steps: too few to suggest a value "
                         "(raise --lr-steps, or lower --lr-min)")
    lr = np.asarray(lrs[skip_start:])
    loss = np.asarray(smoothed[skip_start:])
    i_min = int(np.argmin(loss))
    grad = np.gradient(loss, np.log10(lr))
    i_steep = int(np.argmin(grad[: max(i_min, 1)]))
    return {"suggested": float(lr[i_steep]), "steepest_lr": float(lr[i_steep]), "min_loss_lr": float(lr[i_min]),
            "min_loss_lr_div10": float(lr[i_min] / 10)}


def run(params: Params, lr_min: float = 1e-5, lr_max: float = 1.0, steps: int = 100) -> dict[str, Any]:
    """Run the range test for ``params.train`` on the prepared train split; returns what lr_finder.json holds."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer, cycle, default_workers, make_loader, train_dataset
    from cvpipe.torchkit.step import forward_loss

    if not 0 < lr_min < lr_max:
        raise ParamsError(f"--lr-min/--lr-max: need 0 < lr_min < lr_max (got {lr_min}, {lr_max})")
    tp = params.train
    rt = resolve_runtime(tp.device, tp.amp, tp.channels_last)
    seed_everything(tp.seed, tp.deterministic)
    ds = PreparedDataset(params.paths.prepared)
    split = ds.split("train")
    if len(split) == 0:
        raise StageError("the train split is empty")
    pipeline = augment.from_dict(json.loads((ds.root / "augment.json").read_text()))
    workers = tp.workers if tp.workers is not None else default_workers(rt.device.type)
    drop_last = len(split) > tp.batch_size
    train_ds = train_dataset(split, pipeline, tp.seed, tp.batch_size, drop_last, tp.shuffle_buffer, workers=workers)
    loader = make_loader(train_ds, tp.batch_size, True, workers, tp.seed, rt.device.type == "cuda", drop_last=drop_last)
    model = finetune.create_model(tp, ds.num_classes).to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    finetune.set_backbone_frozen(model, tp.finetune == "linear_probe")
    normalize = BatchNormalizer(**{k: data_config(model)[k] for k in ("mean", "std")}, rt=rt)
    criterion = finetune.make_criterion(tp, finetune.loss_class_weights(tp, split.labels, ds.num_classes, rt.device))
    mixup = finetune.make_mixup(tp, ds.num_classes)
    optimizer = finetune.build_optimizer(model, tp)
    finetune.train_mode(model)

    schedule = np.geomspace(lr_min, lr_max, steps)
    lrs: list[float] = []
    losses: list[float] = []
    best, avg = math.inf, 0.0
    batches = cycle(loader)
    with progress("step") as bar:
        task = bar.add_task(f"LR range test {tp.arch}", total=steps)
        for lr in schedule:
            for g in optimizer.param_groups:
                g["lr"] = float(lr) * g.get("lr_scale", 1.0)
            images, labels = next(batches)
            loss = forward_loss(model, images, labels, normalize, criterion, mixup, rt).loss
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lrs.append(float(lr))
            losses.append(value)
            bar.advance(task)
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            s = avg / (1 - SMOOTHING ** len(losses))
            best = min(best, s)
            if len(losses) > 10 and s > DIVERGE_FACTOR * best:
                break
    smoothed = smooth(losses)
    picks = suggest(lrs, smoothed)
    result = {
        "arch": tp.arch, "optimizer": tp.optimizer, "batch_size": tp.batch_size, "finetune": tp.finetune,
        "pretrained": bool(tp.pretrained or tp.pretrained_path), "layer_decay": tp.layer_decay,
        "rule": "steepest descent of the smoothed loss (per decade of LR), before its minimum", **picks,
        "current_lr": tp.lr, "steps_run": len(lrs), "lr_min": lr_min, "lr_max": lr_max,
        "lrs": lrs, "losses": [round(v, 6) for v in losses], "smoothed": [round(v, 6) for v in smoothed],
    }
    metrics_path = storage.join(params.paths.metrics, params.run_name, "lr_finder.json")
    plot_path = storage.join(params.paths.plots, params.run_name, "lr_finder.png")
    storage.write_json(metrics_path, result)
    storage.write_bytes(plot_path, plot(result))
    info(f"LR range test ({len(lrs)} steps, {tp.optimizer}, batch {tp.batch_size}): suggested lr {picks['suggested']:.3g} "
         f"(minimum loss at {picks['min_loss_lr']:.3g}; train.lr is {tp.lr:g}); plot: {plot_path}")
    return result


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.plot(result["lrs"], result["losses"], color="0.75", lw=0.8, label="loss per step")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=1.8, label="smoothed")
    ax.axvline(result["suggested"], color="C3", ls="--", label=f"suggested {result['suggested']:.2g}")
    ax.axvline(result["min_loss_lr"], color="C2", ls=":", label=f"min loss {result['min_loss_lr']:.2g}")
    ax.set_xscale("log")
    lo, hi = min(result["smoothed"]), max(result["smoothed"][:10] + [min(result["smoothed"]) * DIVERGE_FACTOR])
    ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['arch']}, {result['optimizer']}, batch {result['batch_size']}")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return storage.png_bytes(fig)


def write_lr(params_path: Path, arch: str, lr: float, key: Optional[str] = None) -> str:
    """Store ``lr`` in params.yaml, keeping its comments and layout; returns the key path written.

    ``bakeoff.archs.<arch>.lr`` when the arch is listed there (its override wins over
    ``train.lr`` for that arch), else ``train.lr``.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    doc = yaml.load(Path(params_path).read_text())
    value = float(f"{lr:.2g}")
    archs = (doc.get("bakeoff") or {}).get("archs") or {}
    if key is None:
        key = f"bakeoff.archs.{arch}.lr" if arch in archs else "train.lr"
    if key.startswith("bakeoff."):
        if archs.get(arch) is None:
            archs[arch] = CommentedMap()
            archs[arch].fa.set_flow_style()
        archs[arch]["lr"] = value
    else:
        doc.setdefault("train", CommentedMap())["lr"] = value
    buf = io.StringIO()
    yaml.dump(doc, buf)
    storage.write_text(str(params_path), buf.getvalue())
    return key
