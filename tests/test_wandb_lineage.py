"""One model everywhere in W&B (issue #16): the weights evaluate scored are the `model` artifact, compare uses
them and links the promoted bundle into the registry, and the offline runs hold the whole lineage
dataset -> train -> checkpoint -> evaluate -> model -> compare -> model-promoted -> registry (alias best)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from conftest import cvpipe, make_digits_slice, write_params
from wandb_offline import find_runs, read_run

from cvpipe.core import tracking
from cvpipe.core.config import Params
from cvpipe.torchkit import hub

ARCH, SEED = "test_resnet", 7


def _md5_b64(path: Path) -> str:
    """W&B's manifest digest of a file: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ------------------------------------------------------------------ fast: the tracker's offline records


def test_offline_tracker_records_use_and_registry_link(tmp_path, monkeypatch):
    """use_artifact and link_artifact, which wandb 0.31 refuses offline, are recorded in the offline run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("weights")
    (tmp_path / "b.json").write_text("{}")
    params = Params.model_validate({"paths": {"wandb": str(tmp_path / "wandb")}, "wandb": {"mode": "offline"}})
    files = {"model.safetensors": tmp_path / "a.txt", "config.json": tmp_path / "b.json"}
    with tracking.start(params, job_type="unit", name="unit") as tracker:
        assert tracker.enabled and tracker.offline
        used = tracker.use_artifact(files, name="model-x-seed1", type="model")
        logged = tracker.log_artifact(files, name="model-promoted", type="model", metadata={"k": 1})
        tracker.link_artifact(logged, "wandb-registry-model/unit", ["best"])
    import wandb

    wandb.teardown()  # finish() can return before wandb-core wrote the offline log; a CLI stage's exit waits for it
    (run,) = [read_run(p) for p in find_runs(tmp_path / "wandb")]
    assert [(u["name"], u["type"], u["digest"]) for u in run.used] == [("model-x-seed1", "model", used.digest)]
    assert [(a["name"], a["digest"], a["metadata"]) for a in run.artifacts] == [("model-promoted", logged.digest, {"k": 1})]
    assert used.digest == logged.digest  # same files under the same names: the same W&B digest
    assert run.artifacts[0]["files"]["model.safetensors"]["digest"] == _md5_b64(tmp_path / "a.txt")
    assert run.summary["registry/links"] == [{"artifact": "model-promoted", "type": "model", "digest": logged.digest,
                                              "target": "wandb-registry-model/unit", "aliases": ["best"]}]
    assert run.exit_code == 0


def test_disabled_tracker_lineage_calls_are_no_ops(tmp_path):
    tracker = tracking.Tracker(None)
    assert tracker.use_artifact(tmp_path, name="x", type="model") is None
    assert tracker.log_artifact(tmp_path, name="x", type="model") is None
    tracker.link_artifact(None, "wandb-registry-model/x", ["best"])  # nothing logged, nothing linked, no error


def test_registry_param_is_validated():
    from pydantic import ValidationError

    assert Params().wandb.registry == "wandb-registry-model/cvpipe"
    assert Params.model_validate({"wandb": {"registry": None}}).wandb.registry is None
    with pytest.raises(ValidationError, match="wandb.registry"):
        Params.model_validate({"wandb": {"registry": "no collection"}})


def test_hub_files_load_in_timm_with_identical_tensors(tmp_path):
    import timm

    from cvpipe.torchkit.models import create

    model = create(ARCH, num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {"arch": ARCH, "classes": ["a", "b", "c"], "image_size": 32, "epoch": 2, "dataset_hash": "d",
            "normalize": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear"}}
    hub.save(tmp_path, ckpt, state, {"temperature": 1.25})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == ARCH and cfg["num_classes"] == 3 and cfg["label_names"] == ["a", "b", "c"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["std"] == [0.4, 0.5, 0.6]
    assert cfg["cvpipe"]["temperature"] == 1.25
    loaded = timm.create_model(ARCH, pretrained=True, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=3))
    assert _tensors_equal(loaded.state_dict(), state)
    assert _tensors_equal(hub.load(tmp_path).state_dict(), state)
    hub.save(tmp_path / "again", ckpt, state, {"temperature": 1.25})  # deterministic bytes: a rerun has the same digest
    assert _sha256(tmp_path / "again/model.safetensors") == _sha256(tmp_path / "model.safetensors")


# ------------------------------------------------------------------ end to end: the five stages, offline


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    project = tmp_path_factory.mktemp("lineage")
    src = make_digits_slice(tmp_path_factory, 12)
    write_params(project, {
        "ingest.source": str(src), "ingest.workers": 1, "preprocess.workers": 1, "train.arch": ARCH, "train.seed": SEED,
        "train.epochs": 2, "train.warmup_epochs": 0, "train.batch_size": 16, "bakeoff.archs": {ARCH: {}},
        "bakeoff.seeds": [SEED], "evaluate.latency_runs": 3,
    })
    env = {"WANDB_MODE": "offline"}
    for stage in ("ingest", "preprocess", "train", "evaluate", "compare"):
        cvpipe(stage, "--quiet", cwd=project, env=env)
    runs: dict[str, list] = {}
    for run in map(read_run, find_runs(project / "wandb")):
        runs.setdefault(run.job_type, []).append(run)
    return project, {job: rs[-1] for job, rs in runs.items()}


def _one(items: list[dict], **match) -> dict:
    found = [a for a in items if all(a[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


@pytest.mark.slow
def test_evaluated_weights_are_the_model_artifact(lineage):
    import torch
    from safetensors.torch import load_file, save_file

    from cvpipe.torchkit.models import load_checkpoint

    project, runs = lineage
    run = f"{ARCH}/seed{SEED}"
    bundle = project / "exports" / run
    report = json.loads((bundle / "evaluate.json").read_text())
    art = _one(runs["evaluate"].artifacts, type="model")
    assert art["name"] == f"model-{ARCH}-seed{SEED}" and set(art["files"]) == {"model.safetensors", "config.json"}

    # the weights evaluate scored: evaluate.checkpoint's file, evaluate.weights' state_dict (EMA or raw)
    ckpt = load_checkpoint(project / "models" / run / f"{report['checkpoint']}.pt")
    scored = ckpt[report["weights"]]
    save_file({k: v.detach().cpu().contiguous() for k, v in scored.items()}, str(project / "scored.safetensors"))
    weights = bundle / "model.safetensors"
    assert _sha256(weights) == _sha256(project / "scored.safetensors") == art["metadata"]["sha256"]
    assert art["files"]["model.safetensors"]["digest"] == _md5_b64(weights) == _md5_b64(project / "scored.safetensors")
    assert _tensors_equal(load_file(str(weights)), scored)
    assert _tensors_equal(torch.load(bundle / "model.pt", weights_only=True)["model"], scored)
    # W&B's own digest of the bundle's two files is the logged artifact's
    rebuilt = tracking.build_artifact(art["name"], "model", {n: bundle / n for n in hub.FILES})
    assert rebuilt.digest == art["digest"]
    assert art["metadata"]["accuracy"] == report["accuracy"] and art["metadata"]["weights"] == report["weights"]

    # timm loads it as documented (evaluate/README.md), every tensor identical
    import timm

    n = len(report["classes"])
    model = timm.create_model(ARCH, pretrained=True, num_classes=n,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=n))
    assert _tensors_equal(model.state_dict(), scored)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"][1:] == [report["image_size"]] * 2
    assert cfg["cvpipe"]["temperature"] == pytest.approx(report["temperature"])


@pytest.mark.slow
def test_lineage_from_the_dataset_to_the_registry(lineage):
    project, runs = lineage
    assert {"preprocess", "train", "evaluate", "compare"} <= set(runs)
    for job in ("preprocess", "train", "evaluate", "compare"):
        assert runs[job].exit_code == 0, job

    # preprocess -> dataset -> train
    dataset = _one(runs["preprocess"].artifacts, name="dataset")
    assert dataset["type"] == "dataset" and "meta.json" in dataset["files"] and "test/index.csv" in dataset["files"]
    assert _one(runs["train"].used, name="dataset")["digest"] == dataset["digest"]
    # train -> checkpoint -> evaluate; train logs no `model`
    checkpoint = _one(runs["train"].artifacts, type="checkpoint")
    assert checkpoint["name"] == f"checkpoint-{ARCH}-seed{SEED}" and set(checkpoint["files"]) == {"best.pt", "last.pt"}
    assert not [a for a in runs["train"].artifacts if a["type"] == "model"]
    assert _one(runs["evaluate"].used, name=checkpoint["name"])["digest"] == checkpoint["digest"]
    # evaluate -> model -> compare
    model = _one(runs["evaluate"].artifacts, type="model")
    assert _one(runs["compare"].used, name=model["name"])["digest"] == model["digest"]
    # compare -> model-promoted (models/best, holding the same weights) -> registry, alias best
    promoted = _one(runs["compare"].artifacts, name="model-promoted")
    best = project / "models/best"
    assert promoted["type"] == "model" and set(promoted["files"]) == {p.name for p in best.iterdir()}
    assert promoted["files"]["model.safetensors"]["digest"] == model["files"]["model.safetensors"]["digest"]
    assert promoted["metadata"]["sha256"] == model["metadata"]["sha256"] == _sha256(best / "model.safetensors")
    assert "best" in promoted["aliases"]
    assert runs["compare"].summary["registry/links"] == [{
        "artifact": "model-promoted", "type": "model", "digest": promoted["digest"],
        "target": "wandb-registry-model/cvpipe", "aliases": ["best"],
    }]


@pytest.mark.slow
def test_model_artifact_without_exports_is_the_same_model(lineage):
    """evaluate.export: false writes no bundle; the model artifact is rebuilt from the checkpoint with the same bytes."""
    project, runs = lineage
    first = _one(runs["evaluate"].artifacts, type="model")
    cvpipe("evaluate", "--quiet", "-S", "evaluate.export=false", cwd=project, env={"WANDB_MODE": "offline"})
    again = [r for r in map(read_run, find_runs(project / "wandb")) if r.job_type == "evaluate"][-1]
    assert again.id != runs["evaluate"].id and again.exit_code == 0
    model = _one(again.artifacts, type="model")
    assert model["name"] == first["name"] and model["digest"] == first["digest"]
    assert model["metadata"]["sha256"] == first["metadata"]["sha256"]


def test_link_pending_links_the_recorded_version(monkeypatch):
    """After `wandb sync`, link_pending links the logged version whose digest the offline run recorded."""
    import wandb

    linked = []

    class Art:
        def __init__(self, name, digest):
            self.name, self.digest = name, digest

        def link(self, target, aliases):
            linked.append((self.name, self.digest, target, aliases))

    class Run:
        summary = {"registry/links": [{"artifact": "model-promoted", "type": "model", "digest": "d2",
                                       "target": "wandb-registry-model/cvpipe", "aliases": ["best"]}]}

        def logged_artifacts(self):
            return [Art("model-promoted:v0", "d1"), Art("model-promoted:v1", "d2"), Art("model-x:v0", "d2")]

    class Api:
        def run(self, path):
            assert path == "e/p/r1"
            return Run()

    monkeypatch.setattr(wandb, "Api", Api)
    assert tracking.link_pending("e/p/r1") == ["wandb-registry-model/cvpipe:best"]
    assert linked == [("model-promoted:v1", "d2", "wandb-registry-model/cvpipe", ["best"])]
    Run.summary["registry/links"][0]["digest"] = "nope"
    with pytest.raises(RuntimeError, match="no artifact model-promoted with digest nope"):
        tracking.link_pending("e/p/r1")
