"""Train stage: strategies, pretrained loading, checkpoints/resume, DDP.

Data: a tiny real slice of the digits sample (24 images per class, 4 classes)
ingested from class folders and preprocessed at 32 px once per module. Models:
timm's ``test_resnet`` (0.37 M params) unless a test needs a real backbone.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import absolute_pythonpath, cvpipe, digit_folders, run_together, write_params

from cvpipe.core.config import TrainParams, load_params
from cvpipe.core.errors import ParamsError, StageError
from cvpipe.torchkit.models import load_checkpoint
from cvpipe.train import finetune

ARCH = "test_resnet"
RUN = f"{ARCH}/seed42"  # the run folder under models/ reports/ plots/ (run_name: train.seed 42, the default)
TIMING = {"img_per_s", "seconds"}


@pytest.fixture(autouse=True)
def _absolute_pythonpath_env(monkeypatch):
    """Subprocesses run in other folders: make a relative PYTHONPATH (``PYTHONPATH=src``) absolute."""
    for k, v in absolute_pythonpath().items():
        monkeypatch.setenv(k, v)
    # an in-process run leaves wandb's service address here; a CLI subprocess would then share
    # that service, where a SIGKILLed run's stream keeps its id "in use". Separate shells never share it.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def _prepare_digits(root: Path, classes: int, per_class: int) -> Path:
    """Ingest + preprocess a class-folder slice of the real digits at 32 px; returns data/prepared."""
    src = digit_folders(root / "src", classes, per_class)
    write_params(root, {"ingest.source": str(src), "ingest.workers": 1, "preprocess.workers": 1})
    env = absolute_pythonpath()  # module scope: runs before the function-scoped env fixture
    cvpipe("ingest", "-q", cwd=root, env=env)
    cvpipe("preprocess", "-q", cwd=root, env=env)
    return root / "data" / "prepared"


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    """4 classes x 24 images: enough to watch what a strategy does to the weights."""
    return _prepare_digits(tmp_path_factory.mktemp("tiny"), 4, 24)


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    """10 classes x 40 images (60 val images): enough for two runs to be compared by accuracy."""
    return _prepare_digits(tmp_path_factory.mktemp("small"), 10, 40)


def setup_project(folder: Path, prepared: Path, **train) -> Path:
    overrides = {"paths.prepared": str(prepared), "train.arch": ARCH, "train.epochs": 2, "train.batch_size": 16,
                 "train.warmup_epochs": 0, "train.workers": 0}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return write_params(folder, overrides)


def history(folder: Path, run: str = RUN) -> list[dict[str, str]]:
    with open(folder / "plots" / run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def killed_beside_reference(tmp_path: Path, prepared: Path, kill_after: int, **train) -> tuple[Path, Path]:
    """Two projects with the same train params: ``ref`` trained to the end, ``killed`` SIGKILLed (fault
    injection) after *kill_after* batches; returns (ref, killed)."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, killed):
        d.mkdir()
        setup_project(d, prepared, **train)
    cvpipe("train", "-q", cwd=ref)
    proc = cvpipe("train", "-q", cwd=killed, env={"CVPIPE_FAULT_KILL_AFTER_STEPS": str(kill_after)}, check=False)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    return ref, killed


def assert_ends_like(ref: Path, resumed: Path) -> None:
    """The resumed run's history (timings aside) and last weights are the reference run's, bit for bit."""
    assert without_timing(history(resumed)) == without_timing(history(ref))
    a = load_checkpoint(ref / "models" / RUN / "last.pt")
    b = load_checkpoint(resumed / "models" / RUN / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def timm_model(arch: str = ARCH, num_classes: int = 10):
    import timm

    torch.manual_seed(123)
    return timm.create_model(arch, num_classes=num_classes)


def record_checkpoints(monkeypatch) -> list[dict]:
    """Capture every checkpoint the train stage saves (a deep copy per save, in order)."""
    import copy

    import cvpipe.train.checkpoint as train_mod  # the Checkpointer's save_checkpoint

    saved: list[dict] = []
    real = train_mod.save_checkpoint

    def spy(path, state):
        if str(path).endswith(("last.pt", "best.pt")):  # one save per epoch: best.pt (then linked) or last.pt
            saved.append(copy.deepcopy(state))
        real(path, state)

    monkeypatch.setattr(train_mod, "save_checkpoint", spy)
    return saved


def run_train(folder: Path, monkeypatch, **overrides):
    from cvpipe.train import stage as train

    monkeypatch.chdir(folder)
    return train.run(load_params(folder / "params.yaml", {f"train.{k}": v for k, v in overrides.items()}))


# --------------------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_pretrained_path_restores_backbone_and_replaces_head(tmp_path, fmt, capsys):
    src = timm_model(num_classes=10)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # DDP-style prefix
    tp = TrainParams(arch=ARCH, pretrained_path=str(path))
    model = finetune.create_model(tp, num_classes=3)
    own = model.state_dict()
    head = set(finetune.head_param_names(model))
    assert head == {"fc.weight", "fc.bias"}
    for k, v in sd.items():
        if k in head:
            assert own[k].shape[0] == 3 and v.shape[0] == 10
        else:
            assert torch.equal(own[k], v), k
    report = model.cvpipe_pretrained_report
    assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"] and report["unexpected"] == []
    assert sorted(report["missing"]) == ["fc.bias", "fc.weight"]


def test_pretrained_path_lists_missing_and_unexpected_keys(tmp_path):
    sd = timm_model(num_classes=3).state_dict()
    sd.pop("conv1.0.weight")
    sd["extra.weight"] = torch.zeros(2)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    report = finetune.load_pretrained_path(timm_model(num_classes=3), str(path))
    assert report["missing"] == ["conv1.0.weight"]
    assert report["unexpected"] == ["extra.weight"]
    assert report["dropped"] == []


def test_pretrained_path_refuses_pickled_code_and_wrong_arch(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Path("x")}, bad)  # arbitrary object -> not weights_only
    with pytest.raises(StageError, match="cannot read .* safely"):
        finetune.load_pretrained_path(timm_model(), str(bad))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"totally.different": torch.zeros(3)}, str(other))
    with pytest.raises(StageError, match="no tensor"):
        finetune.load_pretrained_path(timm_model(), str(other))
    with pytest.raises(StageError, match="not found"):
        finetune.load_pretrained_path(timm_model(), str(tmp_path / "missing.pth"))


def test_pretrained_true_offline_fails_fast_naming_pretrained_path(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="pretrained_path"):
        finetune.create_model(TrainParams(arch="resnet18", pretrained=True), num_classes=3)
    assert time.perf_counter() - t0 < 10


# --------------------------------------------------------------------------- parameter groups


def test_layer_decay_and_head_lr_per_group():
    model = timm_model("resnet18", num_classes=4)
    tp = TrainParams(arch="resnet18", lr=0.01, head_lr=0.05, layer_decay=0.5, epochs=3, warmup_epochs=0)
    groups = finetune.param_groups(model, tp)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale_of["fc.weight"] == pytest.approx(5.0) and scale_of["fc.bias"] == pytest.approx(5.0)
    # timm groups resnet18 per block: stem, 8 basic blocks, head; each step down the network halves the LR
    s_stem, s1, s4 = scale_of["conv1.weight"], scale_of["layer1.0.conv1.weight"], scale_of["layer4.1.conv2.weight"]
    assert s1 == pytest.approx(2 * s_stem) and s4 == pytest.approx(0.5) and s4 > s1 > s_stem
    assert s_stem == pytest.approx(0.5 ** 9)
    # weight decay only on >1-d weights
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd_of["conv1.weight"] == tp.weight_decay and wd_of["bn1.weight"] == 0.0
    # the timm scheduler applies lr_scale: actual LR per group = schedule value * scale
    opt = finetune.build_optimizer(model, tp)
    sched = finetune.build_scheduler(opt, tp, tp.epochs, updates_per_epoch=5)
    sched.step_update(num_updates=1)
    base = sched._get_values(1, on_epoch=False)[0] if hasattr(sched, "_get_values") else None
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_scale"] * g["lr_scale"])
    if base is not None:
        assert max(g["lr"] for g in opt.param_groups) == pytest.approx(base * 5.0)


def test_linear_probe_groups_hold_only_the_head():
    model = timm_model(num_classes=4)
    finetune.set_backbone_frozen(model, True)
    groups = finetune.param_groups(model, TrainParams(arch=ARCH, finetune="linear_probe"))
    assert sorted(n for g in groups for n in g["names"]) == ["fc.bias", "fc.weight"]


# --------------------------------------------------------------------------- strategies end to end


@pytest.fixture
def pretrained_file(tmp_path) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in timm_model(num_classes=10).state_dict().items()}
    path = tmp_path / "backbone.safetensors"
    save_file(sd, str(path))
    return path, sd


def _backbone_equal(state: dict, ref: dict) -> bool:
    return all(torch.equal(state[k], v) for k, v in ref.items() if not k.startswith("fc."))


def test_linear_probe_keeps_backbone_frozen(tmp_path, tiny_prepared, pretrained_file, monkeypatch):
    path, ref = pretrained_file
    setup_project(tmp_path, tiny_prepared, finetune="linear_probe", pretrained_path=str(path), lr=0.01)
    saved = record_checkpoints(monkeypatch)
    run_train(tmp_path, monkeypatch)
    assert len(saved) == 2
    for st in saved:
        assert _backbone_equal(st["model"], ref)  # weights and BatchNorm running stats untouched
        assert len(st["optimizer"]["state"]) == 2  # only fc.weight and fc.bias have optimizer state
    assert not torch.equal(saved[0]["model"]["fc.weight"], saved[1]["model"]["fc.weight"])


def test_staged_freezes_then_unfreezes_with_fresh_warmup(tmp_path, tiny_prepared, pretrained_file, monkeypatch):
    path, ref = pretrained_file
    setup_project(tmp_path, tiny_prepared, finetune="staged", freeze_epochs=1, epochs=3, warmup_epochs=1,
                  pretrained_path=str(path), layer_decay=0.7, head_lr=0.01)
    saved = record_checkpoints(monkeypatch)
    run_train(tmp_path, monkeypatch)
    assert [s["phase"] for s in saved] == [0, 1, 1]
    assert _backbone_equal(saved[0]["model"], ref)
    assert not _backbone_equal(saved[1]["model"], ref)
    assert len(saved[0]["optimizer"]["state"]) == 2
    n_params = len(list(timm_model().parameters()))
    assert len(saved[1]["optimizer"]["state"]) == n_params
    # phase 2 restarted its update counter and its schedule: 2 epochs with 1 of warmup
    upe = saved[0]["phase_updates"]
    assert saved[1]["phase_updates"] == upe and saved[2]["phase_updates"] == 2 * upe
    sched1, sched0 = saved[1]["scheduler"]["base"], saved[0]["scheduler"]["base"]  # timm's, under the re-timing clock
    assert sched1["t_initial"] == 2 * upe and sched1["warmup_t"] == upe
    assert sched0["t_initial"] == upe
    assert saved[1]["scheduler"]["retime"] == {"u0": 0, "v0": 0.0, "rate": 1.0}  # no time budget: never re-timed
    rows = history(tmp_path)
    assert len(rows) == 3


@pytest.mark.slow
def test_staged_run_killed_after_the_probe_resumes_into_a_fresh_unfrozen_phase(tmp_path, tiny_prepared, pretrained_file):
    """The probe's last checkpoint (epoch 1, phase 0) holds an optimizer over the head only; the resumed run
    starts the unfrozen phase with a fresh optimizer and warmup, as the uninterrupted run does at epoch 2,
    and ends with its history and weights (it used to load the probe's optimizer state into it)."""
    path, _ref = pretrained_file
    # 67 train images, batch 16: 5 steps per epoch -> step 7 is mid epoch 2, the first unfrozen epoch
    ref, killed = killed_beside_reference(tmp_path, tiny_prepared, 7, finetune="staged", freeze_epochs=1, epochs=3,
                                          warmup_epochs=1, pretrained_path=str(path), deterministic=True, head_lr=0.01)
    assert load_checkpoint(killed / "models" / RUN / "last.pt")["phase"] == 0
    cvpipe("train", "-q", cwd=killed)
    assert_ends_like(ref, killed)


def test_full_trains_everything_with_ema_mixup_sampler_accum_clip(tmp_path, tiny_prepared, pretrained_file, monkeypatch):
    path, ref = pretrained_file
    setup_project(tmp_path, tiny_prepared, pretrained_path=str(path), ema=True, ema_decay=0.9, mixup_alpha=0.4,
                  cutmix_alpha=1.0, class_balance="sampler", accum_steps=2, clip_grad=1.0, monitor="ema_val_acc")
    saved = record_checkpoints(monkeypatch)
    summary = run_train(tmp_path, monkeypatch)
    assert not _backbone_equal(saved[-1]["model"], ref)
    ema, model = saved[-1]["ema"], saved[-1]["model"]
    assert ema is not None and not torch.equal(ema["conv1.0.weight"], model["conv1.0.weight"])
    rows = history(tmp_path)
    assert {"ema_val_acc", "ema_val_loss"} <= set(rows[0])
    assert "final_ema_val_acc" in summary and summary["monitor"] == "ema_val_acc"
    # accumulation: one optimizer update per 2 batches of 16 (67 train images, last partial batch dropped by mixup)
    assert saved[0]["num_updates"] == 2


def test_dropout_and_stochastic_depth_reach_the_model_and_unsupported_ones_exit_2():
    plain = finetune.create_model(TrainParams(arch="resnet18"), 3)
    reg = finetune.create_model(TrainParams(arch="resnet18", drop_rate=0.3, drop_path_rate=0.1), 3)
    assert plain.drop_rate == 0 and reg.drop_rate == 0.3
    assert reg.layer4[1].drop_path is not None and plain.layer4[1].drop_path is None
    with pytest.raises(ParamsError, match="train.drop_path_rate: vgg11 does not take drop_path_rate"):
        finetune.create_model(TrainParams(arch="vgg11", drop_path_rate=0.1), 3)
    with pytest.raises(Exception, match="drop_rate"):
        TrainParams(drop_rate=1.0)


def test_class_weighted_loss_and_inverse_frequency():
    w = finetune.inverse_frequency(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    crit = finetune.make_criterion(TrainParams(class_balance="loss", label_smoothing=0), torch.tensor(w, dtype=torch.float32))
    assert torch.allclose(crit.weight, torch.tensor(w, dtype=torch.float32))
    with pytest.raises(Exception, match="mixup"):
        TrainParams(class_balance="loss", mixup_alpha=0.2)


def _epochs(**metrics) -> list[dict]:
    """History rows (epoch 1, 2, ...) from per-metric sequences: _epochs(val_loss=[...], val_acc=[...])."""
    n = len(next(iter(metrics.values())))
    return [{"epoch": i + 1, **{k: v[i] for k, v in metrics.items()}} for i in range(n)]


def _stop_epoch(stopper, rows) -> tuple[list[bool], int | None]:
    """(improved per epoch, the 1-based epoch after which the run stops or None), feeding rows until a stop."""
    improved = []
    for row in rows:
        improved.append(stopper.update(row))
        if stopper.should_stop:
            return improved, row["epoch"]
    return improved, None


def test_early_stopping_min_mode_counts_epochs_without_improvement():
    from cvpipe.train.early_stop import EarlyStopping

    stopper = EarlyStopping("val_loss", patience=2)
    improved, stop = _stop_epoch(stopper, _epochs(val_loss=[1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.5]))
    assert improved == [True, True, False, True, False, False] and stop == 6
    assert stopper.best["epoch"] == 4 and stopper.bad_epochs == 2


def test_early_stopping_max_mode_with_the_val_loss_tie_break():
    from cvpipe.train.early_stop import EarlyStopping

    stopper = EarlyStopping("val_acc", patience=2)
    assert stopper.maximize and not EarlyStopping("ema_val_loss").maximize
    rows = _epochs(val_acc=[0.5, 0.6, 0.6, 0.6, 0.55, 0.6], val_loss=[1.0, 0.9, 0.8, 0.85, 0.7, 0.8])
    improved, stop = _stop_epoch(stopper, rows)
    # epoch 3: the same accuracy with a lower val_loss improves; epoch 4: the same accuracy, higher loss does not
    assert improved == [True, True, True, False, False] and stop == 5
    assert stopper.best["epoch"] == 3


def test_early_stopping_min_delta_is_a_strict_margin():
    from cvpipe.train.early_stop import EarlyStopping

    # dyadic values: the differences below are exact in binary floating point
    stopper = EarlyStopping("val_acc", patience=3, min_delta=0.125)
    rows = _epochs(val_acc=[0.5, 0.5625, 0.625, 0.75, 0.8125, 0.875], val_loss=[1.0] * 6)
    improved, stop = _stop_epoch(stopper, rows)
    # +0.0625 and exactly +0.125 over the best do not count; +0.25 does
    assert improved == [True, False, False, True, False, False]
    assert stopper.best["epoch"] == 4 and stop is None and stopper.bad_epochs == 2
    # min mode: the margin applies downwards
    down = EarlyStopping("val_loss", patience=1, min_delta=0.25)
    improved, stop = _stop_epoch(down, _epochs(val_loss=[1.0, 0.875, 0.5]))
    assert improved == [True, False] and stop == 2 and down.best["epoch"] == 1


def test_early_stopping_patience_zero_never_stops_and_state_resumes():
    from cvpipe.train.early_stop import EarlyStopping

    never = EarlyStopping("val_loss", patience=0)
    improved, stop = _stop_epoch(never, _epochs(val_loss=[1.0] + [2.0] * 20))
    assert stop is None and never.bad_epochs == 20 and improved.count(True) == 1
    # a resumed run restores best and bad_epochs from last.pt and keeps counting
    resumed = EarlyStopping("val_loss", patience=3, best={"epoch": 1, "val_loss": 1.0}, bad_epochs=2)
    assert resumed.update({"epoch": 4, "val_loss": 1.5}) is False and resumed.should_stop


def test_cvpipe_train_honours_early_stopping(tmp_path, tiny_prepared, monkeypatch):
    """End to end, independent of the machine's numerics: val_loss is a cross-entropy (>= 0) that starts near
    ln(4) here (small LR), so with a min_delta of 1e9 no epoch after the first can improve by more than the
    margin, and a val_loss tie-break cannot fire (monitor and tie-break are the same number). The first epoch
    always improves, so the run stops after exactly patience + 1 epochs, with epoch 1 as the best."""
    setup_project(tmp_path, tiny_prepared, epochs=6, lr=0.001, monitor="val_loss", early_stop_patience=2,
                  early_stop_min_delta=1e9)
    summary = run_train(tmp_path, monkeypatch)
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert summary["epochs"] == 6
    import json

    report, = (tmp_path / "reports").glob(f"{ARCH}/**/train.json")  # reports/<run_name>/train.json
    assert json.loads(report.read_text()) == summary  # the full summary, in git
    metrics, = (tmp_path / "metrics").glob(f"{ARCH}/**/train.json")
    headline = json.loads(metrics.read_text())  # DVC metrics: headline only
    assert headline == {"epochs": 3, "val_acc": summary["best_val_acc"], "throughput_img_s": summary["img_per_s"],
                        "seconds": summary["seconds"]}
    assert [int(r["epoch"]) for r in history(tmp_path)] == [1, 2, 3]
    last = load_checkpoint(tmp_path / "models" / RUN / "last.pt")
    assert last["finished"] is True and last["epoch"] == 3 and last["bad_epochs"] == 2 and last["best"]["epoch"] == 1
    assert load_checkpoint(tmp_path / "models" / RUN / "best.pt")["epoch"] == 1


def test_params_validation_for_strategies():
    with pytest.raises(Exception, match="freeze_epochs"):
        TrainParams(finetune="staged", freeze_epochs=0)
    with pytest.raises(Exception, match="ema"):
        TrainParams(monitor="ema_val_acc")
    with pytest.raises(ParamsError, match="train.finetune"):
        load_params(None, {"train.finetune": "partial"})


# --------------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_holds_full_training_state(tmp_path, tiny_prepared, monkeypatch):
    setup_project(tmp_path, tiny_prepared, epochs=1, ema=True)
    run_train(tmp_path, monkeypatch)
    ck = load_checkpoint(tmp_path / "models" / RUN / "last.pt")
    for key in ("arch", "classes", "normalize", "epoch", "wandb_run_id", "model", "optimizer", "scheduler", "ema",
                "scaler", "rng", "params", "dataset_hash", "identity", "history"):
        assert key in ck, key
    assert ck["classes"] == ["0", "1", "2", "3"] and ck["params"]["train"]["arch"] == ARCH
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python", "loader"}
    assert ck["wandb_run_id"]


def test_resume_flag_errors_in_one_line(tmp_path, tiny_prepared):
    setup_project(tmp_path, tiny_prepared)
    proc = cvpipe("train", "-q", "--resume", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "cannot resume" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("every", [0, 3], ids=["epoch-end-checkpoint", "mid-epoch-checkpoint"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_prepared, every):
    """SIGKILL at step 2 of epoch 2. With epoch-end checkpoints the resume repeats epoch 2; with one every
    3 updates (steps 3 and 6 here) it continues at step 3 of epoch 2, with the epoch's order, the global
    RNGs and the train sums restored (augmentation is seeded per image). Either way the history and weights are the uninterrupted run's, bit for bit."""
    # 67 train images, batch 16, mixup drops the last partial batch: 4 steps per epoch -> step 6 is mid epoch 2
    ref, killed = killed_beside_reference(tmp_path, tiny_prepared, 6, epochs=3, deterministic=True, ema=True,
                                          mixup_alpha=0.2, warmup_epochs=1, checkpoint_every_updates=every)
    last = load_checkpoint(killed / "models" / RUN / "last.pt")
    assert last["epoch"] == 1
    assert (last.get("epoch_progress") or {}).get("step") == (2 if every else None)
    run_id = last["wandb_run_id"]
    proc = cvpipe("train", cwd=killed)  # automatic resume: same params, unfinished last.pt
    assert ("resuming" in proc.stdout + proc.stderr) and (("2 steps of epoch 2" in proc.stdout + proc.stderr) == bool(every))
    assert_ends_like(ref, killed)
    assert load_checkpoint(killed / "models" / RUN / "last.pt")["wandb_run_id"] == run_id  # the same W&B run continued


def test_auto_resume_skips_other_params(tmp_path, tiny_prepared):
    setup_project(tmp_path, tiny_prepared, epochs=1)
    cvpipe("train", "-q", cwd=tmp_path)
    proc = cvpipe("train", "-S", "train.lr=0.001", cwd=tmp_path)  # different params: starts fresh
    assert "resuming" not in proc.stdout + proc.stderr
    proc = cvpipe("train", "--resume", "-S", "train.epochs=2", cwd=tmp_path)  # finished 1/1; extend to 2
    assert "resuming" in proc.stdout + proc.stderr
    assert len(history(tmp_path)) == 2


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process(tmp_path, small_prepared):
    """2 gloo processes x batch 16 == 1 process x batch 32 up to BatchNorm batch statistics and sample order.

    Tolerance: val accuracy within 0.1 and val loss within 0.25 after 8 epochs on 10 classes x 40
    digits (60 val images, one image = 0.017 accuracy), and both runs must learn (train loss falls).
    The comparison is made at convergence (lr 0.05: both reach val accuracy 1.0, val loss 0.07-0.08):
    at lr 0.005 both were still mid-descent after 8 epochs (0.68 and 0.80), where sample order and
    BatchNorm batch statistics alone put them 0.117 apart once the augmentation draws changed.
    """
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = dict(epochs=8, batch_size=32, lr=0.05, label_smoothing=0.0)
    for d in (single, ddp):
        d.mkdir()
        setup_project(d, small_prepared, **common)
    cvpipe("train", "-q", cwd=single)
    env = {"OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cvpipe", "train", "-q"]
    proc = subprocess.run(torchrun, cwd=ddp, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hs, hd = history(single), history(ddp)
    assert len(hs) == len(hd) == 8
    import json

    dj = json.loads((ddp / "reports" / RUN / "train.json").read_text())
    assert dj["world_size"] == 2
    assert abs(float(hs[-1]["val_acc"]) - float(hd[-1]["val_acc"])) <= 0.1
    assert min(float(hs[-1]["val_acc"]), float(hd[-1]["val_acc"])) >= 0.9  # both converged: the comparison means something
    assert abs(float(hs[-1]["val_loss"]) - float(hd[-1]["val_loss"])) <= 0.25
    for h in (hs, hd):
        assert float(h[-1]["train_loss"]) < float(h[0]["train_loss"])
    # rank 0 alone wrote outputs; the global val count is the whole split, not a shard
    assert (ddp / "models" / RUN / "last.pt").exists()


@pytest.mark.slow
def test_cli_nproc_shortcut(tmp_path, tiny_prepared):
    setup_project(tmp_path, tiny_prepared, epochs=1)
    cvpipe("train", "-q", "--nproc", "2", cwd=tmp_path)
    import json

    assert json.loads((tmp_path / "reports" / RUN / "train.json").read_text())["world_size"] == 2


def _two_node_train(folder: Path, port: int, env: dict, timeout: float = 420) -> list[subprocess.CompletedProcess]:
    """``cvpipe train`` as two torchrun "nodes" on this machine: two launchers, one process each, meeting
    through c10d rendezvous at 127.0.0.1:*port*, with one restart allowed (``--max-restarts 1``).

    Both launchers name the same endpoint host, so each would try to host the rendezvous store; the
    store is the caller's (a TCPStore on *port*) and both join as clients (``is_host=false``), as
    on a cluster where the endpoint is a third machine. A launcher that outlives *timeout* is killed
    with its workers (process group), so a stuck rendezvous fails the test instead of hanging CI.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cvpipe-test",
           "--rdzv-conf=is_host=false", "--monitor-interval=0.5", "-m", "cvpipe", "train"]
    # a fresh rendezvous store per round (train/README.md#several-machines): with the shared one, a node
    # restarted because the other failed keeps restart count 0 while the failed one counts 1, and the
    # workers read each other's addresses under different prefixes (stale keys, a dead peer's port)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO", **env}
    ran = run_together([(cmd, env), (cmd, env)], folder, "torchrun", timeout)
    results = [subprocess.CompletedProcess(cmd, rc, out, "") for rc, out in ran]
    for i, r in enumerate(results):
        assert r.returncode == 0, f"launcher {i} exited {r.returncode} (killed after {timeout} s if -9):\n" + \
            "\n\n".join(f"---- launcher {j}\n{x.stdout[-3000:]}" for j, x in enumerate(results))
    return results


@pytest.mark.slow
def test_two_node_torchrun_restarts_a_killed_worker_and_ends_like_the_uninterrupted_run(tmp_path, tiny_prepared):
    """Two torchrun launchers (--nnodes 2, c10d rendezvous), deterministic gloo training. Rank 1 is SIGKILLed
    mid epoch 2; torchrun (--max-restarts 1) restarts the whole group, which resumes from the mid-epoch
    last.pt (every 2 updates: epoch 1 and 2 steps of epoch 2, the ranks' RNG states and sums collected)
    and ends with the uninterrupted two-node run's history and weights, bit for bit."""
    from torch.distributed import TCPStore

    from servers import free_port

    common = dict(epochs=3, deterministic=True, ema=True, warmup_epochs=1, checkpoint_every_updates=2)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, killed):
        d.mkdir()
        setup_project(d, tiny_prepared, **common)
    # 4 batches per rank and epoch (12 updates in 3 epochs) -> batch 6 of rank 1 is step 2 of epoch 2, right
    # after the mid-epoch checkpoint of update 6
    fault = {"CVPIPE_FAULT_KILL_AFTER_STEPS": "6", "CVPIPE_FAULT_KILL_RANK": "1"}
    for folder, env in ((ref, {}), (killed, fault)):
        port = free_port()
        store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        try:
            results = _two_node_train(folder, port, env)
        finally:
            del store
    log = "\n".join(r.stdout for r in results)
    assert "exitcode: -9" in log and "will restart worker group" in log, log[-4000:]   # killed, then restarted
    assert "after epoch 1 and 2 steps of epoch 2" in log, log[-4000:]   # resumed inside epoch 2
    import json

    assert json.loads((killed / "reports" / RUN / "train.json").read_text())["world_size"] == 2
    assert_ends_like(ref, killed)


def _collectives_worker(rank: int, port: int, backend: str, out_dir: str) -> None:
    """One rank of :func:`test_collectives_reduce_cpu_tensors_under_the_chosen_backend` (top level: spawn pickles it)."""
    import json

    import torch.distributed as tdist

    from cvpipe.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    d = distributed.init("cpu", backend=backend)
    try:
        sums = distributed.all_sum([rank + 0.5, 10.0 * (rank + 1), 2.0**53], d)  # float64: 2**53 + 2**53 stays exact
        gathered = distributed.gather_object({"rank": rank}, d)
        distributed.barrier(d)
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"backend": tdist.get_backend(), "sums": sums, "gathered": gathered}))
    finally:
        distributed.shutdown(d)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_collectives_reduce_cpu_tensors_under_the_chosen_backend(tmp_path, device_type):
    """The group :func:`distributed.init` builds can reduce what :func:`distributed.all_sum` hands it (a CPU
    float64 tensor). On CUDA the backend string must give ``cpu`` to gloo (NCCL has no CPU path: an NCCL-only
    group failed at the first metric reduction); that string's CPU half, ``cpu:gloo``, then runs the real
    collectives in 2 processes here (NCCL itself cannot start without GPUs)."""
    import json
    import socket

    import torch.multiprocessing as mp

    from cvpipe.train import distributed

    backend = distributed.backend_for(device_type)
    pairs = dict(p.split(":") for p in backend.split(",")) if ":" in backend else {"cpu": backend}
    assert pairs["cpu"] == "gloo"
    if device_type == "cuda":
        assert backend == "cpu:gloo,cuda:nccl" and pairs["cuda"] == "nccl"
    cpu_backend = "cpu:gloo" if ":" in backend else backend
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives_worker, args=(port, cpu_backend, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["backend"] == cpu_backend
        assert r["sums"] == [2.0, 30.0, 2.0**54]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_train_log_shows_one_plain_line_per_epoch_without_a_terminal(tmp_path, tiny_prepared):
    """Under `dvc repro` piped to a log (no TTY) the progress is one line per epoch, no bars; -q: none."""
    setup_project(tmp_path, tiny_prepared, epochs=3)
    out = cvpipe("train", cwd=tmp_path).stderr
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], out[-2000:]
    assert all(re.search(r"train_loss=\d\.\d{4} .*val_acc=\d\.\d{4} .* img/s \d+\.\ds$", line) for line in lines), lines
    assert "━" not in out  # no bar frames in a log
    quiet = cvpipe("train", "-q", "-S", "train.auto_resume=false", cwd=tmp_path).stderr
    assert not [line for line in quiet.splitlines() if line.startswith("epoch ")]
