"""The Kubernetes manifests: rendered by kustomize, validated against the API schemas and by
checkov, and checked against what the server actually does (ports, health, drain time).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    JOBS,
    OVERLAYS,
    REDIS_OVERLAYS,
    find,
    load_docs,
    process_env,
    quantity,
    run_tool,
    server_env,
)

from bertrec.server.cli import size_processes
from bertrec.server.config import ServerConfig, load_config
from bertrec.server.environment import UsableCpus

# Custom resources of the Prometheus Operator: kubernetes-validate ships only the core API's
# schemas, so these are checked structurally below (test_service_monitor_*,
# test_prometheus_rule_*) instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", "bertrec")["spec"]["template"]["spec"]["containers"][0]


def env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The server's plain env values (not those taken from a Secret)."""
    return {e["name"]: e["value"] for e in server_env(docs) if "value" in e}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(rendered: dict[str, Path], overlay: str) -> None:
    result = run_tool("kubernetes-validate", "--strict", str(rendered[overlay]), *map(str, JOBS))
    output = result.stdout + result.stderr
    assert "ERROR" not in output, output
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unknown == CRD_KINDS, output
    validated = {k for d in load_docs(rendered[overlay]) for k in [d["kind"]]} - CRD_KINDS
    for kind in validated:
        assert f"passed for resource {kind.lower()}/" in output, f"{kind} not validated"


def test_checkov_kubernetes(rendered: dict[str, Path], tmp_path: Path) -> None:
    for overlay, path in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(path.read_text())
    for job in JOBS:
        (tmp_path / job.name).write_text(job.read_text())
    run_tool("checkov", "--config-file", str(DEPLOY / ".checkov.yaml"), "--skip-download",
             "--quiet", "--compact", "--framework", "kubernetes", "-d", str(tmp_path))  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_entrypoint_is_used_and_ports_match_the_settings(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = load_docs(rendered[overlay])
    c = container(docs)
    assert "command" not in c and not c.get("args"), "the image's `bertrec serve` must run"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    settings = env(docs)
    assert ports == {
        "grpc": int(settings["BERTREC_GRPC_PORT"]),
        "metrics": int(settings["BERTREC_METRICS_PORT"]),
        "health": int(settings["BERTREC_HEALTH_PORT"]),
    }
    # kubelet's gRPC probes speak plaintext: with TLS on the gRPC port they ask the plaintext
    # health-only port (test_security.py checks that nothing else reaches it).
    probed = ports["health"] if "BERTREC_TLS_CERT" in settings else ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": probed}, probe  # grpc.health.v1, service ""
    (model_ref,) = c["envFrom"]
    model = find(docs, "ConfigMap", model_ref["configMapRef"]["name"])["data"]
    assert model["BERTREC_MODEL"] and int(model["BERTREC_VERSION"]) >= 1
    names = {f.name.upper() for f in dataclasses.fields(ServerConfig)}
    # The server refuses unknown BERTREC_* variables; others (a Secret's value) it ignores.
    keys = [e["name"] for e in server_env(docs)] + list(model)
    for key in [k for k in keys if k.startswith("BERTREC_")]:
        assert key.removeprefix("BERTREC_") in names, f"{key} is not a server setting"


WORKERS_FROM_THE_LIMIT = {
    "name": "BERTREC_WORKERS",
    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
}
THREADS = ("BERTREC_RANKER_THREADS", "BERTREC_INTRA_OP_THREADS", "BERTREC_INTER_OP_THREADS")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_the_cpu_limit_and_their_threads_fit_in_it(
    rendered: dict[str, Path], overlay: str, tmp_path: Path
) -> None:
    docs = load_docs(rendered[overlay])
    assert WORKERS_FROM_THE_LIMIT in server_env(docs)
    limit = quantity(container(docs)["resources"]["limits"]["cpu"])
    settings = process_env(docs)  # kubelet's value: the limit rounded up
    assert int(settings["BERTREC_WORKERS"]) == math.ceil(limit) >= 1
    # What the server runs with in that pod: its cgroup quota is the limit, on a big node.
    env = {k: settings[k] for k in ("BERTREC_WORKERS", *THREADS) if k in settings}
    config = load_config({"model_repo": tmp_path, "model": "m"}, env=env)
    cpus = UsableCpus(affinity=64, quota=float(limit))
    sized = size_processes(config, cpus)
    assert sized.workers == cpus.count == math.ceil(limit)  # the same as --workers auto there
    for threads in (sized.ranker_threads, sized.intra_op_threads):
        # 0 (ONNX Runtime's default, one per CPU) is left only to a single worker.
        assert sized.workers * (threads or cpus.count) <= cpus.count, (overlay, sized)


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_where_the_hpa_scales_on_cpu_the_limit_is_the_request(
    rendered: dict[str, Path], overlay: str
) -> None:
    # Utilisation is measured against the request; workers come from the limit. Equal, the HPA
    # adds pods when the workers' CPUs are 70% busy, not when a pod bursts past its request.
    docs = load_docs(rendered[overlay])
    metrics = find(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    if any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
        resources = container(docs)["resources"]
        assert quantity(resources["limits"]["cpu"]) == quantity(resources["requests"]["cpu"])


def test_the_base_deployment_has_a_cpu_limit_equal_to_its_request() -> None:
    # Without a limit, the Downward API would make one worker per CPU of the node.
    docs = load_docs(DEPLOY / "k8s" / "base" / "deployment.yaml")
    c = container(docs)
    assert quantity(c["resources"]["limits"]["cpu"]) == quantity(c["resources"]["requests"]["cpu"])
    assert WORKERS_FROM_THE_LIMIT in c["env"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_the_servers_drain(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = load_docs(rendered[overlay])
    pod = find(docs, "Deployment", "bertrec")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    grace_s = float(env(docs)["BERTREC_GRACE_PERIOD_S"])
    assert grace_s == ServerConfig.__dataclass_fields__["grace_period_s"].default
    sleep_s = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # SIGTERM comes after preStop; then server.stop(grace) for calls and up to `grace` more for
    # the batchers to drain (server/app.py Server.stop).
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + 2 * grace_s + 1
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > 2 * grace_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(rendered: dict[str, Path], overlay: str) -> None:
    docs = load_docs(rendered[overlay])
    pod = find(docs, "Deployment", "bertrec")["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("store", ["", "-redis"], ids=["sqlite", "redis"])
def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(
    rendered: dict[str, Path], store: str
) -> None:
    gpu, cpu = (container(load_docs(rendered[o + store])) for o in ("gpu", "cpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "CUDAExecutionProvider" in env(load_docs(rendered["gpu" + store]))["BERTREC_PROVIDERS"]
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert gpu["image"].endswith("bertrec-gpu:0.1.0") and cpu["image"].endswith("bertrec-cpu:0.1.0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_the_headless_one_is_headless(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = load_docs(rendered[overlay])
    pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for name in ("bertrec", "bertrec-headless"):
        selector = find(docs, "Service", name)["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), name
    assert find(docs, "Service", "bertrec-headless")["spec"]["clusterIP"] == "None"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        spec = find(docs, kind, "bertrec")["spec"]
        selector = spec.get("selector") or spec["podSelector"]
        assert selector["matchLabels"].items() <= pod_labels.items(), kind


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_hpa_scales_the_deployment_on_the_adapters_metric(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = load_docs(rendered[overlay])
    hpa = find(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    assert hpa["maxReplicas"] > hpa["minReplicas"] > 1
    kinds = {m["type"]: m for m in hpa["metrics"]}
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] in served
    if overlay.startswith("cpu"):
        assert kinds["Resource"]["resource"]["name"] == "cpu"
    else:  # the GPU component's patch: in-flight calls only, at most 4 pods
        assert set(kinds) == {"Pods"} and hpa["maxReplicas"] == 4


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_services_metrics_port(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = load_docs(rendered[overlay])
    monitor = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [
        s for s in docs
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    # One Service, named like the Prometheus job the rules and the dashboard select on.
    assert [s["metadata"]["name"] for s in selected] == ["bertrec"]
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_prometheus_rule_equals_the_rules_file(rendered: dict[str, Path]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "bertrec.rules.yml").read_text())
    for overlay in OVERLAYS:
        rule = find(load_docs(rendered[overlay]), "PrometheusRule")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"] == rules
