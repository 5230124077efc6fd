"""The deployment files agree with the app: probe routes and ports, shutdown arithmetic, GPU requests, selectors,
image targets. Static checks (no engine, no cluster), plus `docker compose config` where a compose CLI exists."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
DEPLOYMENTS = ("deployment.yaml", "deployment-gpu.yaml")
REPLICAS = ("replica1", "replica2", "replica3")
RUNTIMES = ("runtime-cpu", "runtime-gpu")
# After the shutdown budget, time for the container runtime to see the process exit before it would SIGKILL.
EXIT_MARGIN_S = 10.0
# resnest50 fp32 as loaded and warmed on the CPU EP: 645 MiB RSS in the last serving benchmark's soak
# (bench/results/serving-cpu.md), rounded up.
MODEL_RSS_BYTES = 700 * 2**20


def default(name: str) -> Any:
    return Settings.model_fields[name].default


@cache
def app_routes() -> frozenset[str]:
    """The paths the app really serves, from its OpenAPI schema."""
    return frozenset(create_app(Settings(model_path=Path("unused.onnx"))).openapi()["paths"])


def seconds(text: str | int | float) -> float:
    """'45s', '1m30s', '500ms', 45 -> seconds (compose and HAProxy duration syntax)."""
    if isinstance(text, int | float):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def env_seconds(env: dict[str, str], name: str) -> float:
    """A RESNEST_* duration from a manifest's environment, else the service's default."""
    value = env.get(f"RESNEST_{name.upper()}")
    return float(value) if value is not None else float(default(name))


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes


@cache
def k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def deployment(name: str) -> dict[str, Any]:
    (doc,) = k8s(name)
    assert doc["kind"] == "Deployment"
    return doc


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def k8s_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently; kubectl errors)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The keys written here; those merged in by `<<: *anchor` may be overridden (compose's x- blocks).
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


YAML_FILES = sorted([*(ROOT / "deploy").rglob("*.yaml"), COMPOSE])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses_without_duplicate_keys(path: Path) -> None:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if d]
    assert docs, path
    if path.parent.name in ("k8s", "kserve"):
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), path


def test_kustomization_lists_every_manifest_and_each_is_well_formed() -> None:
    (kustomization,) = k8s("kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for name in sorted(listed):
        for doc in k8s(name):
            assert doc.get("apiVersion") and doc.get("kind"), name
            assert doc.get("metadata", {}).get("name"), name


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_probes_hit_the_apps_routes_on_the_container_port(name: str) -> None:
    dep = deployment(name)
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = k8s_env(c)
    assert ports == {
        "http": int(env.get("RESNEST_PORT", default("port"))),
        "grpc": int(env.get("RESNEST_GRPC_PORT", default("grpc_port"))),
    }
    assert {"/readyz", "/healthz"} <= app_routes()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] in app_routes()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in (*ports, *ports.values()), probe
    # Warm-up (every batch size) must not be mistaken for a hang: minutes before liveness may restart it.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def manifest_settings(env: dict[str, str]) -> Settings:
    """The service's settings as a manifest's environment sets them (validated as at start-up)."""
    fields = {k.removeprefix("RESNEST_").lower(): v for k, v in env.items() if k.startswith("RESNEST_")}
    return Settings(**fields)


def quantity(text: str) -> int:
    """A Kubernetes quantity ('256Mi', '4Gi', '2G') -> bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", text).groups()  # type: ignore[union-attr]
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    return int(number) * scale[unit]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_termination_grace_outlasts_the_shutdown_budget(name: str) -> None:
    dep = deployment(name)
    env = k8s_env(container(dep))
    settings = manifest_settings(env)  # the budget also has to hold the drain grace: Settings checks that
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    print(f"\n{name}: terminationGracePeriodSeconds {grace} >= budget {settings.shutdown_timeout_s} + {EXIT_MARGIN_S}")
    assert grace >= settings.shutdown_timeout_s + EXIT_MARGIN_S
    for key in ("RESNEST_DRAIN_GRACE_S", "RESNEST_SHUTDOWN_TIMEOUT_S"):
        assert key in env, f"{key}: set explicitly, so the arithmetic above is visible in the manifest"
    resources = container(dep)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def assert_the_upload_spool_fits(c: dict[str, Any], volumes: list[dict[str, Any]], settings: Settings) -> None:
    """A read-only root leaves /tmp (an emptyDir) as the spool: every upload admitted at once must fit it."""
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in volumes if v["name"] == tmp["name"]]
    spool = quantity(volume["emptyDir"]["sizeLimit"])
    assert settings.max_buffered_upload_bytes <= spool, "uploads spooled at once must fit the /tmp emptyDir"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_the_pods_temp_dir_and_memory_hold_the_request_paths_worst_case(name: str) -> None:
    dep = deployment(name)
    c = container(dep)
    settings = manifest_settings(k8s_env(c))
    assert_the_upload_spool_fits(c, dep["spec"]["template"]["spec"]["volumes"], settings)
    limit = quantity(c["resources"]["limits"]["memory"])
    need = MODEL_RSS_BYTES + settings.host_memory_bytes(224)
    print(f"\n{name}: worst case {need >> 20} MiB (model {MODEL_RSS_BYTES >> 20} MiB) <= limit {limit >> 20} MiB")
    assert need <= limit, "the service would refuse to start under this limit (service/core/limits.py)"
    assert quantity(c["resources"]["requests"]["memory"]) <= limit


def test_gpu_deployment_requests_a_gpu_and_insists_on_it() -> None:
    c = container(deployment("deployment-gpu.yaml"))
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = k8s_env(c)
    assert env["RESNEST_PROVIDERS"] == "cuda"
    assert env["RESNEST_REQUIRE_GPU"] == "true"
    assert ":gpu" in c["image"]


def test_hpa_service_and_pdb_point_at_the_deployment() -> None:
    dep = deployment("deployment.yaml")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (hpa,) = k8s("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container(dep)["resources"]["requests"], "CPU utilisation is relative to the request"

    (svc,) = k8s("service.yaml")
    assert svc["spec"]["type"] == "ClusterIP"
    for name in DEPLOYMENTS:
        assert svc["spec"]["selector"].items() <= deployment(name)["spec"]["template"]["metadata"]["labels"].items()
    http, grpc = svc["spec"]["ports"]
    assert (http["name"], http["port"], http["targetPort"]) == ("http", 80, "http")
    assert (grpc["name"], grpc["targetPort"], grpc["appProtocol"]) == ("grpc", "grpc", "kubernetes.io/h2c")
    for name in DEPLOYMENTS:
        assert {"http", "grpc"} <= {p["name"] for p in container(deployment(name))["ports"]}

    (pdb,) = k8s("pdb.yaml")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# ---------------------------------------------------------------------------------------------------------------
# docker-compose


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_replicas_probe_readiness_and_outlast_the_drain() -> None:
    services = compose()["services"]
    for name in REPLICAS:
        replica = services[name]
        assert replica["build"]["target"] == "runtime-cpu", name
        assert "/readyz" in replica["healthcheck"]["test"], name
        assert replica["depends_on"]["export"]["condition"] == "service_completed_successfully", name
        env = replica["environment"]
        settings = manifest_settings(env)
        assert seconds(replica["stop_grace_period"]) >= settings.shutdown_timeout_s + EXIT_MARGIN_S, name
        assert env == services["replica1"]["environment"], "replicas share one environment"
    assert services["export"]["build"]["target"] == "export"


def test_compose_balancer_runs_the_tested_haproxy_config() -> None:
    services = compose()["services"]
    lb = services["lb"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in lb["volumes"]}
    assert mounts["./deploy/haproxy.cfg"] == "/usr/local/etc/haproxy/haproxy.cfg"
    port = int(services["replica1"]["environment"].get("RESNEST_PORT", default("port")))
    assert {lb["environment"][f"REPLICA{i}"] for i in (1, 2, 3)} == {f"{r}:{port}" for r in REPLICAS}
    assert "LB_BIND" in lb["environment"]
    # gRPC: each replica's gRPC port, and its HTTP port for the readiness check.
    grpc_port = int(services["replica1"]["environment"].get("RESNEST_GRPC_PORT", default("grpc_port")))
    assert "LB_GRPC_BIND" in lb["environment"]
    for i, replica in enumerate(REPLICAS, 1):
        assert lb["environment"][f"REPLICA{i}_GRPC"] == f"{replica}:{grpc_port}"
        assert int(lb["environment"][f"REPLICA{i}_CHECK_PORT"]) == port
    published = {p.split(":")[-2] for p in lb["ports"]}
    assert {lb["environment"]["LB_BIND"].split(":")[-1], lb["environment"]["LB_GRPC_BIND"].split(":")[-1]} <= published


def test_compose_balancer_image_is_the_haproxy_series_the_tests_run() -> None:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed: run `make lb` (installs Debian's haproxy package)", pytrace=False)
    banner = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    tested = re.search(r"HAProxy version (\d+\.\d+)", banner)
    assert tested, banner
    assert compose()["services"]["lb"]["image"] == f"haproxy:{tested.group(1)}"


def test_compose_gpu_profile_reserves_an_nvidia_device() -> None:
    gpu = [s for s in compose()["services"].values() if "gpu" in s.get("profiles", [])]
    assert gpu, "no service in the gpu profile"
    for service in gpu:
        assert service["build"]["target"] == "runtime-gpu"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] >= 1 for d in devices)
        assert service["environment"]["RESNEST_REQUIRE_GPU"] == "true"


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin), else the standalone `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_file_validates(profile: list[str]) -> None:
    cli = compose_cli()
    if cli is None:
        reason = "the docker client has no compose plugin" if shutil.which("docker") else "no docker client"
        pytest.skip(f"{reason} and no docker-compose on PATH: cannot run `docker compose config`")
    out = subprocess.run(
        [*cli, "-f", str(COMPOSE), *profile, "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, HAProxy


@cache
def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            assert match, f"unnamed stage: {line}"
            current = result.setdefault(match.group(1), [])
        current.append((keyword.upper(), args.strip()))
    return result


def instructions(stage: str, keyword: str) -> list[str]:
    return [args for k, args in stages()[stage] if k == keyword]


def test_dockerfile_has_the_three_targets() -> None:
    assert {"export", *RUNTIMES} <= set(stages())
    export = " ".join(args for _, args in stages()["export"])
    assert "python -m export" in export
    assert "download.pytorch.org/whl/cpu" in export, "torch's CPU wheel, not the CUDA one"
    for arg in ("VARIANT", "PRECISION", "CHECKPOINT_URL", "CHECKPOINT_SHA256"):
        assert any(a.split("=")[0] == arg for a in instructions("export", "ARG")), arg


@pytest.mark.parametrize("stage", RUNTIMES)
def test_runtime_images_are_lean_non_root_and_drain_on_sigterm(stage: str) -> None:
    body = " ".join(args for _, args in stages()[stage])
    assert "torch" not in body and "[export]" not in body
    users = instructions(stage, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert instructions(stage, "STOPSIGNAL") == ["SIGTERM"]
    assert instructions(stage, "EXPOSE") == [f"{default('port')} {default('grpc_port')}"]
    assert any(a.startswith("--from=export") for a in instructions(stage, "COPY"))
    env = " ".join(instructions(stage, "ENV"))
    assert "RESNEST_MODEL_PATH=" in env
    assert f"RESNEST_PROVIDERS={'cuda' if stage == 'runtime-gpu' else 'cpu'}" in env
    assert ("RESNEST_REQUIRE_GPU=true" in env) == (stage == "runtime-gpu")
    assert instructions(stage, "CMD") == ['["resnest-serve"]']


def image_user(stage: str) -> tuple[int, int]:
    """The numeric uid:gid a runtime stage ends on."""
    uid, gid = instructions(stage, "USER")[-1].split(":")
    return int(uid), int(gid)


def test_manifests_run_as_the_images_user() -> None:
    """runAsNonRoot needs a numeric user; the manifests name the image's own, so files it owns stay readable."""
    contexts = {name: deployment(name)["spec"]["template"]["spec"]["securityContext"] for name in DEPLOYMENTS}
    (c,) = kserve("servingruntime.yaml")["spec"]["containers"]
    contexts["servingruntime.yaml"] = c["securityContext"]  # a ServingRuntime has no pod securityContext
    for name, ctx in contexts.items():
        stage = "runtime-gpu" if name == "deployment-gpu.yaml" else "runtime-cpu"
        assert ctx["runAsNonRoot"] is True, name
        assert (ctx["runAsUser"], ctx["runAsGroup"]) == image_user(stage), name
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list keeps .venv, artifacts/ and caches out of the context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for stage in stages():
        for args in instructions(stage, "COPY"):
            if not args.startswith("--from"):
                sources.update(args.split()[:-1])
    assert sources <= allowed, sources - allowed
    assert all((ROOT / s).exists() for s in allowed - {"README.md"})


def test_haproxy_drops_a_draining_replica_within_its_grace() -> None:
    cfg = HAPROXY_CFG.read_text()
    assert re.search(r"^\s*option httpchk GET /readyz$", cfg, re.MULTILINE)
    assert re.search(r"^\s*http-check expect status 200$", cfg, re.MULTILINE)
    assert re.search(r"^\s*retry-on .*\bconn-failure\b", cfg, re.MULTILINE)
    assert re.search(r"^\s*option redispatch\b", cfg, re.MULTILINE)
    # Both backends (HTTP and gRPC) check alike: the same defaults, so the same time to drop a draining replica.
    http_defaults, grpc_defaults = re.findall(r"^\s*default-server (.*)$", cfg, re.MULTILINE)
    assert http_defaults == grpc_defaults
    tokens = http_defaults.split()
    options = {k: v for k, v in itertools.pairwise(tokens) if k in ("inter", "fastinter", "fall", "rise")}
    # First failed check at most `inter` after the drain starts, the remaining `fall - 1` at `fastinter`.
    inter, fall = seconds(options["inter"]), int(options["fall"])
    detect = inter + (fall - 1) * seconds(options.get("fastinter", options["inter"]))
    grace = default("drain_grace_s")
    print(f"\nHAProxy marks a draining replica DOWN <= {detect:.2f}s (+ check time) into a {grace}s grace")
    assert detect < grace / 2
    servers = re.findall(r'^\s*server (r\d) "\$\{(REPLICA\d)\}"', cfg, re.MULTILINE)
    assert servers == [("r1", "REPLICA1"), ("r2", "REPLICA2"), ("r3", "REPLICA3")]
    # gRPC: HTTP/2 to each replica's gRPC port, its readiness checked over HTTP/1.1 on its HTTP port.
    grpc = re.findall(
        r'^\s*server (g\d) "\$\{(REPLICA\d)_GRPC\}" proto h2 check-proto h1 port "\$\{(REPLICA\d)_CHECK_PORT\}"$',
        cfg,
        re.MULTILINE,
    )
    assert grpc == [(f"g{i}", f"REPLICA{i}", f"REPLICA{i}") for i in (1, 2, 3)]
    assert re.search(r'^\s*bind "\$\{LB_GRPC_BIND\}" proto h2$', cfg, re.MULTILINE)


def test_the_wheel_stage_copies_every_package_the_project_ships() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    wheel_stage = DOCKERFILE.read_text().split(" AS wheel", 1)[1].split("\nFROM ", 1)[0]
    copied = set(re.findall(r"^COPY (\S+) \1$", wheel_stage, re.M))
    top_level = {p.split(".")[0] for p in packages}
    assert top_level <= copied, f"the image's wheel would lack {sorted(top_level - copied)}"
    for package in packages:
        assert (ROOT / package.replace(".", "/")).is_dir(), package
    # Every package folder under them is listed: setuptools ships only the listed ones, and an import of an
    # unlisted one works from a checkout and fails in the image.
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for root in top_level
        for init in (ROOT / root).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert folders <= set(packages), f"the wheel would lack {sorted(folders - set(packages))}"


# ---------------------------------------------------------------------------------------------------------------
# KServe


KSERVE = ROOT / "deploy" / "kserve"


@cache
def kserve(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]
    return doc


def test_kserve_runtime_speaks_v2_on_both_ports_and_probes_the_v2_health_routes() -> None:
    (kustomization,) = [d for d in yaml.safe_load_all((KSERVE / "kustomization.yaml").read_text()) if d]
    assert set(kustomization["resources"]) == {p.name for p in KSERVE.glob("*.yaml")} - {"kustomization.yaml"}
    runtime = kserve("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    (c,) = runtime["spec"]["containers"]
    env = k8s_env(c)
    unknown = {k for k in env if k.startswith("RESNEST_")} - {f"RESNEST_{n.upper()}" for n in Settings.model_fields}
    assert not unknown, unknown
    settings = manifest_settings(env)  # validates as at start-up: drain grace within the budget, and so on
    assert settings.grpc_enabled and settings.model_repository == Path("/mnt/models")  # KServe's storage mount
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http1": settings.port, "h2c": settings.grpc_port}  # KServe's names for REST and gRPC
    assert {"/v2/health/live", "/v2/health/ready"} <= app_routes()
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": settings.port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": settings.port}
    assert c["startupProbe"]["httpGet"]["path"] in app_routes()
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    memory = quantity(c["resources"]["limits"]["memory"])
    assert MODEL_RSS_BYTES + settings.host_memory_bytes(224) <= memory
    assert_the_upload_spool_fits(c, runtime["spec"]["volumes"], settings)
    assert c["image"].endswith(":cpu") and settings.providers == "cpu"
    assert "command" not in c and "args" not in c, "the image's CMD (resnest-serve) reads everything from env"
    # KServe's Prometheus scraping annotations point at the app's own /metrics on the HTTP port.
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == settings.port
    assert annotations["prometheus.kserve.io/path"] in app_routes()


def test_kserve_inference_service_uses_the_runtime_and_outlasts_its_shutdown_budget() -> None:
    runtime, isvc = kserve("servingruntime.yaml"), kserve("inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["storageUri"]
    (c,) = runtime["spec"]["containers"]
    settings = manifest_settings(k8s_env(c))
    assert predictor["terminationGracePeriodSeconds"] >= settings.shutdown_timeout_s + EXIT_MARGIN_S
    # The model's resources replace the runtime's: its memory limit must hold the worst case as well.
    resources = model["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    limit = quantity(resources["limits"]["memory"])
    assert MODEL_RSS_BYTES + settings.host_memory_bytes(224) <= limit
    assert quantity(resources["requests"]["memory"]) <= limit
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # Two container ports (REST and gRPC) need a plain Deployment: Knative routes one port per container.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
