"""The KubeRay RayJob (deploy/kuberay/rayjob.yaml) runs the batch job the tests run: its entrypoint parses with
the job's own command line, its cluster runs the Ray release the `batch` extra pins, in the image the Dockerfile
builds for it, and it resumes instead of starting over."""

from __future__ import annotations

import re
import shlex
import tomllib
from typing import Any

import yaml

from batch.cli import parser
from tests.conftest import ROOT

RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def rayjob() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    return doc


def pinned_ray() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["batch"]
    (ray,) = [r for r in extras if r.startswith("ray[")]
    return ray.split("==", 1)[1]


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_entrypoint_is_the_batch_command_joining_its_own_cluster() -> None:
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "resnest-batch"
    args = parser().parse_args(argv[1:])  # an option the job does not have would exit here
    assert args.address == "auto"  # the cluster KubeRay made for the job, not a local Ray inside the head pod
    assert args.model.startswith("/models/")  # baked into the image, as the serving images do
    assert args.output.startswith("s3://") and all(i.startswith("s3://") for i in args.inputs)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    slots = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                for g in workers)  # fmt: skip
    # Every model actor fits the workers, with CPUs left over for its decoding tasks.
    assert args.workers * (args.cpus_per_worker + args.decode_cpus) <= slots
    assert args.threads_per_worker <= args.cpus_per_worker


def test_the_cluster_runs_the_pinned_ray_in_the_dockerfiles_batch_image() -> None:
    job = rayjob()
    version = pinned_ray()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    assert base is not None and base.group(1).startswith(f"{version}-py311"), "the batch image's Ray is not the pin"
    assert re.search(r"^FROM \$\{RAY_IMAGE\} AS batch$", dockerfile, re.M)
    assert "[batch]" in dockerfile.split(" AS batch", 1)[1]  # the wheel with its extra, not the serving install
    images = {c["image"] for c in containers(job)}
    images.add(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert images == {"resnest-serve:batch"}
    for c in containers(job):
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]  # guaranteed QoS: no eviction


def test_it_resumes_and_cleans_up() -> None:
    spec = rayjob()["spec"]
    # A failed run is retried, and a retry resumes from the committed parts (tests/test_batch.py proves that).
    assert spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # The head only drives: no model actor there, so the driver's memory is its own.
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
