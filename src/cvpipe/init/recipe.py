"""The rules behind ``cvpipe init``: a strong first recipe from what the data and the machine look like.

ImageNet defaults (SGD at 0.1 x batch/256 with batch 128, RandomResizedCrop down to 8 % of
the image, 224 px, the checkpoint with the best validation top-1) do badly on small
datasets trained from scratch. These rules pick each setting from a :class:`DataProfile`
(what a scan of the source found) and a :class:`MachineProfile` (cores, GPU, bf16), and
every rule returns a :class:`Choice`: the value plus a one-line reason, which
``cvpipe init`` writes beside it in params.yaml.

What was measured behind the optimizer, EMA and checkpoint rules (resnet18 from scratch,
128 px, 3-minute budget on 2 CPU cores, hymenoptera_data: 201 train / 44 val / 153 test
images; the test accuracy of the last EMA weights, two seeds each): Nesterov SGD with
weight decay 5e-4 at batch 16 scored 0.76-0.77 for any LR from 0.01 to 0.05 (0.71 at 0.1),
AdamW at the old rule (1e-3, weight decay 0.05) 0.70, AdamW with weight decay 0.3 0.72;
RandomResizedCrop 0.25-1 or mixup/cutmix on top of AdamW 0.74-0.75. The checkpoint picked
by validation accuracy was from epochs 7-36 of ~55 (44 validation images pick noise) and
scored 0.65-0.76; timm's train.py defaults scored 0.69-0.73 that way. The details are in
``bench/recipe.py`` and the README.

The functions are pure (no I/O, no torch): :mod:`cvpipe.init.stage` gathers the profiles.
:func:`default_lr` is the learning-rate rule other parts of cvpipe refer to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from cvpipe.core.config import WARMUP_FRACTION, SplitParams

T = TypeVar("T")

# square input sides a timm CNN takes well (multiples of 32: the stem and stages downsample x32)
IMAGE_SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384)
CPU_MAX_SIZE = 128
GPU_MAX_SIZE = 224
BIG_GPU_MAX_SIZE = 320
BIG_GPU_GIB = 40.0

# shortlists, best first; every name is a timm architecture (tests check timm.is_model)
CPU_ARCHS = (
    ("resnet18", "11.7M params, fast on CPU, robust from scratch"),
    ("mobilenetv3_large_100", "5.5M params, built for CPU latency"),
    ("convnext_atto", "3.7M params, modern ConvNeXt design at CPU cost"),
)
GPU_ARCHS = (
    ("convnext_tiny", "28.6M params, strong all-round GPU baseline"),
    ("efficientnet_b2", "9.1M params, accurate per FLOP"),
    ("resnet50", "25.6M params, the reference CNN"),
)
VIT_ARCH = "vit_small_patch16_224"  # fixed 224 px input (16 px patches): only when the image size is 224

# built-in sources whose images change meaning when mirrored
FLIP_UNSAFE_SOURCES = {"sample://digits": "mirrored digits are different glyphs"}

# From scratch, classic CNNs: Nesterov SGD (timm's "sgd"), lr = SCRATCH_SGD_LR x batch / LR_BATCH (linear
# scaling), weight decay SCRATCH_SGD_WD. From scratch, ADAMW_FAMILIES: AdamW at SCRATCH_ADAMW_LR x sqrt(batch /
# LR_BATCH). Fine-tuning a pretrained backbone: AdamW at PRETRAINED_LR x sqrt(batch / LR_BATCH).
SCRATCH_SGD_LR, SCRATCH_ADAMW_LR, PRETRAINED_LR, LR_BATCH = 0.1, 2e-3, 5e-4, 64
SCRATCH_SGD_WD = 5e-4
WEIGHT_DECAY = 0.05  # AdamW's
# timm model families designed with AdamW (attention, LayerNorm ConvNeXts): SGD trains them badly from scratch
# (convnext_atto on hymenoptera_data: 0.60 with SGD, 0.68 with AdamW)
ADAMW_FAMILIES = ("vit", "deit", "deit3", "swin", "swinv2", "beit", "beitv2", "eva", "eva02", "cait", "xcit",
                  "levit", "crossvit", "twins", "pit", "mvitv2", "maxvit", "coat", "volo", "tnt", "flexivit",
                  "convnext", "convnextv2", "convformer", "caformer", "efficientformer", "efficientformerv2")
EMA_MIN_HORIZON, EMA_HORIZON_EPOCHS = 200, 10  # the EMA averages ~10 epochs of updates, at least 200
SMALL_VAL = 500  # below this many validation images, picking the best epoch by them picks noise
LABEL_SMOOTHING = 0.1
LAYER_DECAY = 0.75
HEAD_LR_FACTOR = 10.0
LOSS_WEIGHTING_RATIO, SAMPLER_RATIO = 3.0, 10.0
RESIZED_CROP_MIN_IMAGES = 1000  # training images needed before crops that drop up to 65 % of a photo
PHOTO_MIN_SIDE = 64  # native shorter side from which images are treated as photos (colour jitter)
# (training images below, epochs from scratch, epochs fine-tuning a pretrained backbone)
EPOCH_BUCKETS = ((1_000, 100, 30), (5_000, 50, 20), (20_000, 30, 15), (100_000, 20, 10), (math.inf, 10, 8))


@dataclass(frozen=True)
class Choice(Generic[T]):
    """A recipe value and the one-line reason for it; *parts* explain the items of a list or mapping."""

    value: T
    reason: str
    parts: tuple["Choice[Any]", ...] = ()


@dataclass(frozen=True)
class SizeStats:
    """Distribution of one image side in pixels."""

    median: int
    p10: int
    p90: int


@dataclass(frozen=True)
class DataProfile:
    """What a scan of the source found (see :func:`cvpipe.init.stage.scan_source`)."""

    sources: tuple[str, ...]  # as given to ingest.source
    class_counts: dict[str, int]  # every labelled image file listed, per class
    shorter_side: SizeStats  # over the scanned, readable files
    longer_side: SizeStats
    duplicates: int = 0  # exact copies (same bytes) among the scanned files
    unreadable: int = 0  # scanned files whose header is not an image
    scanned: int = 0
    unlabelled: int = 0  # files outside any class folder (ingest quarantines them)
    split_counts: dict[str, int] = field(default_factory=dict)  # split hint (train/val/test folders) -> files

    @property
    def source(self) -> str:
        return ", ".join(self.sources)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def num_images(self) -> int:
        return sum(self.class_counts.values())

    @property
    def imbalance_ratio(self) -> float:
        counts = [n for n in self.class_counts.values() if n > 0]
        return max(counts) / min(counts) if counts else 1.0

    @property
    def has_split_hint(self) -> bool:
        """Every labelled file has a split (train/ val/ test/ folders or a manifest's split column): train and val or test."""
        given = self.split_counts
        held_out = given.get("val", 0) + given.get("test", 0)
        return given.get("train", 0) > 0 and held_out > 0 and sum(given.values()) == self.num_images


@dataclass(frozen=True)
class MachineProfile:
    """The machine ``cvpipe init`` runs on (see :func:`cvpipe.init.stage.machine_profile`)."""

    cpu_cores: int
    ram_gib: float
    accelerator: str = "cpu"  # what train.device auto resolves to: cpu, cuda or mps
    gpu_name: Optional[str] = None
    gpu_mem_gib: Optional[float] = None
    bf16: bool = False
    amp: str = "off"  # what train.amp auto resolves to: bf16, fp16 or off

    @property
    def has_gpu(self) -> bool:
        return self.accelerator in ("cuda", "mps")

    @property
    def big_gpu(self) -> bool:
        return self.accelerator == "cuda" and (self.gpu_mem_gib or 0.0) >= BIG_GPU_GIB

    def describe(self) -> str:
        gpu = f"{self.gpu_name} ({self.gpu_mem_gib:.0f} GiB)" if self.gpu_name and self.gpu_mem_gib else self.gpu_name
        return f"{self.cpu_cores} CPU cores, {self.ram_gib:.0f} GiB RAM, " + (f"GPU {gpu}" if gpu else "no GPU")


@dataclass(frozen=True)
class RecipeOptions:
    """What the user asked for on the ``cvpipe init`` command line."""

    time_budget_minutes: Optional[float] = None
    max_archs: int = 3
    arch: Optional[str] = None  # put first (the architecture --pretrained-path weights belong to)
    pretrained: bool = False  # timm hub weights
    pretrained_path: Optional[str] = None
    no_flip: bool = False

    @property
    def uses_pretrained(self) -> bool:
        return self.pretrained or self.pretrained_path is not None


# ----------------------------------------------------------------------------- helpers


def _power_of_two_at_most(n: float) -> int:
    return 2 ** int(math.floor(math.log2(n))) if n >= 1 else 1


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def estimated_train_images(profile: DataProfile) -> int:
    """Images the train split will hold under :func:`split_rule` with the default fractions."""
    fr = SplitParams()
    if not profile.has_split_hint:
        return max(1, int(profile.num_images * fr.train))
    train = profile.split_counts["train"]
    has_val, has_test = profile.split_counts.get("val", 0) > 0, profile.split_counts.get("test", 0) > 0
    if has_val and has_test:
        return train
    return max(1, int(train * (1 - fr.val / (fr.train + fr.val))))  # val (or test) carved from train/


# ----------------------------------------------------------------------------- rules


def image_size(profile: DataProfile, machine: MachineProfile) -> Choice[int]:
    """Follow the native resolution (never far above it), at least 32, capped by the hardware."""
    native = profile.shorter_side.median
    fitting = [s for s in IMAGE_SIZES if s <= native]
    size = fitting[-1] if fitting else IMAGE_SIZES[0]
    why = f"native shorter side median {native} px"
    if size > native:
        why += f"; {size} is the smallest input timm CNNs take (they downsample x32)"
    if machine.big_gpu:
        cap, hw = BIG_GPU_MAX_SIZE, f"{machine.gpu_mem_gib:.0f} GiB GPU"
    elif machine.has_gpu:
        cap, hw = GPU_MAX_SIZE, f"{machine.accelerator} GPU"
    else:
        cap, hw = CPU_MAX_SIZE, f"CPU only, training throughput on {machine.cpu_cores} cores"
    if size > cap:
        return Choice(cap, f"{why}, capped at {cap}: {hw}")
    if size < native:
        return Choice(size, f"{why}: the largest multiple of 32 at or below it ({hw}: up to {cap})")
    return Choice(size, why)


def resize_mode(profile: DataProfile) -> Choice[str]:
    """Centre crop unless the typical image is so elongated that a crop would cut off a third of it."""
    aspect = profile.longer_side.median / max(profile.shorter_side.median, 1)
    if aspect > 1.5:
        return Choice("pad_to_square", f"median aspect ratio {aspect:.2f}: a centre crop would cut off over a third")
    return Choice("shorter_side_center_crop", f"median aspect ratio {aspect:.2f}: a centre crop keeps most of each image")


def arch_shortlist(machine: MachineProfile, size: int, options: RecipeOptions) -> Choice[dict[str, dict[str, Any]]]:
    """Architectures that fit the hardware, best first; ``options.arch`` first; at most ``max_archs``."""
    if options.pretrained_path is not None and options.arch:
        part = Choice(options.arch, f"the architecture of {options.pretrained_path}")
        return Choice({options.arch: {}}, "one architecture: the weights in train.pretrained_path fit only it", (part,))
    candidates = list(GPU_ARCHS if machine.has_gpu else CPU_ARCHS)
    if machine.big_gpu and size == 224:
        vit = (VIT_ARCH, "ViT-S/16: fine-tunes well from pretrained weights" if options.uses_pretrained
               else "ViT-S/16: from scratch it needs much data, so last")
        candidates.insert(1 if options.uses_pretrained else len(candidates), vit)
    if options.arch:
        candidates = [(options.arch, "asked for with --arch")] + [c for c in candidates if c[0] != options.arch]
    picked = candidates[: max(1, options.max_archs)]
    hw = f"{machine.accelerator.upper()} GPU" if machine.has_gpu else f"CPU ({machine.cpu_cores} cores)"
    reason = f"bake-off of {len(picked)} architecture(s) sized for the {hw}; each entry overrides train.* for it"
    return Choice({name: {} for name, _ in picked}, reason, tuple(Choice(name, why) for name, why in picked))


def wants_adamw(arch: str) -> bool:
    """An architecture designed with AdamW (by timm family name: ViTs, ConvNeXts, ...), which SGD trains badly."""
    return arch.split("_")[0].lower() in ADAMW_FAMILIES


def default_lr(batch_size: int, pretrained: bool, arch: str = "resnet18") -> float:
    """Peak learning rate of the recipe's optimizer, 3 significant digits.

    * pretrained backbone (AdamW): 5e-4 x sqrt(batch / 64);
    * from scratch, classic CNN (Nesterov SGD): 0.1 x batch / 64 (linear scaling; 0.025 at batch 16);
    * from scratch, :func:`wants_adamw` architectures (AdamW): 2e-3 x sqrt(batch / 64).
    """
    if pretrained:
        return _sig3(PRETRAINED_LR * math.sqrt(batch_size / LR_BATCH))
    if wants_adamw(arch):
        return _sig3(SCRATCH_ADAMW_LR * math.sqrt(batch_size / LR_BATCH))
    return _sig3(SCRATCH_SGD_LR * batch_size / LR_BATCH)


def batch_size(train_images: int, machine: MachineProfile, size: int) -> Choice[int]:
    """A power of two from the hardware, at most 1/8 of the training images (enough updates per epoch), at least 8."""
    if machine.accelerator == "cuda":
        mem = machine.gpu_mem_gib or 0.0
        hw_bs = 256 if mem >= BIG_GPU_GIB else 128 if mem >= 16 else 64
        hw = f"{mem:.0f} GiB GPU"
    elif machine.accelerator == "mps":
        hw_bs, hw = 64, "MPS GPU"
    else:
        hw_bs = 64 if size <= 64 else 32
        hw = f"CPU at {size} px"
    cap = max(8, _power_of_two_at_most(train_images / 8))
    bs = max(8, min(hw_bs, cap))
    if train_images < 64:
        return Choice(bs, f"only ~{train_images} training images: the smallest batch, 8")
    if bs < hw_bs:
        return Choice(bs, f"~{train_images} training images: at most 1/8 of them per batch, so >= 8 updates per epoch")
    return Choice(bs, f"{hw}: {hw_bs} per batch")


def epochs(train_images: int, options: RecipeOptions) -> Choice[int]:
    """Small datasets need more epochs; under a time budget, a generous cap (the budget plans the real count)."""
    scratch, tuned = next((s, p) for limit, s, p in EPOCH_BUCKETS if train_images < limit)
    count = tuned if options.uses_pretrained else scratch
    start = "fine-tuning" if options.uses_pretrained else "from scratch"
    if options.time_budget_minutes is not None:
        return Choice(2 * count, f"cap only: time_budget_minutes plans the epochs ({count} would be the count without a budget)")
    return Choice(count, f"~{train_images} training images {start}: smaller sets need more epochs")


def warmup_epochs(num_epochs: int, options: RecipeOptions) -> Choice[int]:
    if options.time_budget_minutes is not None:
        return Choice(1, "minimum: under a time budget the warmup follows the epochs the budget plans")
    n = max(1, int(WARMUP_FRACTION * num_epochs + 0.5))
    return Choice(n, f"~5% of {num_epochs} epochs (at least 1)")


def time_budget(options: RecipeOptions) -> Choice[Optional[float]]:
    if options.time_budget_minutes is None:
        return Choice(None, "no budget: train.epochs epochs per architecture (cvpipe init --time-budget MIN sets one)")
    return Choice(options.time_budget_minutes, "per architecture: epochs and cosine schedule sized from measured throughput")


def optimizer_settings(bs: int, options: RecipeOptions, arch: str = "resnet18") -> dict[str, Choice[Any]]:
    """Nesterov SGD from scratch (classic CNNs); AdamW for a pretrained backbone (with layer decay and a 10x
    head LR) and for :func:`wants_adamw` architectures from scratch. The LR rule is :func:`default_lr`."""
    lr = default_lr(bs, options.uses_pretrained, arch)
    if options.uses_pretrained:
        out: dict[str, Choice[Any]] = {
            "optimizer": Choice("adamw", "AdamW: the standard for fine-tuning a pretrained backbone"),
            "lr": Choice(lr, f"{PRETRAINED_LR:g} x sqrt(batch {bs} / {LR_BATCH}) (pretrained backbone)"),
            "weight_decay": Choice(WEIGHT_DECAY, "AdamW weight decay (not on biases and norms)"),
            "layer_decay": Choice(LAYER_DECAY, "lower blocks keep more of what they learned"),
            "head_lr": Choice(_sig3(HEAD_LR_FACTOR * lr), f"{HEAD_LR_FACTOR:g} x lr: the new classifier starts from random"),
        }
    elif wants_adamw(arch):
        out = {
            "optimizer": Choice("adamw", f"AdamW: {arch.split('_')[0]} models are designed with it; SGD trains them badly from scratch"),
            "lr": Choice(lr, f"{SCRATCH_ADAMW_LR:g} x sqrt(batch {bs} / {LR_BATCH}) (AdamW, from scratch)"),
            "weight_decay": Choice(WEIGHT_DECAY, "AdamW weight decay (not on biases and norms)"),
        }
    else:
        out = {
            "optimizer": Choice("sgd", "Nesterov SGD: from scratch it generalizes better than AdamW"),
            "lr": Choice(lr, f"{SCRATCH_SGD_LR:g} x batch {bs} / {LR_BATCH} (SGD from scratch, linear scaling)"),
            "weight_decay": Choice(SCRATCH_SGD_WD, "SGD weight decay (not on biases and norms)"),
        }
    out["momentum"] = Choice(0.9, "heavy-ball momentum of SGD (Nesterov in timm's sgd)") if out["optimizer"].value == "sgd" \
        else Choice(0.9, "unused by AdamW (its betas are timm's defaults)")
    out["label_smoothing"] = Choice(LABEL_SMOOTHING, "softer targets: better calibrated, less overconfident")
    if not options.uses_pretrained:
        out["layer_decay"] = Choice(None, "off: from scratch every block learns alike")
        out["head_lr"] = Choice(None, "= lr (from scratch)")
    return out


def ema(train_images: int, bs: int) -> dict[str, Choice[Any]]:
    """An EMA of the weights (timm ModelEmaV3) averaging ~10 epochs of updates, at least 200."""
    per_epoch = max(1, math.ceil(train_images / bs))
    horizon = max(EMA_MIN_HORIZON, EMA_HORIZON_EPOCHS * per_epoch)
    decay = round(1 - 1 / horizon, 5)
    return {
        "ema": Choice(True, "an average of the recent weights: steadier than the last step's, most of all on small data"),
        "ema_decay": Choice(decay, f"1 - 1/{horizon}: averages ~{horizon} updates (~{per_epoch} per epoch; at least "
                                   f"{EMA_MIN_HORIZON}, else ~{EMA_HORIZON_EPOCHS} epochs)"),
    }


def estimated_val_images(profile: DataProfile) -> int:
    """Images the val split will hold under :func:`split_rule` with the default fractions."""
    fr = SplitParams()
    if not profile.has_split_hint:
        return max(1, int(profile.num_images * fr.val))
    given = profile.split_counts
    if given.get("val", 0) and given.get("test", 0):
        return given["val"]
    return max(1, given["train"] - estimated_train_images(profile))


def checkpoint_rule(val_images: int) -> dict[str, Choice[Any]]:
    """Which weights are tested: the best epoch by EMA validation accuracy, or with a small val split the last."""
    monitor = Choice("ema_val_acc", "best.pt is the epoch whose EMA weights score best on val")
    if val_images < SMALL_VAL:
        return {
            "train.monitor": monitor,
            "evaluate.checkpoint": Choice("last", f"~{val_images} val images (< {SMALL_VAL}): the best of many epochs by "
                                                  "them is noise; the finished schedule's last weights are the run's result"),
            "evaluate.weights": Choice("ema", "the EMA weights"),
        }
    return {
        "train.monitor": monitor,
        "evaluate.checkpoint": Choice("best", f"~{val_images} val images: enough to pick the best epoch"),
        "evaluate.weights": Choice("auto", "auto: the EMA weights (train.monitor is an ema_ metric)"),
    }


def flip(profile: DataProfile, options: RecipeOptions) -> Choice[bool]:
    if options.no_flip:
        return Choice(False, "--no-flip: mirrored images would change meaning")
    unsafe = [FLIP_UNSAFE_SOURCES[s] for s in profile.sources if s in FLIP_UNSAFE_SOURCES]
    if unsafe:
        return Choice(False, f"no flips: {'; '.join(unsafe)}")
    return Choice(True, "mirror images half the time (cvpipe init --no-flip for text, digits, signs)")


def augmentations(profile: DataProfile, size: int, train_images: int, flips: Choice[bool]) -> Choice[list[dict[str, Any]]]:
    """Gentle, label-preserving augmentation whose strength follows the dataset and image size."""
    native = profile.shorter_side.median
    photo = native >= PHOTO_MIN_SIDE
    parts: list[Choice[dict[str, Any]]] = []
    if flips.value:
        parts.append(Choice({"HorizontalFlip": {"p": 0.5}}, flips.reason))
    if size > 64 and train_images >= RESIZED_CROP_MIN_IMAGES:
        parts.append(Choice(
            {"RandomResizedCrop": {"size": [size, size], "scale": [0.35, 1.0], "p": 1.0}},
            f"crops keeping >= 35% of the image (not ImageNet's 8%): enough images (~{train_images}) at {size} px",
        ))
    else:
        affine: dict[str, Any] = {"translate_percent": [-0.1, 0.1], "scale": [0.9, 1.1], "rotate": [-10, 10]}
        if photo:
            affine["border_mode"] = 4  # cv2.BORDER_REFLECT_101: no black corners on photos
        affine["p"] = 0.8
        small = f"{size} px images" if size <= 64 else f"only ~{train_images} training images"
        border = "; reflected borders (4 = cv2.BORDER_REFLECT_101)" if photo else ""
        parts.append(Choice({"Affine": affine}, f"gentle shifts, scales and rotations for {small}{border}"))
    if photo:
        parts.append(Choice(
            {"ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0, "p": 0.8}},
            f"mild colour jitter for photos (native {native} px); hue kept",
        ))
    why = f"{', '.join(next(iter(p.value)) for p in parts)}: strength follows ~{train_images} training images at {size} px"
    if not flips.value:
        why += f"; {flips.reason}"
    return Choice([p.value for p in parts], why, tuple(parts))


def class_balance(profile: DataProfile) -> Choice[str]:
    ratio = profile.imbalance_ratio
    counts = f"imbalance max/min = {ratio:.2f}"
    if ratio >= SAMPLER_RATIO:
        return Choice("sampler", f"{counts} (>= {SAMPLER_RATIO:g}): inverse-frequency sampling")
    if ratio >= LOSS_WEIGHTING_RATIO:
        return Choice("loss", f"{counts} (>= {LOSS_WEIGHTING_RATIO:g}): class-weighted cross-entropy")
    return Choice("none", f"{counts} (< {LOSS_WEIGHTING_RATIO:g}): balanced enough")


def split_rule(profile: DataProfile) -> dict[str, Choice[Any]]:
    """Keep a split the source already has; otherwise a stratified 70/15/15."""
    if not profile.has_split_hint:
        why = "no train/ val/ folders" if not profile.split_counts else "the given split has no val/test part or misses files"
        return {"strategy": Choice("stratified", f"{why}: seeded stratified 70/15/15")}
    folders = " / ".join(f"{k} {v}" for k, v in sorted(profile.split_counts.items()))
    out: dict[str, Choice[Any]] = {"strategy": Choice("predefined", f"the source is split already ({folders}): kept")}
    if "test" not in profile.split_counts and "val" in profile.split_counts:
        out["test_from"] = Choice("val", "no test/ folder: val/ becomes the test split, val is carved from train/")
    return out


def device_amp(machine: MachineProfile) -> dict[str, Choice[str]]:
    where = machine.accelerator if not machine.gpu_name else f"{machine.accelerator} ({machine.gpu_name})"
    if machine.amp == "bf16":
        how = "bf16 autocast (" + ("CPU has AVX512-BF16/AMX" if machine.accelerator == "cpu" else "GPU supports bf16") + ")"
    elif machine.amp == "fp16":
        how = "fp16 autocast + grad scaler (no bf16 on this GPU)"
    else:
        how = "full fp32 (no bf16 here)"
    return {
        "device": Choice("auto", f"resolves to {where} on this machine"),
        "amp": Choice("auto", f"resolves to {how} on this machine"),
    }


# ----------------------------------------------------------------------------- the whole recipe


def build_recipe(profile: DataProfile, machine: MachineProfile, options: RecipeOptions) -> dict[str, Choice[Any]]:
    """Every recipe choice, keyed by its dotted params.yaml key."""
    size = image_size(profile, machine)
    n_train = estimated_train_images(profile)
    archs = arch_shortlist(machine, size.value, options)
    bs = batch_size(n_train, machine, size.value)
    first = next(iter(archs.value))
    n_epochs = epochs(n_train, options)
    flips = flip(profile, options)
    out: dict[str, Choice[Any]] = {
        "preprocess.image_size": size,
        "preprocess.resize_mode": resize_mode(profile),
        **{f"split.{k}": v for k, v in split_rule(profile).items()},
        "augment.train": augmentations(profile, size.value, n_train, flips),
        "train.arch": Choice(next(iter(archs.value)), "first of bakeoff.archs (`cvpipe train` without --arch)"),
        "train.epochs": n_epochs,
        "train.time_budget_minutes": time_budget(options),
        "train.batch_size": bs,
        **{f"train.{k}": v for k, v in optimizer_settings(bs.value, options, first).items()},
        "train.warmup_epochs": warmup_epochs(n_epochs.value, options),
        **{f"train.{k}": v for k, v in ema(n_train, bs.value).items()},
        "train.class_balance": class_balance(profile),
        **{f"train.{k}": v for k, v in device_amp(machine).items()},
        **checkpoint_rule(estimated_val_images(profile)),
        "bakeoff.archs": optimizer_overrides(archs, bs.value, options, first),
    }
    out.update(weights(options))
    return out


def optimizer_overrides(archs: Choice[dict[str, dict[str, Any]]], bs: int, options: RecipeOptions,
                        first: str) -> Choice[dict[str, dict[str, Any]]]:
    """``bakeoff.archs`` with per-architecture optimizer overrides where an architecture needs another optimizer
    than train.* (written for the first): a ConvNeXt or ViT from scratch among classic CNNs, or the reverse."""
    if options.uses_pretrained:
        return archs
    value: dict[str, dict[str, Any]] = {}
    parts = []
    for part in archs.parts or tuple(Choice(a, "") for a in archs.value):
        name = part.value
        entry = dict(archs.value[name])
        if wants_adamw(name) != wants_adamw(first):
            own = optimizer_settings(bs, options, name)
            entry.update({k: own[k].value for k in ("optimizer", "lr", "weight_decay")})
            part = Choice(name, f"{part.reason}; {own['optimizer'].reason}" if part.reason else own["optimizer"].reason)
        value[name] = entry
        parts.append(part)
    return Choice(value, archs.reason, tuple(parts))


def weights(options: RecipeOptions) -> dict[str, Choice[Any]]:
    if options.pretrained_path is not None:
        return {"train.pretrained_path": Choice(options.pretrained_path, "backbone weights from --pretrained-path")}
    if options.pretrained:
        return {"train.pretrained": Choice(True, "timm hub weights (the train machine needs network access)")}
    return {"train.pretrained": Choice(False, "from scratch (cvpipe init --pretrained or --pretrained-path to fine-tune)")}
