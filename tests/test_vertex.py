"""`cvpipe vertex-job` (cvpipe.train.vertex): the Vertex AI custom job spec and the launcher it runs.

No test calls a cloud. The spec is checked against the API's own schema: the Vertex AI v1 discovery
document that google-api-python-client ships (``googleapiclient/discovery_cache/documents``), turned
into JSON Schema and applied with ``jsonschema``. The launcher runs for real: two "nodes" (two
launchers with the ``CLUSTER_SPEC`` Vertex AI would give each), the spec's command, arguments and
environment, an empty working folder as in the image, and gs:// paths on the GCS emulator.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cvpipe, run_together

from cvpipe.core.config import Params, load_params, parse_override
from cvpipe.core.errors import ParamsError
from cvpipe.train import vertex

GS = {f"paths.{name}": f"gs://cvpipe-runs/r1/{name}" for name in vertex.SHARED_PATHS}
IMAGE = "europe-west4-docker.pkg.dev/my-project/cvpipe/cvpipe-train:v1"


# ---------------------------------------------------------------------------- the API's schema


def _discovery() -> dict:
    import googleapiclient

    path = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "aiplatform.v1.json"
    return json.loads(path.read_text())


def _to_json_schema(s: dict) -> dict:
    """One discovery-document schema as JSON Schema. Discovery documents describe the JSON of the REST API
    but are not JSON Schema: ``$ref`` names a schema, int64 travels as a decimal string, "Required." opens
    the description of a required field. Unknown field names are errors, as the API answers them
    ("Invalid JSON payload received. Unknown name")."""
    if "$ref" in s:
        return {"$ref": f"#/$defs/{s['$ref']}"}
    kind, fmt = s.get("type"), s.get("format")
    if kind == "object":
        out: dict = {"type": "object"}
        if "properties" in s:
            props = s["properties"]
            out["properties"] = {k: _to_json_schema(v) for k, v in props.items()}
            out["additionalProperties"] = False
            required = [k for k, v in props.items() if v.get("description", "").startswith("Required")]
            if required:
                out["required"] = required
        if "additionalProperties" in s:
            out["additionalProperties"] = _to_json_schema(s["additionalProperties"])
        return out
    if kind == "array":
        return {"type": "array", "items": _to_json_schema(s.get("items", {}))}
    if kind == "string" and fmt in ("int64", "uint64"):
        return {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^-?[0-9]+$"}]}
    if kind == "string" and fmt == "google-duration":
        return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"}
    if kind == "string":
        return {"type": "string", **({"enum": s["enum"]} if "enum" in s else {})}
    if kind == "integer":
        return {"type": "integer", **({"minimum": -2**31, "maximum": 2**31 - 1} if fmt == "int32" else {})}
    if kind in ("number", "boolean"):
        return {"type": kind}
    return {}  # "any"


@pytest.fixture(scope="module")
def api_schema():
    """``validate(body, "GoogleCloudAiplatformV1CustomJobSpec")`` -> the list of schema errors."""
    import jsonschema

    doc = _discovery()
    defs = {name: _to_json_schema(s) for name, s in doc["schemas"].items()}

    def validate(body: dict, name: str) -> list[str]:
        validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": defs})
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]

    validate.revision = doc["revision"]
    return validate


def _params(**overrides) -> Params:
    return load_params(REPO / "params.yaml", {**GS, "vertex.image_uri": IMAGE, **overrides})


def test_the_job_spec_from_the_repos_params_is_valid_for_the_vertex_ai_api(api_schema):
    p = _params(**{"vertex.nodes": 3, "vertex.accelerator_type": "NVIDIA_L4", "vertex.accelerator_count": 2,
                   "vertex.service_account": "trainer@my-project.iam.gserviceaccount.com",
                   "vertex.base_output_dir": "gs://cvpipe-runs/r1/vertex"})
    spec = vertex.job_spec(p.for_arch(p.train.arch))
    assert api_schema(spec, "GoogleCloudAiplatformV1CustomJobSpec") == [], api_schema.revision
    # the REST body of projects.locations.customJobs.create wraps it
    assert api_schema({"displayName": "cvpipe-train", "jobSpec": spec}, "GoogleCloudAiplatformV1CustomJob") == []
    pools = spec["workerPoolSpecs"]
    assert [pool["replicaCount"] for pool in pools] == ["1", "2"]  # workerpool0 hosts the rendezvous
    assert pools[0]["machineSpec"] == {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 2}
    assert pools[0]["containerSpec"]["command"] == ["python", "-m", "cvpipe.train.vertex"]
    assert spec["scheduling"] == {"timeout": "86400s", "restartJobOnWorkerRestart": True}
    # one node, no GPU: a single pool and no accelerator fields
    single = vertex.job_spec(_params())
    assert api_schema(single, "GoogleCloudAiplatformV1CustomJobSpec") == []
    assert len(single["workerPoolSpecs"]) == 1 and "acceleratorType" not in single["workerPoolSpecs"][0]["machineSpec"]


def test_the_schema_check_finds_what_the_api_would_refuse(api_schema):
    """The check can fail: a misspelt field, an unknown accelerator, a count that is not a number, a
    missing image, a duration without its unit."""
    good = vertex.job_spec(_params(**{"vertex.nodes": 2}))
    cases = {
        "machineTyp": lambda s: s["workerPoolSpecs"][0]["machineSpec"].update(machineTyp="n1"),
        "NVIDIA_GTX_1080": lambda s: s["workerPoolSpecs"][0]["machineSpec"].update(acceleratorType="NVIDIA_GTX_1080"),
        "replicaCount": lambda s: s["workerPoolSpecs"][1].update(replicaCount="two"),
        "imageUri": lambda s: s["workerPoolSpecs"][0]["containerSpec"].pop("imageUri"),
        "timeout": lambda s: s["scheduling"].update(timeout="24h"),
    }
    for what, breaks in cases.items():
        bad = copy.deepcopy(good)
        breaks(bad)
        errors = api_schema(bad, "GoogleCloudAiplatformV1CustomJobSpec")
        assert errors and what in " ".join(errors), (what, errors)


def test_the_jobs_arguments_give_the_same_params_in_a_folder_without_params_yaml():
    """The image has no params.yaml: the spec's -S arguments alone must rebuild every value train reads,
    with the architecture's bake-off overrides applied as `cvpipe train --arch` applies them."""
    p = _params(**{"train.epochs": 7, "train.lr": 0.02, "augment.train": [{"HorizontalFlip": {"p": 0.5}}],
                   "bakeoff.archs": {"convnext_atto": {"lr": 0.003, "batch_size": 64}, "resnet18": {}},
                   "wandb.tags": ["a b", "yes", "1"], "wandb.group": "it's: a group"}).for_arch("convnext_atto")
    args = vertex.param_args(p)
    assert not any(a.startswith("vertex.") for a in args)
    overrides = dict(parse_override(a) for a in args[1::2])
    rebuilt = load_params(None, overrides)
    for section in Params.model_fields:
        if section not in ("vertex", "bakeoff"):
            assert getattr(rebuilt, section) == getattr(p, section), section
    assert rebuilt.train.lr == 0.003 and rebuilt.train.batch_size == 64 and rebuilt.train.epochs == 7
    assert rebuilt.bakeoff.archs == {"convnext_atto": {}}  # nothing left to override train.* in the job
    assert rebuilt.for_arch("convnext_atto").train == p.train


def test_vertex_job_cli_writes_the_spec_and_refuses_what_a_job_cannot_run(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    sets = [x for k, v in GS.items() for x in ("-S", f"{k}={v}")]
    ok = cvpipe("vertex-job", "--image", IMAGE, "--nodes", "2", "--arch", "resnet18", "-o", "job.yaml", *sets, cwd=tmp_path)
    spec = yaml.safe_load((tmp_path / "job.yaml").read_text())
    assert "wrote the Vertex AI job spec for resnet18/seed42 on 2 node(s)" in ok.stderr + ok.stdout
    assert spec == vertex.job_spec(_params(**{"vertex.nodes": 2}).for_arch("resnet18"))
    assert "&id" not in (tmp_path / "job.yaml").read_text()  # no YAML anchors: each pool written out
    refusals = {
        "vertex.image_uri": [*sets],
        "paths.models": ["--image", IMAGE, *sets, "-S", "paths.models=models"],
        "train.batch_size": ["--image", IMAGE, *sets, "--nodes", "3", "-S", "vertex.nproc_per_node=2"],
        "vertex.accelerator_count": ["--image", IMAGE, *sets, "-S", "vertex.accelerator_type=NVIDIA_L4"],
        "vertex.base_output_dir": ["--image", IMAGE, *sets, "-S", "vertex.base_output_dir=/tmp/out"],
    }
    for key, argv in refusals.items():
        bad = cvpipe("vertex-job", *argv, cwd=tmp_path, check=False)
        assert bad.returncode == 2 and key.split(".")[-1] in bad.stderr + bad.stdout, (key, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_the_launcher_turns_cluster_spec_into_one_torchrun_per_node():
    cluster = {"workerpool0": ["cmle-training-workerpool0-1a-0:2222"],
               "workerpool1": ["cmle-training-workerpool1-1a-0:2222", "cmle-training-workerpool1-1a-1:2222"]}
    head = vertex.torchrun_argv(json.dumps({"cluster": cluster, "task": {"type": "workerpool0", "index": 0}}), ["-S", "x.y=1"],
                                nproc="4", max_restarts=2, rdzv_port=29500, job_id="123")
    assert head == ["torchrun", "--nnodes=3", "--nproc-per-node=4", "--max-restarts=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=cmle-training-workerpool0-1a-0:29500", "--rdzv-id=123", "--rdzv-conf=is_host=true",
                    "-m", "cvpipe", "train", "-S", "x.y=1"]
    worker = vertex.torchrun_argv(json.dumps({"cluster": cluster, "task": {"type": "workerpool1", "index": 1}}), [])
    assert "--rdzv-conf=is_host=false" in worker and "--rdzv-endpoint=cmle-training-workerpool0-1a-0:29400" in worker
    assert "--nnodes=1" in vertex.torchrun_argv(None, [])
    for bad in ("not json", json.dumps({"cluster": {}}), json.dumps({"cluster": {**cluster, "workerpool2": ["ps:1"]},
                                                                      "task": {"type": "workerpool0", "index": 0}})):
        with pytest.raises(ParamsError, match="CLUSTER_SPEC"):
            vertex.torchrun_argv(bad, [])


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    from test_train import _prepare_digits

    return _prepare_digits(tmp_path_factory.mktemp("tiny"), 4, 24)


def _run_nodes(spec: dict, nodes: list[dict], cwd: Path, env: dict, timeout: float = 300) -> list[str]:
    """Run every node's container command (the spec's command, args and env, plus its CLUSTER_SPEC) at once;
    a node still running after *timeout* is killed with its workers."""
    container = spec["workerPoolSpecs"][0]["containerSpec"]
    cmd = [sys.executable, *container["command"][1:], *container["args"]]
    node_env = {**env, **{e["name"]: e["value"] for e in container["env"]}}
    ran = run_together([(cmd, {**node_env, "CLUSTER_SPEC": json.dumps(n)}) for n in nodes], cwd, "node", timeout)
    outs = [out for _, out in ran]
    for i, (rc, _) in enumerate(ran):
        assert rc == 0, f"node {i} exited {rc}:\n" + "\n----\n".join(o[-3000:] for o in outs)
    return outs


@pytest.mark.slow
def test_the_job_trains_on_two_nodes_from_gcs_with_the_specs_command(tmp_path, tiny_prepared):
    """What Vertex AI would run, short of the machines: the spec from `cvpipe vertex-job` (2 nodes, one
    process each), its container command on two launchers that get workerpool0's and workerpool1's
    CLUSTER_SPEC, in an empty folder (no params.yaml), with gs:// data and outputs on the emulator."""
    from servers import free_port, gcs_emulator, upload_tree

    project = tmp_path / "project"
    project.mkdir()
    port = free_port()
    sets = {**{f"paths.{n}": f"gs://runs/r1/{n}" for n in vertex.SHARED_PATHS}, "train.arch": "test_resnet",
            "train.epochs": 2, "train.batch_size": 16, "train.workers": 0, "train.warmup_epochs": 0,
            "wandb.mode": "disabled", "vertex.nproc_per_node": 1, "vertex.rdzv_port": port, "vertex.max_restarts": 0}
    argv = [x for k, v in sets.items() for x in ("-S", f"{k}={v}")]
    cvpipe("vertex-job", "--image", IMAGE, "--nodes", "2", "-o", "job.yaml", *argv, cwd=project)
    spec = yaml.safe_load((project / "job.yaml").read_text())
    hosts = {"workerpool0": [f"127.0.0.1:{free_port()}"], "workerpool1": [f"127.0.0.1:{free_port()}"]}
    nodes = [{"cluster": hosts, "environment": "cloud", "task": {"type": pool, "index": 0}} for pool in hosts]
    node_dir = tmp_path / "node"  # the image's empty /work
    node_dir.mkdir()
    with gcs_emulator(tmp_path / "gcs") as endpoint:
        upload_tree(endpoint, tiny_prepared, "runs", "r1/prepared")
        env = {**os.environ, "STORAGE_EMULATOR_HOST": endpoint, "CVPIPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("CLUSTER_SPEC", None)
        outs = _run_nodes(spec, nodes, node_dir, env)
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon")
        fs.invalidate_cache()
        report = json.loads(fs.cat("runs/r1/reports/test_resnet/seed42/train.json"))
        assert fs.exists("runs/r1/models/test_resnet/seed42/last.pt")
    assert "--nnodes=2" in outs[0] and "is_host=true" in outs[0] and "is_host=false" in outs[1]
    assert report["world_size"] == 2 and report["epochs_run"] == 2, report
    assert not list(node_dir.glob("params.yaml"))
