"""params.yaml: the single place where everything tunable lives.

The file is validated at load time with pydantic. Every error names the key path
and the offending value (``train.lr: must be greater than 0 (got -0.1)``) and is
raised as :class:`~cvpipe.core.errors.ParamsError` so the CLI exits with code 2
before any stage writes anything. Quoted values are cut at 200 characters (saying how long
they were) and at most 20 errors are listed.

The file (at most 1 MiB of UTF-8) and every ``-S`` value are read by a restricted YAML
loader: no anchors or aliases (no expansion bombs), nesting at most 32 levels deep.
Floats must be finite; seeds, batch sizes and worker counts are bounded; paths are
non-empty and free of control characters; devices are ``auto``, ``cpu``, ``mps``,
``cuda`` or ``cuda:N``.

Command-line flags override values from the file through dotted keys
(``train.epochs=3``), the same syntax as ``dvc exp run -S``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cvpipe.core.errors import ParamsError, clip, shorten

DEFAULT_PARAMS_FILE = "params.yaml"

# share of the planned epochs spent warming up: init's recipe writes it, train's time budget re-applies it
WARMUP_FRACTION = 0.05


# bounds of values that are counts of things a machine runs or holds at once, and of seeds
MAX_SEED = 2**32 - 1  # numpy's seeding range (np.random.seed, RandomState)
MAX_BATCH = 2**20
MAX_WORKERS = 1024

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]{0,3}))?")
# C0/C1 control characters and the line breaks YAML knows: never part of a path or source a params file names
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_device(v: str) -> str:
    if not _DEVICE.fullmatch(v):
        raise ValueError("must be auto, cpu, mps, cuda or cuda:N (N a GPU index)")
    return v


def control_character(text: str) -> Optional[str]:
    """The first control character (newline, tab, NUL, ...) in *text*, escaped (``'\\n'``); None when there is none."""
    m = _CONTROL.search(text)
    return None if m is None else repr(m.group())[1:-1]


def _check_path(v: str) -> str:
    if not v.strip():
        raise ValueError("must be a non-empty path")
    bad = control_character(v)
    if bad:
        raise ValueError(f"must not contain control characters (found {bad})")
    return v


# a file or folder a stage reads or writes: an empty string would mean the current folder
PathStr = Annotated[str, AfterValidator(_check_path)]


class _Section(BaseModel):
    """Base for every params section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class PathsParams(_Section):
    raw: PathStr = "data/raw"
    prepared: PathStr = "data/prepared"
    models: PathStr = "models"
    metrics: PathStr = "metrics"
    plots: PathStr = "plots"
    wandb: PathStr = "wandb"
    exports: PathStr = "exports"
    reports: PathStr = "reports"


class IngestParams(_Section):
    source: Union[str, list[str]] = "sample://digits"
    min_size: int = Field(8, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    max_aspect_ratio: float = Field(20.0, ge=1)
    workers: int = Field(0, ge=0, le=MAX_WORKERS, description="0 = one per CPU core")
    background: tuple[int, int, int] = (255, 255, 255)
    gcs_token: Optional[PathStr] = Field(
        None, description="gcsfs token: null = GOOGLE_APPLICATION_CREDENTIALS / ADC, 'anon' for public buckets, or a key file"
    )
    max_archive_bytes: int = Field(2 * 1024**3, ge=1, description="refuse archives that unpack to more than this")
    transfer_concurrency: int = Field(32, ge=1, le=1024, description="remote objects fetched at once")
    state_dir: PathStr = Field(".cvpipe/ingest", description="incremental state, kept outside the DVC output")
    overrides: Optional[PathStr] = Field(
        "labels/overrides.csv",
        description="reviewers' decisions (keep/relabel/exclude per manifest id) applied after listing; null = none, "
        "a missing file = no decisions yet",
    )
    max_file_mb: float = Field(
        1024.0, gt=0, allow_inf_nan=False, description="a source file larger than this (MiB) is quarantined unread (too_large)"
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not str(s).strip() for s in items):
            raise ValueError("must name at least one non-empty source")
        for s in items:
            bad = control_character(str(s))
            if bad:
                raise ValueError(f"{shorten(s)} contains a control character ({bad})")
        return v

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError("each channel must be within 0..255")
        return v

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


class PreprocessParams(_Section):
    image_size: int = Field(32, ge=16, le=4096, description="square side in pixels the model sees")
    resize_mode: Literal["shorter_side_center_crop", "pad_to_square", "stretch"] = "shorter_side_center_crop"
    workers: int = Field(0, ge=0, le=MAX_WORKERS, description="0 = one per CPU core")
    oversample: int = Field(
        0, ge=0, le=10_000_000, description="minimum images per class in train, topped up with augmented copies; 0 = off"
    )
    format: Literal["arrays", "shards"] = Field(
        "arrays", description="arrays = one memory-mapped uint8 array per split (a machine holds it all); shards = "
        "WebDataset tar shards of encoded images, streamed from a folder or gs:// while training"
    )
    shard_size: int = Field(5000, ge=1, le=10_000_000, description="format: shards: images per shard")
    shard_encoding: Literal["jpg", "png", "npy"] = Field(
        "jpg", description="format: shards: jpg (small), png (lossless) or npy (raw pixels: no decode)")
    shard_quality: int = Field(95, ge=1, le=100, description="format: shards, jpg: JPEG quality")


class SplitParams(_Section):
    strategy: Literal["stratified", "predefined"] = "stratified"
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    test_from: Literal["val", "train"] = Field(
        "val",
        description="predefined only, when ingest found no test/ folder: 'val' = the val folder becomes test "
        "and val is carved from train; 'train' = val kept, test carved from train",
    )
    near_duplicate_distance: Optional[int] = Field(
        4, ge=0, le=64, description="max Hamming distance of 64-bit perceptual hashes to group images; null = off"
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitParams":
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train + val + test must sum to 1 (got {self.train} + {self.val} + {self.test} = {total:g})"
            )
        return self


def _non_finite(value: Any, where: str = "") -> Optional[str]:
    """The path (``args.scale.1``) of the first inf/nan float inside *value*, None when every float is finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "the value")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


class AugmentParams(_Section):
    """Training-time augmentation, as albumentations transforms: ``[{Name: {arg: value}}]``."""

    train: list[dict[str, Optional[dict[str, Any]]]] = Field(default_factory=list)

    @field_validator("train")
    @classmethod
    def _one_transform_per_item(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(v):
            if len(item) != 1:
                raise ValueError(f"item {i} must map exactly one transform name to its arguments (got {shorten(item)})")
            ((name, args),) = item.items()
            where = _non_finite(args)
            if where is not None:
                raise ValueError(f"item {i} ({clip(str(name), 60)}): {clip(where, 100)} must be a finite number")
        return v


class TrainParams(_Section):
    arch: str = "resnet18"
    pretrained: bool = False
    pretrained_path: Optional[PathStr] = None
    finetune: Literal["full", "linear_probe", "staged"] = "full"
    freeze_epochs: int = Field(0, ge=0, description="staged: epochs with a frozen backbone before unfreezing")
    epochs: int = Field(15, ge=1, le=10_000, description="epochs to run; with time_budget_minutes, the most epochs the budget may plan")
    time_budget_minutes: Optional[float] = Field(
        None, gt=0, le=100_000,
        description="wall-clock budget of one train run (process start to last checkpoint); the epoch count and the "
        "cosine schedule are sized from the throughput measured in the first steps. null = run train.epochs",
    )
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    lr: float = Field(2e-3, gt=0, le=10)
    head_lr: Optional[float] = Field(None, gt=0, le=10, description="classifier LR; null = lr")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="layer-wise LR decay; null = off")
    weight_decay: float = Field(0.05, ge=0)
    optimizer: str = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: str = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier (timm's drop_rate)")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth (timm's drop_path_rate), where the architecture has it")
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    class_balance: Literal["none", "sampler", "loss"] = "none"
    accum_steps: int = Field(1, ge=1, le=1024)
    clip_grad: Optional[float] = Field(None, gt=0)
    monitor: Literal["val_acc", "val_loss", "ema_val_acc", "ema_val_loss"] = "val_acc"
    early_stop_patience: int = Field(0, ge=0, description="0 = off")
    early_stop_min_delta: float = Field(0.0, ge=0)
    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="seeds weight init, data order and augmentation; the run folder is <arch>/seed<seed>")
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: Optional[int] = Field(None, ge=0, le=MAX_WORKERS, description="DataLoader workers; null = auto")
    shuffle_buffer: int = Field(
        2000, ge=0, le=10_000_000, description="sharded data: samples held for the streaming shuffle; 0 = shard order only"
    )
    deterministic: bool = False
    auto_resume: bool = True
    checkpoint_every_updates: int = Field(
        0, ge=0, description="also write last.pt every N optimizer updates inside an epoch (mid-epoch resume); 0 = epoch ends only"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a timm architecture")
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainParams":
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.finetune == "staged" and not 1 <= self.freeze_epochs < self.epochs:
            raise ValueError(
                f"finetune: staged needs 1 <= freeze_epochs < epochs (got freeze_epochs={self.freeze_epochs}, epochs={self.epochs})"
            )
        if self.class_balance == "loss" and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError("class_balance: loss cannot be combined with mixup/cutmix (soft targets); use sampler")
        if self.monitor.startswith("ema_") and not self.ema:
            raise ValueError(f"monitor: {self.monitor} needs ema: true")
        return self

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class EvaluateParams(_Section):
    checkpoint: Literal["best", "last"] = "best"
    weights: Literal["auto", "model", "ema"] = Field(
        "auto", description="auto: the EMA weights when train.monitor picked the checkpoint by an ema_ metric, else the model's"
    )
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    top_k: int = Field(5, ge=2, description="top-k accuracy (reported when k < number of classes)")
    tta_flip: bool = Field(False, description="average the softmax of the image and its horizontal flip")
    ece_bins: int = Field(15, ge=2, le=100)
    gallery_size: int = Field(16, ge=0, le=100, description="most confident mistakes drawn in mistakes.png")
    table_images: int = Field(200, ge=0, description="test images (with predictions) logged to the W&B table")
    latency_runs: int = Field(30, ge=1, le=100_000, description="timed batch-1 forward passes (after warmup); the median is reported")
    throughput_batch: int = Field(32, ge=1, le=MAX_BATCH)
    export: bool = Field(True, description="write TorchScript + ONNX to <paths.exports>/<arch>/seed<seed>/ and check parity")
    parity_tolerance: float = Field(1e-4, gt=0, description="max abs logit difference allowed between eager and exports")
    parity_images: int = Field(64, ge=1, description="test images the parity check runs on")
    calibrate: bool = Field(True, description="fit temperature scaling on the val split; exports and reported probabilities use it")
    ci_level: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the intervals beside every test metric")
    bootstrap_resamples: int = Field(
        1000, ge=0, le=100_000, description="stratified bootstrap resamples for macro-F1, ROC-AUC and ECE intervals; 0 = none"
    )
    bootstrap_seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the bootstrap resampling")


class CompareParams(_Section):
    """``cvpipe compare``: the best architecture by ``metric`` is tested against each other one on the same test
    images; among those not significantly worse (the tie group), the cheapest by ``cost`` is promoted."""

    metric: Literal["accuracy", "macro_f1", "weighted_f1", "roc_auc", "top_k_accuracy"] = "accuracy"
    max_latency_ms: Optional[float] = Field(None, gt=0, description="only models with batch-1 latency <= this can win")
    max_size_mb: Optional[float] = Field(None, gt=0, description="only models whose ONNX file is <= this can win")
    promote: bool = Field(True, description="copy the winner to <paths.models>/best/")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the paired tests (and 1 - level of the intervals)")
    cost: Literal["latency_ms", "size_mb", "gflops"] = Field(
        "latency_ms", description="promotes the cheapest model of the tie group by this: batch-1 latency, ONNX size or FLOPs"
    )
    correction: Literal["holm", "none"] = Field(
        "holm", description="multiple-comparison correction of the best-vs-each-other p-values"
    )
    resamples: int = Field(
        5000, ge=200, le=1_000_000, description="paired bootstrap / sign-flip resamples of the tests that are not exact"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the resampling, so a rerun gives the same p-values")


class AuditParams(_Section):
    """``cvpipe audit``: cross-fitted probabilities for train+val, then cleanlab's confident learning."""

    folds: int = Field(5, ge=2, le=50, description="cross-fitting folds: each image is scored by a model fitted without it")
    features: Literal["auto", "pixels", "embeddings"] = Field(
        "auto", description="what the cross-fitted model sees; auto = embeddings when a backbone is set, else pixels"
    )
    backbone: Optional[PathStr] = Field(
        None, description="train checkpoint (best.pt/last.pt) or pretrained timm weights of train.arch; null = train.pretrained_path"
    )
    embedding_head: Literal["logistic", "knn"] = Field("logistic", description="model fitted on the embeddings")
    regularization: float = Field(1.0, gt=0, le=1e6, description="C of the logistic regression on the embeddings (larger = less regularized)")
    batch_size: int = Field(64, ge=1, le=4096, description="images per forward pass when computing embeddings")
    device: str = Field("auto", description="torch device for the embeddings: auto, cpu, cuda, cuda:1, mps")
    pixel_size: int = Field(8, ge=4, le=128, description="side the prepared images are shrunk to for the pixel features")
    pca_components: Optional[int] = Field(
        32, ge=1, le=4096, description="PCA dimensions of the pixels before the nearest-neighbour search; null = no PCA"
    )
    neighbors: int = Field(15, ge=1, le=1000, description="k of the distance-weighted k-nearest-neighbour classifier")
    knn_index: Literal["auto", "exact", "hnsw"] = Field(
        "auto", description="the k-NN's neighbour search: exact, hnsw (faiss, approximate, sub-quadratic), auto = hnsw above 150k images"
    )
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"] = Field(
        "prune_by_noise_rate", description="cleanlab.filter.find_label_issues' filter_by"
    )
    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="seeds the fold assignment (scikit-learn's random_state: at most 2**32-1)")
    gallery_size: int = Field(16, ge=0, le=400, description="top suspects drawn in plots/audit/suspects.png (0 = none)")
    table_images: int = Field(200, ge=0, le=100_000, description="top suspects logged with their images to the W&B table")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class BakeoffParams(_Section):
    group: Optional[str] = Field(None, description="W&B group of the bake-off runs; null = <prepared>-<data hash>")
    archs: dict[str, Optional[dict[str, Any]]] = Field(
        default_factory=lambda: {"resnet18": {}}, description="architecture -> train.* overrides"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [42],
        description="train.seed of each run: dvc.yaml trains and evaluates every architecture x seed (a matrix)",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a seed twice: {v}")
        bad = [s for s in v if not 0 <= s < 2**32]
        if bad:
            raise ValueError(f"seeds must be in [0, 2**32): {bad}")
        return v

    def cells(self) -> list[tuple[str, int]]:
        """Every (architecture, seed) run of the bake-off, in params order: dvc.yaml's matrix."""
        return [(arch, seed) for arch in self.archs for seed in self.seeds]

    @field_validator("archs")
    @classmethod
    def _archs(cls, v: dict[str, Optional[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("must list at least one architecture")
        out = {}
        for arch, ov in v.items():
            ov = dict(ov or {})
            if "seed" in ov:  # a cell's seed names its folder (run_name): one source, the seeds list
                raise ValueError(f"{clip(str(arch), 60)}: seed is not an override; list the seeds in bakeoff.seeds")
            bad = sorted(set(ov) - (set(TrainParams.model_fields) - {"arch"}))
            if bad:
                raise ValueError(f"{clip(str(arch), 60)}: {clip(', '.join(bad), 100)} is not a train.* key")
            out[str(arch)] = ov
        return out


class ServeParams(_Section):
    """``cvpipe serve``: the web app and JSON API around one trained model."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: PathStr = Field("models/best", description="promoted model folder, or a train checkpoint .pt; local or gs://")
    top_k: int = Field(5, ge=1, le=1000)
    max_upload_bytes: int = Field(10 * 1024**2, ge=1, description="larger uploads get 413")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are refused before decoding (decompression bomb)")
    min_size: int = Field(8, ge=1)
    max_aspect_ratio: float = Field(20.0, ge=1)
    request_timeout_s: float = Field(30.0, gt=0, description="a request (upload + inference) slower than this gets 504/408")
    inference_threads: int = Field(2, ge=1, le=64, description="requests decoded and run through the model at once")
    torch_threads: int = Field(0, ge=0, le=MAX_WORKERS, description="torch intra-op threads; 0 = cores / inference_threads")
    backend: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="auto: onnxruntime for a folder with a uint8-pixel model.onnx (cpu), else torch")
    onnx_threads: int = Field(0, ge=0, le=MAX_WORKERS,
                              description="onnxruntime intra-op threads per run; 0 = cores / inference_threads")
    batch_window_ms: float = Field(0.0, ge=0, le=1000, description="micro-batching window; 0 = off")
    max_batch_size: int = Field(8, ge=1, le=1024, description="most requests run as one micro-batch")
    device: str = "cpu"
    idle_timeout_s: float = Field(5.0, gt=0, le=3600, description="a connection that sends nothing for this long is closed")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="a request head not complete within this gets 408")
    max_active_requests: int = Field(64, ge=1, le=100_000, description="requests in progress at once; more get 503 (not /healthz)")
    max_connections: int = Field(2048, ge=1, le=1_000_000, description="open sockets; above it the longest-idle one is closed")
    large_image_pixels: int = Field(4_000_000, ge=1, description="images above this are decoded one at a time")
    review: bool = Field(False, description="mount the label review page (/review) and API (/api/review/...)")
    abstain_below: float = Field(
        0.0, ge=0, lt=1,
        description="answer 'unsure' (label null, with the top-k) when the calibrated top-1 probability is below this; 0 = never")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class WandbParams(_Section):
    project: str = "cvpipe"
    entity: Optional[str] = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    registry: Optional[str] = Field(
        "wandb-registry-model/cvpipe",
        description="registry collection compare links the promoted model into (alias best); null = no link",
    )

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", v):
            raise ValueError(
                f"{v!r} is not a registry collection: write wandb-registry-<registry>/<collection> "
                "(e.g. wandb-registry-model/cvpipe), <project>/<collection> for the legacy model registry, or null"
            )
        return v


class VertexParams(_Section):
    """``cvpipe vertex-job``: the Vertex AI custom job that runs ``cvpipe train`` from the train image
    (cvpipe.train.vertex). Nothing in the pipeline itself reads this section."""

    image_uri: str = Field("", description="the train image in Artifact Registry: REGION-docker.pkg.dev/PROJECT/REPO/cvpipe-train:TAG")
    machine_type: str = Field("n1-standard-8", min_length=1, description="Compute Engine machine type of every node")
    accelerator_type: str = Field(
        "", description="'' for none, else a MachineSpec.acceleratorType such as NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_H100_80GB")
    accelerator_count: int = Field(0, ge=0, le=16, description="accelerators per node (0 with accelerator_type '')")
    nodes: int = Field(1, ge=1, le=256, description="machines: workerpool0 (1, hosts the rendezvous) + workerpool1 (nodes - 1)")
    nproc_per_node: Union[Literal["auto"], Annotated[int, Field(ge=1, le=64)]] = Field(
        "auto", description="processes per node: auto = one per GPU (one per CPU core without one)")
    max_restarts: int = Field(3, ge=0, le=100, description="torchrun --max-restarts: group restarts after a worker dies")
    rdzv_port: int = Field(29400, ge=1024, le=65535, description="c10d rendezvous port on the workerpool0 machine")
    boot_disk_gb: int = Field(100, ge=10, le=65536, description="boot disk per node (the gs:// prepared data is copied there)")
    boot_disk_type: Literal["pd-ssd", "pd-standard", "hyperdisk-balanced"] = "pd-ssd"
    service_account: str = Field("", description="the job's service account e-mail ('' = the project's Vertex AI default)")
    timeout_hours: float = Field(24.0, gt=0, le=24 * 30, description="the job is stopped after this long")
    base_output_dir: str = Field("", description="gs:// prefix Vertex AI exposes as AIP_MODEL_DIR etc. ('' = none)")

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Z0-9_]+", v):
            raise ValueError(f"{v!r} is not a MachineSpec.acceleratorType (e.g. NVIDIA_TESLA_T4, NVIDIA_L4)")
        return v

    @field_validator("base_output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        if v and not v.startswith("gs://"):
            raise ValueError(f"{v!r}: Vertex AI writes only to a gs:// prefix")
        return v

    @model_validator(mode="after")
    def _accelerator_pair(self) -> "VertexParams":
        if bool(self.accelerator_type) != bool(self.accelerator_count):
            raise ValueError("accelerator_type and accelerator_count go together: both set, or '' and 0")
        return self


class Params(_Section):
    paths: PathsParams = Field(default_factory=PathsParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    split: SplitParams = Field(default_factory=SplitParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    compare: CompareParams = Field(default_factory=CompareParams)
    audit: AuditParams = Field(default_factory=AuditParams)
    bakeoff: BakeoffParams = Field(default_factory=BakeoffParams)
    wandb: WandbParams = Field(default_factory=WandbParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    vertex: VertexParams = Field(default_factory=VertexParams)

    @model_validator(mode="after")
    def _bakeoff_overrides_valid(self) -> "Params":
        base = self.train.model_dump()
        for arch, ov in self.bakeoff.archs.items():
            try:
                TrainParams.model_validate({**base, **ov, "arch": arch})
            except ValidationError as exc:
                e = exc.errors()[0]
                loc = ".".join(str(p) for p in e["loc"])
                got = "" if isinstance(e.get("input"), dict) else f" (got {shorten(e.get('input'))})"
                raise ValueError(f"bakeoff.archs.{clip(str(arch), 60)}{'.' + loc if loc else ''}: {e['msg']}{got}") from None
        return self

    def for_arch(self, arch: str, keep: frozenset[str] = frozenset()) -> "Params":
        """These params with ``train.arch = arch`` and that architecture's ``bakeoff.archs`` overrides applied.

        Per-architecture overrides win over ``train.*`` in params.yaml, except the
        ``train.*`` keys named in *keep* (set explicitly on the command line); the
        bake-off's W&B group (``bakeoff.group``) applies when ``wandb.group`` is unset.
        """
        data = self.model_dump()
        ov = {k: v for k, v in self.bakeoff.archs.get(arch, {}).items() if k not in keep}
        data["train"] = {**data["train"], **ov, "arch": arch}
        if data["wandb"]["group"] is None and self.bakeoff.group:
            data["wandb"]["group"] = self.bakeoff.group
        return Params.model_validate(data)

    @property
    def run_name(self) -> str:
        """This run's folder under paths.models / exports / metrics / plots: ``<arch>/seed<seed>``."""
        return run_name(self.train.arch, self.train.seed)

    def resolved(self) -> dict[str, Any]:
        """Plain-JSON view of every value, defaults included (logged with each run)."""
        return self.model_dump(mode="json")


def run_name(arch: str, seed: int) -> str:
    """One bake-off cell's folder name under paths.models, exports, metrics and plots: ``<arch>/seed<seed>``
    (dvc.yaml's matrix writes the same paths)."""
    return f"{arch}/seed{seed}"


# --------------------------------------------------------------------------- loading

MAX_PARAMS_BYTES = 1024**2  # a params file is a few kilobytes; anything near this is not one
MAX_YAML_DEPTH = 32  # nesting levels (the deepest params are augment arguments, about 6)
MAX_ERRORS_SHOWN = 20


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what a params file never needs and what makes loading unbounded:

    * anchors and aliases (``&a``/``*a``, merge keys): a few hundred bytes of aliases expand to
      billions of nodes (the "billion laughs"), which validation and error messages would walk;
    * nesting deeper than :data:`MAX_YAML_DEPTH` (the composer recurses: ``[[[[...`` overflows the stack);
    * integers too long for Python to convert (``int()`` refuses more than 4,300 digits);
    * a key given twice in one mapping: PyYAML keeps the last silently, so an edit lower in the
      file (``train:`` pasted twice, a second ``lr:``) would quietly undo another.

    Each is a :class:`yaml.MarkedYAMLError` with the line and column where it appears.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise yaml.composer.ComposerError(
                None, None, f"YAML anchors and aliases are not allowed in params (found {clip(what, 60)}); write the value out",
                event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"values nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(str(node.value)):,} characters is too long", node.start_mark
            ) from None


    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if seen is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {clip(repr(key), 60)} is given twice in one mapping (first at line {seen.line + 1});"
                        " keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


_ParamsLoader.add_constructor("tag:yaml.org,2002:int", _ParamsLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """*text* parsed as a params file is (no aliases, bounded nesting); raises :class:`yaml.YAMLError`."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # belt and braces: the depth cap above should make this unreachable
        raise yaml.YAMLError(f"values nested too deep (more than {MAX_YAML_DEPTH} levels)") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``at line 3, column 5: <problem>`` for a YAML error, short whatever the input was."""
    if isinstance(exc, yaml.reader.ReaderError):  # its str() spans two lines
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f" at character {exc.position + 1}: unacceptable character #x{char:04x} ({exc.reason})"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}: {clip(str(problem), 300)}"


def _format_validation_error(err: ValidationError, source: str, cli_keys: frozenset[str] = frozenset()) -> str:
    errors = err.errors()
    lines = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(clip(str(p), 60) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {shorten(got)})"
        if any(loc == k or loc.startswith(k + ".") for k in cli_keys):
            shown += " (set on the command line)"
        if not e["loc"] and re.match(r"[\w.]+: ", msg):  # a check across sections names its own key
            lines.append(f"{clip(msg, 300)}{shown}")
        else:
            lines.append(f"{loc}: {clip(msg, 300)}{shown}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN:,} more errors")
    head = f"invalid params in {source}: " if len(lines) == 1 else f"invalid params in {source}:\n  "
    return head + "\n  ".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML (as params.yaml is)."""
    if "=" not in item:
        raise ParamsError(f"override {shorten(item)} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override {shorten(item)} has an empty key")
    key = clip(key, 200)
    if re.search("[\udc80-\udcff]", item):  # bytes the command line could not decode (surrogateescape)
        raise ParamsError(f"{key}: the value given with -S is not UTF-8 text")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"{key}: the value given with -S is not valid YAML{_yaml_problem(exc)}") from None
    return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying what it touches)."""
    out = dict(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ParamsError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def read_params_file(path: Path) -> Any:
    """The YAML document in *path*: at most :data:`MAX_PARAMS_BYTES`, UTF-8, loaded by :class:`_ParamsLoader`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ParamsError(f"cannot read params file {path}: {exc.strerror}") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path} is larger than {MAX_PARAMS_BYTES // 1024**2} MiB: not a params file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ParamsError(
            f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (save the file as UTF-8)"
        ) from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML{_yaml_problem(exc)}") from None


def load_params(path: Union[str, Path, None] = None, overrides: Optional[dict[str, Any]] = None) -> Params:
    """Read, override and validate params.

    A missing *default* file means "all defaults"; a missing file the user named is an error.
    """
    explicit = path is not None
    path = Path(path) if path is not None else Path(DEFAULT_PARAMS_FILE)
    data: Any = {}
    if path.exists():
        data = read_params_file(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of sections (got {type(data).__name__})")
    elif explicit:
        raise ParamsError(f"params file not found: {path}")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(exc, str(path), frozenset(overrides or ()))) from None
