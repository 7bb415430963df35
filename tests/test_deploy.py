"""docker/ and deploy/: the image recipes, compose, Kubernetes, Prometheus and Grafana files.

No Docker engine and no cluster are needed (there is neither on the development machines):

* default suite: the images install exactly pyproject's requirements, with the lock as pip
  constraints, and the lock satisfies pyproject; the files agree with each other and with the
  service (settings names, ports, probes, metric names, camera entries, data source uid).
* integration (``make test-integration``; the linters come from ``pip install -e '.[deploy]'``,
  which ``.ci/install-peers`` runs, promtool/prometheus/shellcheck/GStreamer are Debian packages):
  hadolint and shellcheck; compose files against the compose-spec schema; Kubernetes manifests
  against the Kubernetes 1.37 schemas; ``promtool check config``; and the Grafana dashboard, the
  Prometheus scrape jobs and the HPA's prometheus-adapter query evaluated by a real Prometheus
  scraping a live ``facestream serve`` fed by a WebSocket client and by the deployment's own
  RTSP test camera and camera assigner.

A missing tool skips a test with the command that installs it, except under CI (``CI`` set),
where it fails: CI must not pass by skipping.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from helpers import CLIP, clip_frames, running_service, stream_in_background
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families
from rtsp_server import RtspTestServer, missing_peers

from facestream.service.bench import free_port
from facestream.service.metrics import ServiceMetrics
from facestream.service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "facestream.json"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
ALL_DOCKERFILES = [*DOCKERFILES.values(), DEPLOY / "rtsp-source" / "Dockerfile"]
COMPOSE_FILES = [COMPOSE / "docker-compose.yml", COMPOSE / "docker-compose.gpu.yml"]
LOCKS = {"runtime": ROOT / "requirements" / "runtime.txt", "gpu": ROOT / "requirements" / "gpu.txt"}
SERVICE_PORT = 8000  # FACESTREAM_PORT in both images
# gpu extra requirements the TensorRT base image provides instead of the lock
FROM_TRT_BASE_IMAGE = {"tensorrt"}
# labels Prometheus adds (job, instance) or the HPA's adapter needs (namespace, pod), and `le`
PROMETHEUS_LABELS = {"job", "instance", "namespace", "pod", "le", "deployment"}
DEPLOY_EXTRA = "pip install -e '.[deploy]'"
PEERS = ".ci/install-peers"


# ---------------------------------------------------------------------- helpers


def _tool(name: str, install: str) -> str:
    """The path of a command-line tool (the venv's bin first); skip, or fail under CI, without it."""
    local = Path(sys.executable).parent / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {install}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run every deploy check)")
        pytest.skip(message)
    return path


def _run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = _pyproject()
    texts = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, texts)}


def _lock(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
            current = ""
    return result


def _commands(dockerfile: Path) -> list[list[str]]:
    """The words of each shell command of the RUN lines (split at ``&&``, ``;``, ``|``, ``>``)."""
    commands = []
    for keyword, args in _instructions(dockerfile):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in {"&&", ";", "|", "||", ">"}:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in the Dockerfile's RUN lines."""
    return [words[2:] for words in _commands(dockerfile) if words[:2] == ["pip", "install"]]


def _python_snippet(dockerfile: Path) -> str:
    """The ``python -c`` program a Dockerfile runs to list the requirements it installs."""
    for words in _commands(dockerfile):
        if words[:2] == ["python", "-c"] and "tomllib" in words[2]:
            return words[2]
    raise AssertionError(f"{dockerfile.name}: no RUN python -c reading pyproject.toml")


def _env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _instructions(dockerfile):
        if keyword == "ENV":
            for word in shlex.split(args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of deploy/k8s by ``Kind/name``."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _yaml_documents(path):
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def _load_assigner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("assign_cameras", DEPLOY / "assign_cameras.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exported_names() -> set[str]:
    """Every sample name the service can export (counters as _total, histograms as _bucket...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in ServiceMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfacestream_[a-z0-9_]+\b", expr))


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, Grafana's variables filled in."""
    return [
        (panel["title"], _fill(target["expr"]))
        for panel in _dashboard()["panels"]
        for target in panel["targets"]
    ]


def _fill(expr: str) -> str:
    """Grafana's variables as Prometheus sees them with "All" selected."""
    for variable, value in (("$__rate_interval", "15s"), ("$instance", ".*"), ("$stream", ".*")):
        expr = expr.replace(variable, value)
    return expr


def _settings_env_names() -> set[str]:
    return {f"FACESTREAM_{name.upper()}" for name in ServiceSettings.model_fields} | {"FACESTREAM_CACHE"}


def _containers(statefulset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = statefulset["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"] + spec.get("initContainers", [])}


# ---------------------------------------------------------------------- images and pinned requirements


def test_images_install_exactly_pyprojects_requirements() -> None:
    """Both images install the requirement list of pyproject.toml (the one `make install` installs,
    read from pyproject by the Dockerfile itself), the GPU image with the gpu extra."""
    wanted = {"cpu": _pyproject()["dependencies"]}
    wanted["gpu"] = wanted["cpu"] + _pyproject()["optional-dependencies"]["gpu"]
    for flavour, dockerfile in DOCKERFILES.items():
        snippet = _python_snippet(dockerfile)
        listed = _run([sys.executable, "-c", snippet], cwd=ROOT)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.split("\n")[:-1] == wanted[flavour], dockerfile.name
        installs = _pip_installs(dockerfile)
        constraints = {
            "cpu": ["requirements/runtime.txt"],
            "gpu": ["requirements/runtime.txt", "requirements/gpu.txt"],
        }
        from_list = [args for args in installs if "-r" in args]
        assert len(from_list) == 1, f"{dockerfile.name}: one pip install -r of pyproject's list"
        given = [from_list[0][i + 1] for i, word in enumerate(from_list[0]) if word == "-c"]
        assert given == constraints[flavour], f"{dockerfile.name}: constraints {given}"
        assert ["--no-deps", "."] in installs, f"{dockerfile.name}: the project itself, its deps already in"
    makefile = (ROOT / "Makefile").read_text()
    # make install and both images: pyproject's list under the same constraints file, so they
    # install the same pinned versions
    assert "$(BIN)/pip install -c requirements/runtime.txt -e '.[dev,train]'" in makefile


def test_explicit_pins_in_the_images_are_pyprojects() -> None:
    """torch and torchvision, installed from the PyTorch CPU index by name, carry pyproject's pins."""
    runtime = _requirements()
    explicit = [
        Requirement(word)
        for args in _pip_installs(DOCKERFILES["cpu"])
        for word in args
        if re.match(r"^[A-Za-z0-9_.-]+(\[.*\])?[=<>~!]=", word)
    ]
    assert {r.name for r in explicit} == {"torch", "torchvision"}
    for requirement in explicit:
        assert str(requirement.specifier) == str(runtime[canonicalize_name(requirement.name)].specifier)
        assert str(requirement.specifier).startswith("==")


def test_lock_pins_every_requirement_within_pyproject() -> None:
    runtime, gpu = _lock(LOCKS["runtime"]), _lock(LOCKS["gpu"])
    for name, requirement in _requirements().items():
        assert name in runtime, f"{name} is not pinned in requirements/runtime.txt: run `make requirements`"
        assert requirement.specifier.contains(runtime[name], prereleases=True), (
            f"requirements/runtime.txt pins {name}=={runtime[name]}, pyproject wants {requirement}"
        )
    for name, requirement in _requirements("gpu").items():
        if name in FROM_TRT_BASE_IMAGE:
            assert "nvcr.io/nvidia/tensorrt:" in DOCKERFILES["gpu"].read_text()
            continue
        assert name in gpu and requirement.specifier.contains(gpu[name]), f"gpu.txt: {name} {requirement}"
    assert not set(runtime) & set(gpu), "a package is pinned twice"


def test_lock_matches_this_environment() -> None:
    """`make requirements` regenerates the lock from the environment `make install` built (which
    installs under the lock as constraints). A difference -- an environment built before the lock,
    or changed by hand -- is reported, not failed."""
    written = _run([sys.executable, str(ROOT / "requirements" / "freeze.py")])
    assert written.returncode == 0, written.stderr
    fresh = {
        canonicalize_name(Requirement(line).name): line
        for line in written.stdout.splitlines()
        if line and not line.startswith("#")
    }
    locked = _lock(LOCKS["runtime"])
    assert set(_requirements()) <= set(fresh), "freeze.py misses a direct dependency"
    drift = sorted(
        line for name, line in fresh.items() if name not in locked or f"=={locked[name]}" not in line
    )
    if drift:
        warnings.warn(f"requirements/runtime.txt differs from this environment: {drift}", stacklevel=1)


def test_dockerfiles_are_multistage_non_root_with_healthcheck() -> None:
    for flavour, dockerfile in DOCKERFILES.items():
        instructions = _instructions(dockerfile)
        stages = [args for keyword, args in instructions if keyword == "FROM"]
        assert len(stages) == 2 and stages[1].endswith("AS runtime"), dockerfile.name
        second_from = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"][1]
        runtime_part = instructions[second_from:]
        assert not any("build-essential" in args for keyword, args in runtime_part if keyword == "RUN")
        assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime_part
        users = [args for keyword, args in runtime_part if keyword == "USER"]
        assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), "numeric non-root USER"
        (health,) = [args for keyword, args in runtime_part if keyword == "HEALTHCHECK"]
        assert "/healthz" in health
        env = _env(dockerfile)
        assert env["FACESTREAM_PORT"] == str(SERVICE_PORT) and env["FACESTREAM_HOST"] == "0.0.0.0"
        assert {k for k in env if k.startswith("FACESTREAM_")} <= _settings_env_names()
        assert ("EXPOSE", str(SERVICE_PORT)) in instructions
        assert env["FACESTREAM_BACKEND"] == {"cpu": "onnxruntime", "gpu": "auto"}[flavour]


def test_dockerignore_keeps_what_the_images_copy() -> None:
    """The allowlist .dockerignore admits every COPY source and nothing large (.venv, runs/)."""
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for dockerfile in DOCKERFILES.values():
        for keyword, args in _instructions(dockerfile):
            if keyword == "COPY" and "--from=" not in args:
                for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]:
                    source = source.rstrip("/")
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
                    assert any(source == a or source.startswith(a + "/") for a in allowed), source
    assert not allowed & {".venv", "runs", "bench", ".git", "docs", "tests"}
    assert (ROOT / "README.md").is_file() and _pyproject()["readme"] == "README.md"  # the build reads it


# ---------------------------------------------------------------------- consistency of the files


def test_compose_stack_is_wired_together() -> None:
    compose = yaml.safe_load(COMPOSE_FILES[0].read_text())
    services = compose["services"]
    assert {"facestream", "prometheus", "grafana", "rtsp-source", "cameras"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
        for variable in service.get("environment", {}):
            if variable.startswith("FACESTREAM_"):
                assert variable in _settings_env_names(), f"{name}: {variable} is not a setting"
    assert services["facestream"]["ports"] == [f"{SERVICE_PORT}:{SERVICE_PORT}"]
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"facestream:{SERVICE_PORT}" in targets
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert urllib.parse.urlparse(source["url"]).hostname == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "facestream.yml").read_text())
    dashboards_path = providers["providers"][0]["options"]["path"]
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if "facestream.json" in v]
    assert mounted == [f"{dashboards_path}/facestream.json"]
    command = services["cameras"]["command"]
    owner = command[command.index("--owner") + 1]
    assigner = _load_assigner()
    (camera,) = assigner.load_assignment(COMPOSE / "cameras.json", owner)
    assert urllib.parse.urlparse(camera["url"]).hostname == "rtsp-source"
    assert camera["url"].endswith(":8554/face") and services["rtsp-source"]["ports"] == ["8554:8554"]


def test_kubernetes_manifests_are_wired_together() -> None:
    objects = _k8s()
    statefulset = objects["StatefulSet/facestream"]
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    containers = _containers(statefulset)
    main = containers["facestream"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1 and pod["spec"]["nodeSelector"]
    assert main["ports"] == [{"name": "http", "containerPort": SERVICE_PORT}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(
        SERVICE_PORT
    )
    for container in containers.values():
        for variable in container.get("env", []):
            if variable["name"].startswith("FACESTREAM_"):
                assert variable["name"] in _settings_env_names(), variable["name"]
    for name in ("Service/facestream", "Service/facestream-pods"):
        assert objects[name]["spec"]["selector"].items() <= labels.items()
    assert objects["Service/facestream-pods"]["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "facestream-pods"
    mounts = {m["name"] for m in main["volumeMounts"]}
    assert {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]} <= mounts
    ingress = objects["Ingress/facestream"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "facestream"


def test_hpa_scales_on_an_exported_per_pod_metric_and_keeps_camera_owners(tmp_path: Path) -> None:
    objects = _k8s()
    hpa = objects["HorizontalPodAutoscaler/facestream"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "facestream",
    }
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name in _exported_names()
    adapter = yaml.safe_load((K8S / "prometheus" / "adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == name and _metric_names(rule["seriesQuery"]) == {name}
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    scrape = yaml.safe_load((K8S / "prometheus" / "scrape-config.yml").read_text())
    targets = {r.get("target_label") for job in scrape["scrape_configs"] for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets, "the labels the adapter maps to pods"
    # camera owners: StatefulSet pod names below minReplicas, so no scale-down removes one
    sidecar = _containers(objects["StatefulSet/facestream"])["cameras"]
    assert (
        sidecar["restartPolicy"] == "Always"
        and sidecar["args"][sidecar["args"].index("--owner") + 1] == "$(POD_NAME)"
    )
    text = objects["ConfigMap/facestream-cameras"]["data"]["cameras.json"]
    (tmp_path / "cameras.json").write_text(text)
    table = json.loads(text)
    assigner = _load_assigner()
    for owner in table:
        match = re.fullmatch(r"facestream-(\d+)", owner)
        assert match and int(match.group(1)) < hpa["spec"]["minReplicas"], owner
        assert assigner.load_assignment(tmp_path / "cameras.json", owner), owner  # valid, not empty
    names = [c["name"] for cameras in table.values() for c in cameras]
    assert len(names) == len(set(names)), "a camera is owned by one replica"
    assert hpa["spec"]["minReplicas"] <= objects["StatefulSet/facestream"]["spec"]["replicas"]


def test_camera_assigner_rejects_malformed_files(tmp_path: Path) -> None:
    assigner = _load_assigner()
    cases = {
        "[]": "expected an object",
        '{"a": {}}': "must map to a list",
        '{"a": [{"name": "x"}]}': "at least url and name",
        '{"a": [{"url": "rtsp://h/x"}]}': "name is required",
        '{"a": [{"url": "rtsp://h/x", "name": "x", "fps": 3}]}': "unknown keys",
        '{"a": [{"url": "rtsp://h/x", "name": "x"}, {"url": "rtsp://h/y", "name": "x"}]}': "appears twice",
        "{": "cannot read",
    }
    for text, message in cases.items():
        path = tmp_path / "cameras.json"
        path.write_text(text)
        with pytest.raises(assigner.AssignmentError, match=message):
            assigner.load_assignment(path, "a")
    path.write_text('{"b": [{"url": "rtsp://h/x", "name": "x"}]}')
    assert assigner.load_assignment(path, "a") == []
    assert set(assigner.CAMERA_KEYS) == {"url", "name", "scheduler", "knob", "mask_format", "max_fps"}


def test_dashboard_is_grafana_json_over_exported_metrics_only() -> None:
    dashboard = _dashboard()
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {source["uid"] for source in datasources["datasources"]}
    assert dashboard["uid"] == "facestream" and dashboard["schemaVersion"] >= 36 and dashboard["panels"]
    exported = _exported_names()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat"} and panel["datasource"]["uid"] in uids, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
            names = _metric_names(target["expr"])
            assert names and names <= exported, f"{panel['title']}: {names - exported}"
            grouped = set(re.findall(r"by \(([^)]*)\)", target["expr"]))
            labels = {label.strip() for group in grouped for label in group.split(",")}
            assert labels <= _label_names() | PROMETHEUS_LABELS, f"{panel['title']}: {labels}"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids and _metric_names(variable["definition"]) <= exported
    wanted = {"facestream_fps", "facestream_key_ratio", "facestream_stage_seconds_bucket"}
    wanted |= {"facestream_dropped_frames_total", "facestream_bad_frames_total", "facestream_active_streams"}
    assert wanted <= {name for _, expr in _dashboard_queries() for name in _metric_names(expr)}


def _label_names() -> set[str]:
    labels: set[str] = set()
    metrics = ServiceMetrics()
    for metric in vars(metrics).values():
        labels.update(getattr(metric, "_labelnames", ()))
    return labels


# ---------------------------------------------------------------------- linters and schemas (integration)


@pytest.mark.integration
def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint", DEPLOY_EXTRA)
    result = _run([hadolint, "--failure-threshold", "info", *map(str, ALL_DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    bad = _run([hadolint, "-"], input="FROM python\nRUN pip install torch\n")
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # the linter does reject


@pytest.mark.integration
def test_gpu_entrypoint_passes_shellcheck() -> None:
    shellcheck = _tool("shellcheck", f"run {PEERS} (Debian package shellcheck)")
    result = _run([shellcheck, str(DOCKER / "entrypoint-gpu.sh")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_compose_files_match_the_compose_spec(tmp_path: Path) -> None:
    check = _tool("check-jsonschema", DEPLOY_EXTRA)
    command = [check, "--builtin-schema", "vendor.compose-spec"]
    result = _run([*command, *map(str, COMPOSE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = yaml.safe_load(COMPOSE_FILES[0].read_text())
    broken["services"]["facestream"]["ports"] = {"8000": 8000}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert _run([*command, str(tmp_path / "broken.yml")]).returncode != 0  # the schema does reject


@pytest.mark.integration
def test_kubernetes_manifests_match_the_kubernetes_schemas(tmp_path: Path) -> None:
    validate = _tool("kubernetes-validate", DEPLOY_EXTRA)
    manifests = sorted(map(str, K8S.glob("*.yaml")))
    result = _run([validate, "--strict", *manifests])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(_yaml_documents(Path(m))) for m in manifests)
    broken = copy.deepcopy(_k8s()["StatefulSet/facestream"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert _run([validate, "--strict", str(tmp_path / "broken.yaml")]).returncode != 0


@pytest.mark.integration
def test_prometheus_configs_and_queries_pass_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool", f"run {PEERS} (Debian package prometheus)")
    result = _run([promtool, "check", "config", str(COMPOSE / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    # Debian's promtool is built without Kubernetes service discovery: check the rest of the
    # Kubernetes scrape job (relabelling) with the discovery swapped for a static target.
    k8s = tmp_path / "k8s-scrape.yml"
    k8s.write_text(yaml.safe_dump(_k8s_scrape_config("127.0.0.1:8000", {})))
    result = _run([promtool, "check", "config", str(k8s)])
    assert result.returncode == 0, result.stdout + result.stderr
    # every dashboard query and the adapter's query parse as PromQL (as recording rules)
    queries = [expr for _, expr in _dashboard_queries()] + [_adapter_query("default", "facestream-0")]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(queries)]}
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = _run([promtool, "check", "rules", str(tmp_path / "rules.yml")])
    assert result.returncode == 0 and f"{len(queries)} rules found" in result.stdout, (
        result.stdout + result.stderr
    )


def _k8s_scrape_config(address: str, meta: dict[str, str]) -> dict[str, Any]:
    """deploy/k8s/prometheus/scrape-config.yml with Kubernetes pod discovery replaced by one static
    target carrying the discovery's meta labels (the relabelling runs as it would in a cluster)."""
    config = yaml.safe_load((K8S / "prometheus" / "scrape-config.yml").read_text())
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": [address], "labels": meta}]
    return config


def _adapter_query(namespace: str, pod: str) -> str:
    """The prometheus-adapter rule's metricsQuery as the adapter expands it for one pod."""
    rule = yaml.safe_load((K8S / "prometheus" / "adapter-rules.yaml").read_text())["rules"][0]
    series = rule["seriesQuery"].split("{")[0]
    query = rule["metricsQuery"].replace("<<.Series>>", series)
    query = query.replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{pod}"')
    return query.replace("<<.GroupBy>>", "pod")


# ---------------------------------------------------------------------- live (integration)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``facestream serve`` (shipped weights) on a free port."""
    log = tmp_path_factory.mktemp("deploy-serve") / "serve.log"
    with running_service(log, "--scheduler", "fixed", "--knob", "5", timeout=180) as base:
        yield base


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _assign(base: str, cameras: Path, owner: str, *extra: str) -> subprocess.CompletedProcess[str]:
    script = str(DEPLOY / "assign_cameras.py")
    command = [sys.executable, script, "--service", base, "--cameras", str(cameras), "--owner", owner]
    return _run([*command, "--once", "--ready-timeout", "30", *extra])


@pytest.mark.integration
def test_dashboard_and_hpa_queries_against_a_live_service(
    live: str, videos_dir: Path, tmp_path: Path
) -> None:
    """The deployment's pieces around a live service: the RTSP test camera opened by the camera
    assigner (a dead camera too, which reconnects), a WebSocket client capped by max_fps (drops)
    sending a corrupt frame; then /metrics holds every series the dashboard names, and a real
    Prometheus with the compose scrape job and the Kubernetes scrape job (discovery replaced by
    static meta labels) answers every dashboard query and the HPA adapter's query with data."""
    prometheus_binary = _tool("prometheus", f"run {PEERS} (Debian package prometheus)")
    if (reason := missing_peers()) is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    source = RtspTestServer(videos_dir / CLIP)
    source.start()
    stop = threading.Event()
    prometheus = None
    try:
        cameras = tmp_path / "cameras.json"
        dead = f"rtsp://127.0.0.1:{free_port()}/nobody"
        table = {
            "facestream-0": [{"name": "cam", "url": source.url, "max_fps": 5}, {"name": "dead", "url": dead}]
        }
        cameras.write_text(json.dumps(table))
        opened = _assign(live, cameras, "facestream-0")
        assert opened.returncode == 0 and opened.stderr.count("opened") == 2, opened.stderr
        again = _assign(live, cameras, "facestream-0")
        assert again.returncode == 0 and "opened" not in again.stderr, "a second pass changes nothing"
        client = stream_in_background(
            live.replace("http", "ws") + "/ws?name=client&max_fps=6",
            _encoded(videos_dir),
            stop,
            interval=0.08,
            corrupt_first=True,
        )

        address = urllib.parse.urlparse(live).netloc
        compose_config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
        (job,) = [j for j in compose_config["scrape_configs"] if j["job_name"] == "facestream"]
        job["static_configs"][0]["targets"] = [address]
        meta = {
            "__meta_kubernetes_namespace": "facestream-test",
            "__meta_kubernetes_pod_name": "facestream-0",
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
            "__meta_kubernetes_pod_annotation_prometheus_io_port": address.split(":")[1],
            "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        }
        k8s_job = _k8s_scrape_config(address.split(":")[0] + ":1", meta)["scrape_configs"][
            0
        ]  # port from annotation
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [job, k8s_job]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api = f"http://127.0.0.1:{port}"
        queries = [*_dashboard_queries(), ("HPA adapter", _adapter_query("facestream-test", "facestream-0"))]
        deadline, empty = time.time() + 90, [title for title, _ in queries]
        while empty and time.time() < deadline:
            time.sleep(2)
            try:
                empty = [title for title, expr in queries if not _query(api, expr)]
            except OSError:
                continue  # Prometheus is still starting
        exposition = urllib.request.urlopen(live + "/metrics", timeout=10).read().decode()
        adapter = _query(api, _adapter_query("facestream-test", "facestream-0"))
        assert client.is_alive(), "the WebSocket client stopped early"
    finally:
        stop.set()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        source.stop()
    live_names = {
        sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples
    }
    referenced = {name for _, expr in queries for name in _metric_names(expr)}
    assert referenced <= live_names, f"named by the dashboard, not in /metrics: {referenced - live_names}"
    assert not empty, f"dashboard panels without data from a live service: {empty}"
    assert float(adapter[0]["value"][1]) == 3  # the HPA's per-pod value: client, cam, dead
    pruned = tmp_path / "pruned.json"
    pruned.write_text(json.dumps({"facestream-0": table["facestream-0"][:1]}))
    result = _assign(live, pruned, "facestream-0", "--prune")
    assert result.returncode == 0 and "deleted dead (unassigned): 200" in result.stderr, result.stderr
    streams = json.loads(urllib.request.urlopen(live + "/streams", timeout=10).read())["streams"]
    assert {s["name"] for s in streams if s["kind"] == "camera"} == {"cam"}


def _encoded(videos_dir: Path) -> list[bytes]:
    from facestream.service.client import encode_frames

    return encode_frames(clip_frames(videos_dir, CLIP, 12), (640, 480))
