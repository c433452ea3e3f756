"""TLS, tokens and probes in the Kubernetes manifests (components/tls-auth, components/mtls,
jobs/loadtest-job.yaml), checked against the settings the server reads.

What the rendered manifests must give the server: every TLS and credentials file it is told
to read sits on a read-only mount of a whole Secret (no subPath: kubelet refreshes only whole
mounts, and rotation is updating the Secret), readable by the server's group only; probes
that need neither TLS nor a token, on a health port that no Service and no NetworkPolicy rule
exposes; Prometheus scraping HTTPS exactly when the server serves it. And that clients in
deploy/ read their token from a Secret file, never from an argument or a variable.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, JOBS, OVERLAYS, TLS_OVERLAYS, find, load_docs, pod_spec

from bertrec.cli import build_parser

Docs = list[dict[str, Any]]
# Setting -> (Secret, key) the components mount for it.
SECRET_FILES = {
    "BERTREC_TLS_CERT": ("bertrec-tls", "tls.crt"),
    "BERTREC_TLS_KEY": ("bertrec-tls", "tls.key"),
    "BERTREC_TLS_CLIENT_CA": ("bertrec-client-ca", "ca.crt"),
    "BERTREC_AUTH_FILE": ("bertrec-auth", "auth.toml"),
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
LOADTEST = next(j for j in JOBS if j.name == "loadtest-job.yaml")


def docs_of(rendered: dict[str, Path], overlay: str) -> Docs:
    return load_docs(rendered[overlay])


def server(docs: Docs) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's pod spec and container."""
    pod = pod_spec(docs, "Deployment", "bertrec")
    return pod, pod["containers"][0]


def settings(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def mount_of(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The mount holding file `path` directly (its folder is the mount point), and its volume."""
    folder = str(PurePosixPath(path).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_tls_and_credentials_files_are_whole_secrets_mounted_read_only(
    rendered: dict[str, Path], overlay: str
) -> None:
    pod, c = server(docs_of(rendered, overlay))
    values = settings(c)
    mtls = "mtls" in overlay
    expected = {n for n in SECRET_FILES if mtls or n != "BERTREC_TLS_CLIENT_CA"}
    assert expected <= set(values), sorted(expected - set(values))
    assert ("BERTREC_TLS_CLIENT_CA" in values) == mtls
    for name in expected:
        secret, key = SECRET_FILES[name]
        path = PurePosixPath(values[name])
        mount, volume = mount_of(pod, c, str(path))
        assert path.name == key, f"{name} names {path.name}, the Secret's key is {key}"
        assert mount.get("readOnly") is True and "subPath" not in mount, mount
        assert volume["secret"]["secretName"] == secret, volume
        assert "items" not in volume["secret"], "every key of the Secret is projected"
        # Files owned by root:fsGroup; the server runs in that group; nobody else reads them.
        mode = volume["secret"]["defaultMode"]
        assert mode & 0o077 == 0o040, oct(mode)
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert values["BERTREC_REFLECTION"] == "auth"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_need_no_tls_and_the_health_port_reaches_only_the_node(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    c = server(docs)[1]
    values = settings(c)
    health = int(values["BERTREC_HEALTH_PORT"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["health"] == health
    if "BERTREC_TLS_CERT" in values:
        assert all(c[p]["grpc"]["port"] == health for p in PROBES)
    exposed = {health, "health"}
    for service in [d for d in docs if d["kind"] == "Service"]:
        targets = {p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
        assert not targets & exposed, f"Service {service['metadata']['name']} exposes health"
    labels = find(docs, "Deployment", "bertrec")["spec"]["template"]["metadata"]["labels"]
    policies = [
        d for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]  # fmt: skip
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            # A rule without ports admits every port, the health port included.
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule admits every port"
            assert not {p["port"] for p in rule["ports"]} & exposed, policy["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_https_exactly_when_the_server_serves_it(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    values = settings(server(docs)[1])
    metrics_tls = values.get("BERTREC_METRICS_TLS") == "true"
    (endpoint,) = find(docs, "ServiceMonitor")["spec"]["endpoints"]
    service = find(docs, "Service", "bertrec")
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert endpoint.get("scheme", "http") == ("https" if metrics_tls else "http")
    assert port["appProtocol"] == endpoint.get("scheme", "http")
    if not metrics_tls:
        assert "tlsConfig" not in endpoint
        return
    tls = endpoint["tlsConfig"]
    namespace = service["metadata"]["namespace"]
    # Prometheus dials pod IPs: it checks the certificate against the Service's name instead.
    assert tls["serverName"] == f"{service['metadata']['name']}.{namespace}.svc"
    assert tls["ca"] == {"configMap": {"name": "bertrec-ca", "key": "ca.crt"}}
    assert "insecureSkipVerify" not in tls
    # Metrics over TLS ask for a client certificate exactly when the gRPC port does.
    client_ca = "BERTREC_TLS_CLIENT_CA" in values
    assert ("cert" in tls and "keySecret" in tls) == client_ca, tls
    if client_ca:
        assert tls["cert"]["secret"]["name"] == tls["keySecret"]["name"] == "bertrec-prometheus-tls"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_in_the_manifests(rendered: dict[str, Path], overlay: str) -> None:
    docs = docs_of(rendered, overlay) + [d for job in JOBS for d in load_docs(job)]
    assert not [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]


def loadtest() -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The load-test job's pod spec, container, and its command line parsed by the real CLI
    (an option the CLI lacks fails here, as it would fail the job)."""
    pod = pod_spec(load_docs(LOADTEST), "Job", "bertrec-loadtest")
    c = pod["containers"][0]
    assert c["command"] == ["bertrec"], "the image's own CLI"
    try:
        args = build_parser().parse_args(c["args"])
    except SystemExit:
        pytest.fail(f"`bertrec {shlex.join(c['args'])}` is refused by the CLI", pytrace=False)
    assert args.command == "loadtest"
    return pod, c, args


def test_loadtest_job_reads_its_token_from_a_secret_file_and_trusts_the_ca() -> None:
    pod, c, args = loadtest()
    token_mount, token_volume = mount_of(pod, c, str(args.token_file))
    assert token_mount["readOnly"] is True and "subPath" not in token_mount
    assert token_volume["secret"]["secretName"] == "bertrec-loadtest-token"
    assert token_volume["secret"]["defaultMode"] & 0o077 == 0o040
    ca_mount, ca_volume = mount_of(pod, c, str(args.tls_ca))
    assert ca_mount["readOnly"] is True and ca_volume["configMap"]["name"] == "bertrec-ca"
    assert PurePosixPath(args.tls_ca).name == "ca.crt"
    # Nothing else carries a token: no variables, and the only token argument is the file.
    assert "env" not in c and "envFrom" not in c
    assert [a for a in c["args"] if "token" in a.lower()] == ["--token-file", str(args.token_file)]


def test_loadtest_job_dials_the_servers_tls_port_through_the_service(
    rendered: dict[str, Path],
) -> None:
    docs = docs_of(rendered, "cpu-redis-tls")
    service = find(docs, "Service", "bertrec")
    grpc_port = int(settings(server(docs)[1])["BERTREC_GRPC_PORT"])
    _, _, args = loadtest()
    host, _, port = args.target.rpartition(":")
    assert host == f"bertrec.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == grpc_port
    # Its NetworkPolicy lets it reach exactly the server pods' gRPC port (and DNS).
    (policy,) = [d for d in load_docs(LOADTEST) if d["kind"] == "NetworkPolicy"]
    server_labels = find(docs, "Deployment", "bertrec")["spec"]["template"]["metadata"]["labels"]
    to_server = [
        [p["port"] for p in rule["ports"]]
        for rule in policy["spec"]["egress"]
        if any(
            "namespaceSelector" not in peer
            and peer["podSelector"]["matchLabels"].items() <= server_labels.items()
            for peer in rule["to"]
        )
    ]  # fmt: skip
    assert to_server == [[grpc_port]]
    assert policy["spec"]["ingress"] == []


def test_compose_publishes_every_port_on_the_hosts_loopback_only() -> None:
    # The compose demo is plaintext and unauthenticated: nothing may reach it from the network.
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
