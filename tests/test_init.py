"""`cvpipe init`: the recipe rules (pure), and the command end to end on real data, the sample and DVC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import cvpipe
from repo_files import copy_pipeline

from cvpipe.core.config import Params, load_params, run_name
from cvpipe.data import augment
from cvpipe.init import recipe
from cvpipe.init.recipe import DataProfile, MachineProfile, RecipeOptions, SizeStats

CPU = MachineProfile(cpu_cores=2, ram_gib=16, accelerator="cpu", bf16=True, amp="bf16")
GPU = MachineProfile(cpu_cores=16, ram_gib=128, accelerator="cuda", gpu_name="NVIDIA H200", gpu_mem_gib=139.8,
                     bf16=True, amp="bf16")
SMALL_GPU = replace(GPU, gpu_name="NVIDIA T4", gpu_mem_gib=15.0, bf16=False, amp="fp16")


def profile(native: int, counts: dict[str, int], *, sources=("/data/photos",), longer: int | None = None,
            splits: dict[str, int] | None = None) -> DataProfile:
    side = SizeStats(native, native, native)
    return DataProfile(
        sources=tuple(sources), class_counts=counts, shorter_side=side,
        longer_side=SizeStats(longer, longer, longer) if longer else side, scanned=sum(counts.values()),
        split_counts=splits or {},
    )


DIGITS = profile(8, {str(i): 180 for i in range(10)}, sources=("sample://digits",))
PHOTOS = profile(375, {"ants": 124 + 70, "bees": 121 + 83}, longer=500, splits={"train": 245, "val": 153})
BIG_PHOTOS = profile(480, {f"c{i}": 2000 for i in range(20)}, longer=640)


def _names(augs: list[dict]) -> list[str]:
    return [next(iter(a)) for a in augs]


def _buildable(augs: list[dict]) -> None:
    augment.build(Params.model_validate({"augment": {"train": augs}}).augment)


# ----------------------------------------------------------------------------- rules


def test_digits_recipe_is_32px_unflipped_and_unweighted():
    r = recipe.build_recipe(DIGITS, CPU, RecipeOptions())
    assert r["preprocess.image_size"].value == 32
    assert "smallest input" in r["preprocess.image_size"].reason
    augs = r["augment.train"].value
    assert "HorizontalFlip" not in _names(augs) and _names(augs) == ["Affine"]
    assert "mirrored digits" in r["augment.train"].reason
    assert r["train.class_balance"].value == "none"
    assert r["split.strategy"].value == "stratified"
    assert r["train.batch_size"].value == 64 and r["train.lr"].value == 0.1
    assert r["train.optimizer"].value == "sgd" and r["train.weight_decay"].value == 5e-4
    _buildable(augs)


def test_flip_is_the_default_and_no_flip_turns_it_off():
    assert _names(recipe.build_recipe(PHOTOS, CPU, RecipeOptions())["augment.train"].value)[0] == "HorizontalFlip"
    off = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(no_flip=True))["augment.train"]
    assert "HorizontalFlip" not in _names(off.value) and "--no-flip" in off.reason
    # 10 tiny classes that are not the digits sample still get flips: no guessing from the shape of the data
    tiny = replace(DIGITS, sources=("/data/tiny",))
    assert "HorizontalFlip" in _names(recipe.build_recipe(tiny, CPU, RecipeOptions())["augment.train"].value)


@pytest.mark.parametrize("native, machine, expected", [
    (8, CPU, 32), (40, CPU, 32), (100, CPU, 96), (375, CPU, 128),
    (375, SMALL_GPU, 224), (375, GPU, 320), (300, GPU, 288), (230, GPU, 224), (2000, GPU, 320),
])
def test_image_size_follows_native_resolution_capped_by_hardware(native, machine, expected):
    choice = recipe.image_size(profile(native, {"a": 10, "b": 10}), machine)
    assert choice.value == expected
    assert choice.value % 32 == 0 and choice.value <= max(native, 32)
    if native > 128 and machine is CPU:
        assert "capped at 128" in choice.reason and "2 cores" in choice.reason


def test_imbalance_picks_loss_weighting_then_sampler_with_the_ratio():
    loss = recipe.class_balance(profile(64, {"a": 400, "b": 100}))
    assert loss.value == "loss" and "4.00" in loss.reason
    sampler = recipe.class_balance(profile(64, {"a": 1200, "b": 100}))
    assert sampler.value == "sampler" and "12.00" in sampler.reason
    assert recipe.class_balance(profile(64, {"a": 250, "b": 100})).value == "none"


def test_gpu_gets_bigger_architectures_and_a_vit_at_224():
    cpu = recipe.arch_shortlist(CPU, 128, RecipeOptions()).value
    gpu = recipe.arch_shortlist(GPU, 320, RecipeOptions()).value
    assert list(cpu) == ["resnet18", "mobilenetv3_large_100", "convnext_atto"]
    assert list(gpu) == ["convnext_tiny", "efficientnet_b2", "resnet50"]
    vit = recipe.arch_shortlist(GPU, 224, RecipeOptions(pretrained=True, max_archs=4)).value
    assert list(vit)[1] == recipe.VIT_ARCH
    assert recipe.VIT_ARCH not in recipe.arch_shortlist(SMALL_GPU, 224, RecipeOptions(max_archs=4)).value
    assert list(recipe.arch_shortlist(CPU, 128, RecipeOptions(max_archs=1)).value) == ["resnet18"]
    first = recipe.arch_shortlist(CPU, 128, RecipeOptions(arch="convnext_atto", max_archs=2)).value
    assert list(first) == ["convnext_atto", "resnet18"]


def test_every_shortlisted_architecture_is_a_timm_model_with_weights():
    import timm

    for name in [n for n, _ in recipe.CPU_ARCHS + recipe.GPU_ARCHS] + [recipe.VIT_ARCH]:
        assert timm.is_model(name) and timm.list_models(name, pretrained=True), name


def test_gpu_recipe_scales_size_batch_and_crops():
    r = recipe.build_recipe(BIG_PHOTOS, GPU, RecipeOptions())
    assert r["preprocess.image_size"].value == 320
    assert r["train.batch_size"].value == 256
    # convnext_tiny leads the GPU shortlist: AdamW from scratch; the classic CNNs after it get SGD overrides
    assert r["train.lr"].value == recipe.default_lr(256, False, "convnext_tiny") == 0.004
    assert r["train.optimizer"].value == "adamw"
    assert r["bakeoff.archs"].value["resnet50"] == {"optimizer": "sgd", "lr": 0.4, "weight_decay": 5e-4}
    crop = [a for a in r["augment.train"].value if "RandomResizedCrop" in a][0]["RandomResizedCrop"]
    assert crop["scale"] == [0.35, 1.0] and crop["size"] == [320, 320]
    assert _names(r["augment.train"].value) == ["HorizontalFlip", "RandomResizedCrop", "ColorJitter"]
    assert "GPU" in r["train.device"].reason or "cuda" in r["train.device"].reason
    _buildable(r["augment.train"].value)


def test_small_photo_sets_get_gentle_affine_not_resized_crops():
    r = recipe.build_recipe(PHOTOS, CPU, RecipeOptions())
    assert _names(r["augment.train"].value) == ["HorizontalFlip", "Affine", "ColorJitter"]
    _buildable(r["augment.train"].value)


@pytest.mark.parametrize("bs, pretrained, arch, lr", [
    (64, False, "resnet18", 0.1), (16, False, "resnet18", 0.025), (256, False, "resnet50", 0.4),  # SGD, linear
    (64, False, "convnext_atto", 0.002), (16, False, "vit_small_patch16_224", 0.001),  # AdamW, sqrt
    (64, True, "resnet18", 0.0005), (256, True, "convnext_tiny", 0.001), (32, True, "resnet18", 0.000354),
])
def test_default_lr_rule(bs, pretrained, arch, lr):
    assert recipe.default_lr(bs, pretrained, arch) == pytest.approx(lr)


def test_optimizer_follows_the_architecture_family_and_bakeoff_entries_override_it():
    r = recipe.build_recipe(PHOTOS, CPU, RecipeOptions())
    assert (r["train.optimizer"].value, r["train.lr"].value, r["train.weight_decay"].value) == ("sgd", 0.025, 5e-4)
    archs = r["bakeoff.archs"].value
    assert archs["resnet18"] == {} and archs["mobilenetv3_large_100"] == {}
    assert archs["convnext_atto"] == {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05}
    assert "AdamW" in dict((p.value, p.reason) for p in r["bakeoff.archs"].parts)["convnext_atto"]
    first = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(arch="convnext_atto", max_archs=2))
    assert first["train.optimizer"].value == "adamw" and first["train.lr"].value == 0.001
    assert first["bakeoff.archs"].value["resnet18"] == {"optimizer": "sgd", "lr": 0.025, "weight_decay": 5e-4}
    at_224 = replace(BIG_PHOTOS, shorter_side=SizeStats(230, 230, 230), longer_side=SizeStats(300, 300, 300))
    vit = recipe.build_recipe(at_224, GPU, RecipeOptions(max_archs=4, arch="resnet50"))
    assert vit["train.optimizer"].value == "sgd" and vit["bakeoff.archs"].value[recipe.VIT_ARCH]["optimizer"] == "adamw"
    tuned = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(pretrained=True))
    assert tuned["train.optimizer"].value == "adamw" and all(v == {} for v in tuned["bakeoff.archs"].value.values())
    assert recipe.wants_adamw("convnextv2_nano") and recipe.wants_adamw("deit3_small_patch16_224")
    assert not recipe.wants_adamw("resnet50") and not recipe.wants_adamw("efficientnet_b2")


def test_ema_and_the_tested_checkpoint_follow_the_split_sizes():
    small = recipe.build_recipe(PHOTOS, CPU, RecipeOptions())  # 201 train / 44 val images
    assert small["train.ema"].value is True and small["train.ema_decay"].value == 0.995  # 200 updates, the floor
    assert small["train.monitor"].value == "ema_val_acc"
    assert (small["evaluate.checkpoint"].value, small["evaluate.weights"].value) == ("last", "ema")
    assert "44 val images" in small["evaluate.checkpoint"].reason
    big = recipe.build_recipe(BIG_PHOTOS, GPU, RecipeOptions())  # 28,000 train / 6,000 val images, batch 256
    assert big["train.ema_decay"].value == pytest.approx(1 - 1 / 1100, abs=1e-5)  # 10 epochs of 110 updates
    assert (big["evaluate.checkpoint"].value, big["evaluate.weights"].value) == ("best", "auto")
    assert recipe.estimated_val_images(PHOTOS) == 44 and recipe.estimated_val_images(BIG_PHOTOS) == 6000


def test_pretrained_uses_layer_decay_head_lr_and_fewer_epochs():
    scratch = recipe.build_recipe(PHOTOS, CPU, RecipeOptions())
    tuned = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(pretrained=True))
    bs = tuned["train.batch_size"].value
    assert tuned["train.lr"].value == recipe.default_lr(bs, pretrained=True)
    assert tuned["train.layer_decay"].value == 0.75
    assert tuned["train.head_lr"].value == pytest.approx(10 * tuned["train.lr"].value)
    assert scratch["train.layer_decay"].value is None and scratch["train.head_lr"].value is None
    assert tuned["train.epochs"].value < scratch["train.epochs"].value
    assert tuned["train.pretrained"].value is True
    path = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(pretrained_path="w.safetensors", arch="resnet50"))
    assert list(path["bakeoff.archs"].value) == ["resnet50"] and path["train.pretrained_path"].value == "w.safetensors"


def test_batch_size_is_a_power_of_two_bounded_by_dataset_and_hardware():
    assert recipe.batch_size(201, CPU, 128).value == 16  # 1/8 of the training images
    assert recipe.batch_size(40, CPU, 128).value == 8  # never below 8
    assert recipe.batch_size(100_000, CPU, 128).value == 32
    assert recipe.batch_size(100_000, CPU, 32).value == 64
    assert recipe.batch_size(100_000, SMALL_GPU, 224).value == 64
    assert recipe.batch_size(100_000, GPU, 224).value == 256


def test_epochs_warmup_and_time_budget():
    assert recipe.epochs(200, RecipeOptions()).value > recipe.epochs(50_000, RecipeOptions()).value
    r = recipe.build_recipe(PHOTOS, CPU, RecipeOptions())
    assert r["train.epochs"].value == 100 and r["train.warmup_epochs"].value == 5
    assert r["train.time_budget_minutes"].value is None
    budget = recipe.build_recipe(PHOTOS, CPU, RecipeOptions(time_budget_minutes=15))
    assert budget["train.time_budget_minutes"].value == 15
    assert budget["train.epochs"].value == 200 and budget["train.warmup_epochs"].value == 1


def test_split_keeps_train_val_folders():
    r = recipe.split_rule(PHOTOS)
    assert r["strategy"].value == "predefined" and r["test_from"].value == "val"
    assert recipe.estimated_train_images(PHOTOS) == 201  # what preprocess makes of 245 train/ images
    for partial in ({"train": 300}, {"train": 245, "val": 100}):  # no held-out folder; files outside the folders
        assert recipe.split_rule(replace(PHOTOS, split_counts=partial))["strategy"].value == "stratified"
    both = replace(PHOTOS, split_counts={"train": 245, "val": 100, "test": 53})
    assert "test_from" not in recipe.split_rule(both) and recipe.estimated_train_images(both) == 245


def test_device_and_amp_stay_auto_and_say_what_they_resolve_to():
    cpu = recipe.device_amp(CPU)
    assert cpu["device"].value == "auto" and "cpu" in cpu["device"].reason and "bf16" in cpu["amp"].reason
    assert "fp16" in recipe.device_amp(SMALL_GPU)["amp"].reason


# ----------------------------------------------------------------------------- the command


def _params_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.realdata
def test_init_on_hymenoptera_writes_a_valid_commented_recipe(real_data, tmp_path):
    from cvpipe.init.stage import machine_profile

    out = tmp_path / "params.yaml"
    proc = cvpipe("init", str(real_data / "hymenoptera_data"), "--params", str(out), "--no-estimate", cwd=tmp_path)
    assert "recipe written to" in proc.stderr
    p = load_params(out)
    assert p.split.strategy == "predefined" and p.split.test_from == "val"
    assert p.ingest.source == str(real_data / "hymenoptera_data")
    if machine_profile().accelerator == "cpu":
        assert p.preprocess.image_size == 128
        assert list(p.bakeoff.archs) == ["resnet18", "mobilenetv3_large_100", "convnext_atto"]
    assert p.train.arch == next(iter(p.bakeoff.archs))
    assert p.train.lr == recipe.default_lr(p.train.batch_size, pretrained=False)
    assert p.train.class_balance == "none"
    assert [next(iter(a)) for a in p.augment.train][0] == "HorizontalFlip"
    augment.build(p.augment)
    text = out.read_text()
    assert "# Data: " in text and "2 classes" in text and "folders or a split column): train 245, val 153" in text
    assert "# the source is split already (train 245 / val 153)" in text
    assert "# native shorter side median 374 px" in text
    # complete: every section and key of the schema is written out
    data = _params_of(out)
    for section, field in Params.model_fields.items():
        assert set(data[section]) == set(field.annotation.model_fields), section

    # a second run without --force refuses, exit 2, and leaves the file byte-identical
    before = out.read_bytes()
    again = cvpipe("init", "sample://digits", "--params", str(out), cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before
    cvpipe("init", "sample://digits", "--params", str(out), "--force", "--quiet", cwd=tmp_path)
    assert load_params(out).ingest.source == "sample://digits"


def test_init_on_the_digits_sample(tmp_path):
    out = tmp_path / "params.yaml"
    cvpipe("init", "sample://digits", "--params", str(out), "--quiet", cwd=tmp_path)
    p = load_params(out)
    assert p.preprocess.image_size == 32
    assert p.split.strategy == "stratified"
    assert [next(iter(a)) for a in p.augment.train] == ["Affine"]
    assert p.train.class_balance == "none" and p.train.time_budget_minutes is None
    text = out.read_text()
    assert "10 classes" in text and "1,797 images" in text and "mirrored digits" in text


def test_init_time_budget_pretrained_path_and_relative_source(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for cls, color in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (data / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (96 + i, 80), color).save(data / cls / f"{i}.png")
    Image.new("RGB", (96, 80), (200, 0, 0)).save(data / "red" / "copy.png")  # same bytes as red/0.png
    (data / "blue" / "broken.jpg").write_text("<html>not found</html>")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    project = tmp_path / "project"
    project.mkdir()
    cvpipe("init", "data", "--params", "project/params.yaml", "--time-budget", "7.5", "--max-archs", "2",
           "--pretrained-path", "w.safetensors", "--arch", "resnet18", "--quiet", cwd=tmp_path)
    p = load_params(project / "params.yaml")
    assert p.ingest.source == "../data" and p.train.pretrained_path == "../w.safetensors"
    assert p.train.time_budget_minutes == 7.5 and p.train.epochs == 60  # a cap: 2x the 30 epochs of a small fine-tune
    assert list(p.bakeoff.archs) == ["resnet18"] and p.train.layer_decay == 0.75
    text = (project / "params.yaml").read_text()
    assert "1 exact duplicate(s), 1 unreadable" in text


def test_init_says_how_long_the_planned_repro_takes_here(tmp_path):
    """A real probe (a few training steps of each planned arch at 32 px): the line names the planned archs
    and epochs, and its minutes are the per-epoch seconds it measured x the epochs, summed."""
    from cvpipe.init import estimate

    proc = cvpipe("init", "sample://digits", "--params", str(tmp_path / "params.yaml"), cwd=tmp_path)
    p = load_params(tmp_path / "params.yaml")
    m = re.search(r"dvc repro will take about ([\d.]+) min here \((\d+) archs x (\d+) epochs\)(; add --time-budget MIN to cap it)?",
                  proc.stdout + proc.stderr)
    assert m, (proc.stdout + proc.stderr)[-1500:]
    assert int(m.group(2)) == len(p.bakeoff.archs) and int(m.group(3)) == p.train.epochs
    assert float(m.group(1)) > 0 and (m.group(4) is not None) == (float(m.group(1)) > estimate.SUGGEST_BUDGET_ABOVE_MIN)
    no_probe = cvpipe("init", "sample://digits", "--params", str(tmp_path / "p2.yaml"), "--no-estimate", cwd=tmp_path)
    assert "dvc repro will take" not in no_probe.stdout + no_probe.stderr


def test_repro_estimate_arithmetic_hint_and_budget(monkeypatch):
    from cvpipe.init import estimate

    calls = []
    monkeypatch.setattr(estimate, "seconds_per_image", lambda arch, size, bs, n: calls.append((arch, bs)) or 0.01)
    est = estimate.estimate_repro({"a": {}, "b": {"batch_size": 32, "epochs": 10}}, 64, 16, 100, 5, 100, 30, None)
    # a: 100 epochs x 0.01 s x (7 steps x 16 + 30/3); b: 10 epochs x 0.01 s x (4 x 32 + 10)
    assert est.minutes == pytest.approx((100 * 0.01 * (112 + 10) + 10 * 0.01 * (128 + 10)) / 60)
    assert calls == [("a", 16), ("b", 32)]
    assert est.message() == "dvc repro will take about 2.3 min here (2 archs x 100 epochs)"
    long = estimate.ReproEstimate(95.0, 3, 100, {}, False)
    assert long.message() == "dvc repro will take about 95 min here (3 archs x 100 epochs); add --time-budget MIN to cap it"
    budgeted = estimate.estimate_repro({"a": {}, "b": {}}, 64, 16, 100, 5, 100, 30, 7.5)
    assert budgeted.minutes == 15.0 and "--time-budget" not in budgeted.message() and len(calls) == 2  # nothing probed


@pytest.mark.parametrize("args, message", [
    (["--pretrained-path", "missing.pth", "--arch", "resnet18"], "--pretrained-path"),
    (["--pretrained-path", "w.pth"], "--arch"),
    (["--arch", "resnet_18"], "--arch"),
    (["--time-budget", "0"], "--time-budget"),
    (["--pretrained", "--pretrained-path", "w.pth", "--arch", "resnet18"], "exclude"),
])
def test_init_bad_options_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "w.pth").write_bytes(b"x")
    proc = cvpipe("init", "sample://digits", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "params.yaml").exists()


def test_init_missing_source_exits_2(tmp_path):
    proc = cvpipe("init", str(tmp_path / "nope"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert not (tmp_path / "params.yaml").exists()


def test_init_output_passes_dvc_repro_dry_with_the_repository_dvc_yaml(tmp_path):
    """dvc.yaml's matrix over bakeoff.archs x bakeoff.seeds and every params key its stages track resolve against the written file."""
    repo = copy_pipeline(tmp_path / "repo")
    cvpipe("init", "sample://digits", "--quiet", cwd=repo)
    p = load_params(repo / "params.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.site_cache_dir", str(tmp_path / "site")]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    # a dry run reads every stage's params; stage outputs that later stages depend on must exist
    for folder in [p.paths.raw, p.paths.prepared, p.paths.exports] + [f"{p.paths.models}/{run_name(a, s)}" for a, s in p.bakeoff.cells()]:
        (repo / folder).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(dvc + ["repro", "--dry"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch, seed in p.bakeoff.cells():
        assert f"Running stage 'train@{arch}-{seed}'" in proc.stdout
    assert "Running stage 'compare'" in proc.stdout
