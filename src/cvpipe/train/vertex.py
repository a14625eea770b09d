"""``cvpipe train`` as a Vertex AI custom job: the job spec, and the launcher that runs in it.

:func:`job_spec` turns params into a ``CustomJobSpec`` (the Vertex AI v1 REST resource, camelCase, as
``gcloud ai custom-jobs create --config`` reads it): workerpool0 is one machine that hosts torchrun's
c10d rendezvous, workerpool1 the other ``vertex.nodes - 1``; every node runs the train image with
``python -m cvpipe.train.vertex`` and the params as ``-S key=value`` arguments (the image holds no
params.yaml, so the arguments are every value that differs from cvpipe's defaults).

:func:`torchrun_argv` is that launcher's logic. Vertex AI describes the cluster to each node in the
``CLUSTER_SPEC`` environment variable (JSON: ``cluster.workerpool0`` / ``workerpool1`` host lists and
this node's ``task.type`` and ``task.index``); the launcher turns it into one ``torchrun`` per node
(``--nnodes``, c10d rendezvous on the workerpool0 host, ``is_host`` only there) and replaces itself with
it. Hand-written because neither torch nor Google's libraries map ``CLUSTER_SPEC`` to torchrun; the spec
is a plain dict because google-cloud-aiplatform (which builds the same request) is far too heavy for the
train image, and tests check the dict against the API's own schema (its discovery document).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import yaml

from cvpipe.core import storage
from cvpipe.core.config import Params
from cvpipe.core.errors import ParamsError

# the paths train reads or writes: on Vertex AI every node must reach the same ones, and the machines
# (and their disks) are gone when the job ends
SHARED_PATHS = ("prepared", "models", "metrics", "plots", "reports")
LAUNCHER = ["python", "-m", "cvpipe.train.vertex"]
# a fresh rendezvous store per round, as train/README.md#several-machines explains (pytorch/pytorch#135712)
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
POOLS = ("workerpool0", "workerpool1")


def param_args(p: Params) -> list[str]:
    """``-S key=value`` for every value of *p* that differs from cvpipe's defaults (the ``vertex`` section
    left out: the job itself does not read it). *p* has its architecture's ``bakeoff.archs`` overrides
    applied already (:meth:`Params.for_arch`), so ``bakeoff.archs`` becomes that one architecture with no
    overrides: in the job, ``-S train.*`` keys would otherwise win over them (they are explicit there).
    ``cvpipe train`` with these arguments and no params.yaml trains with *p*'s values."""
    mine, defaults = p.model_dump(mode="json"), Params().model_dump(mode="json")
    mine["bakeoff"]["archs"] = {p.train.arch: {}}
    args: list[str] = []
    for section, values in mine.items():
        if section == "vertex":
            continue
        for key, value in values.items():
            if value != defaults[section][key]:
                args += ["-S", f"{section}.{key}={_yaml_value(value)}"]
    return args


def _yaml_value(value: Any) -> str:
    """One line of YAML that parses back to *value* (a plain string stays unquoted when it can)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, ensure_ascii=False)  # JSON is YAML flow style


def check(p: Params) -> None:
    """Refuse params a Vertex AI job cannot run with, naming the key."""
    v = p.vertex
    if not v.image_uri:
        raise ParamsError("vertex.image_uri: set the train image the job runs (pushed to Artifact Registry), "
                          "e.g. -S vertex.image_uri=europe-west4-docker.pkg.dev/PROJECT/cvpipe/cvpipe-train:TAG")
    for name in SHARED_PATHS:
        path = str(getattr(p.paths, name))
        if not (storage.is_remote(path) and path.startswith("gs://")):
            raise ParamsError(f"paths.{name}: {path!r} is on this machine; a Vertex AI job reads and writes only "
                              f"shared storage: give a gs:// URL (-S paths.{name}=gs://BUCKET/...)")
    if isinstance(v.nproc_per_node, int) and p.train.batch_size % (v.nproc_per_node * v.nodes):
        raise ParamsError(f"train.batch_size: {p.train.batch_size} must be divisible by the "
                          f"{v.nproc_per_node * v.nodes} processes of vertex.nodes x vertex.nproc_per_node")


def job_spec(p: Params) -> dict[str, Any]:
    """The ``CustomJobSpec`` that trains with *p* (checked first: :func:`check`)."""
    check(p)
    v = p.vertex
    machine: dict[str, Any] = {"machineType": v.machine_type}
    if v.accelerator_type:
        machine.update(acceleratorType=v.accelerator_type, acceleratorCount=v.accelerator_count)
    launch = {"nproc_per_node": v.nproc_per_node, "max_restarts": v.max_restarts, "rdzv_port": v.rdzv_port}
    env = {**LAUNCH_ENV, "CVPIPE_VERTEX": json.dumps(launch, separators=(",", ":"))}
    container = {"imageUri": v.image_uri, "command": LAUNCHER, "args": param_args(p),
                 "env": [{"name": k, "value": val} for k, val in env.items()]}
    pool = {"machineSpec": machine, "containerSpec": container,
            "diskSpec": {"bootDiskType": v.boot_disk_type, "bootDiskSizeGb": v.boot_disk_gb}}
    # a copy per pool: YAML would write a shared dict once and refer to it (&id001 / *id001)
    pools = [{**copy.deepcopy(pool), "replicaCount": "1"}]
    if v.nodes > 1:
        pools.append({**copy.deepcopy(pool), "replicaCount": str(v.nodes - 1)})
    spec: dict[str, Any] = {
        "workerPoolSpecs": pools,
        # one node failing restarts them all, so the torchrun group can form again and resume from last.pt
        "scheduling": {"timeout": f"{math.ceil(v.timeout_hours * 3600)}s", "restartJobOnWorkerRestart": v.nodes > 1},
    }
    if v.service_account:
        spec["serviceAccount"] = v.service_account
    if v.base_output_dir:
        spec["baseOutputDirectory"] = {"outputUriPrefix": v.base_output_dir}
    return spec


def write(spec: Mapping[str, Any], out: Optional[str]) -> None:
    """The spec as YAML to *out* (written whole: temp file, then rename) or to stdout."""
    text = yaml.safe_dump(dict(spec), sort_keys=False, allow_unicode=True, width=100)
    if out is None:
        sys.stdout.write(text)
    else:
        storage.write_text(out, text)


def torchrun_argv(cluster_spec: Optional[str], train_args: Sequence[str], *, nproc: str = "auto",
                  max_restarts: int = 3, rdzv_port: int = 29400, job_id: str = "cvpipe") -> list[str]:
    """The ``torchrun`` command this node runs, from Vertex AI's ``CLUSTER_SPEC`` (None: one machine)."""
    head, nnodes, is_host = "127.0.0.1", 1, True
    if cluster_spec:
        try:
            spec = json.loads(cluster_spec)
            cluster, task = spec["cluster"], spec["task"]
            hosts = {pool: list(cluster.get(pool) or []) for pool in POOLS}
            head = hosts["workerpool0"][0].rsplit(":", 1)[0]
            kind = str(task["type"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ParamsError(f"CLUSTER_SPEC is not a Vertex AI cluster description ({type(exc).__name__}: {exc})") from None
        extra = sorted(set(cluster) - set(POOLS))
        if extra or kind not in POOLS:
            raise ParamsError(f"CLUSTER_SPEC: cvpipe trains on workerpool0 and workerpool1 only (got {extra or kind})")
        nnodes, is_host = len(hosts["workerpool0"]) + len(hosts["workerpool1"]), kind == "workerpool0"
    return ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{rdzv_port}", f"--rdzv-id={job_id}",
            f"--rdzv-conf=is_host={'true' if is_host else 'false'}", "-m", "cvpipe", "train", *train_args]


def main(argv: Sequence[str]) -> None:
    """The job's entry point on each node: ``python -m cvpipe.train.vertex -S key=value ...``. Reads the
    ``vertex`` section the spec was made with from ``CVPIPE_VERTEX`` (JSON), then becomes torchrun."""
    try:
        conf = json.loads(os.environ.get("CVPIPE_VERTEX") or "{}")
        cmd = torchrun_argv(os.environ.get("CLUSTER_SPEC"), list(argv), nproc=str(conf.get("nproc_per_node", "auto")),
                            max_restarts=int(conf.get("max_restarts", 3)), rdzv_port=int(conf.get("rdzv_port", 29400)),
                            job_id=os.environ.get("CLOUD_ML_JOB_ID", "cvpipe"))
    except (ParamsError, ValueError, AttributeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.update(LAUNCH_ENV)
    print("cvpipe vertex launcher:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":  # pragma: no cover - exercised in a subprocess by tests/test_vertex.py
    main(sys.argv[1:])
