"""The real server run with the settings components/tls-auth gives it, reading its certificate
and credentials from folders laid out the way kubelet projects a Secret, and rotated the way
kubelet rotates them.

kubelet writes a Secret volume as a timestamped folder, a `..data` symlink to it and one
symlink per key (`tls.crt -> ..data/tls.crt`); an updated Secret becomes a new timestamped
folder and `..data` is swapped by rename, so every file changes at once. `project()` does the
same here. The server's environment is the rendered Deployment's, with the mount paths mapped
to a temporary folder, loopback and free ports, the tiny test model and no Redis. Then: the
image's healthcheck works on the health port; the gRPC port refuses plaintext and calls without
a token; a Secret update (new certificate, token added, then the old token removed) is followed
without a restart and without failing a caller that holds a valid token; Prometheus scrapes
/metrics over HTTPS with the ServiceMonitor's tlsConfig. Last, a server defect the rotation
steps of docs/security.md work around: the metrics port misses a client CA changed alone.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from deploy_helpers import DEPLOY, find, load_docs, pod_spec, process_env, tool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import MODEL, PORTS, ServerProcess, _pump, start_server
from tls_material import (
    CertificateAuthority,
    Issued,
    TokenEntry,
    credentials_toml,
    free_port,
    new_token,
    presented_serial,
)

from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

OVERLAY = "cpu-redis-tls"
SERVICE_NAME = "bertrec.bertrec.svc"  # in the certificate's SANs, as deploy/README.md asks
USER = "u0001"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
READY_TIMEOUT_S = 90.0
ROTATION_S = 15.0  # the files change at once; the server follows on its next check


def project(mount: Path, files: dict[str, bytes], mode: int = 0o440) -> None:
    """Write a Secret's keys into `mount` as kubelet's AtomicWriter does: a new timestamped
    folder, `..data` swapped to it by one rename, a symlink per key; then the old folder goes."""
    mount.mkdir(parents=True, exist_ok=True)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    stamp = mount / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for key, data in files.items():
        (stamp / key).write_bytes(data)
        (stamp / key).chmod(mode)
    (mount / "..data_tmp").symlink_to(stamp.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    for key in files:
        if not (mount / key).is_symlink():
            (mount / key).symlink_to(f"..data/{key}")
    if old is not None:
        for stale in (mount / old).iterdir():
            stale.unlink()
        (mount / old).rmdir()


@dataclass
class Secrets:
    """What the overlay's Secrets hold, projected under `root` (the container's "/")."""

    env: dict[str, str]  # the server's settings, paths already under root
    ca: CertificateAuthority
    tokens: list[TokenEntry]

    def mount(self, setting: str) -> Path:
        return Path(self.env[setting]).parent

    def write_auth(self) -> None:
        text = credentials_toml(self.tokens).encode()
        project(self.mount("BERTREC_AUTH_FILE"), {"auth.toml": text})

    def write_certificate(self) -> int:
        """A new server certificate (as cert-manager would renew it); returns its serial."""
        issued = self.ca.server((SERVICE_NAME, "localhost", "127.0.0.1"))
        tls = {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, "ca.crt": self.ca.cert_pem}
        project(self.mount("BERTREC_TLS_CERT"), tls)
        return issued.serial


@dataclass
class Deployed:
    """The server as the TLS overlay runs it."""

    server: ServerProcess
    health_port: int
    secrets: Secrets
    manifests: list[dict[str, Any]]


def server_settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The BERTREC_* values the server container gets (env and the model ConfigMap)."""
    c = pod_spec(docs, "Deployment", "bertrec")["containers"][0]
    values = process_env(docs)  # BERTREC_WORKERS from the CPU limit, as kubelet resolves it
    for ref in c.get("envFrom", []):
        values |= find(docs, "ConfigMap", ref["configMapRef"]["name"])["data"]
    return {k: v for k, v in values.items() if k.startswith("BERTREC_")}


@pytest.fixture(scope="module")
def deployed(
    rendered: dict[str, Path], model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    docs = load_docs(rendered[OVERLAY])
    work = tmp_path_factory.mktemp("tls-deploy")
    root = work / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    env |= {k: f"{root}{v}" if v.startswith("/etc/") else v
            for k, v in server_settings(docs).items()}  # fmt: skip
    health_port = free_port()
    env |= {
        "BERTREC_HOST": "127.0.0.1",
        "BERTREC_GRPC_PORT": "0",
        "BERTREC_METRICS_PORT": "0",
        "BERTREC_HEALTH_PORT": str(health_port),
        "BERTREC_MODEL_REPO": str(model_repo),
        "BERTREC_MODEL": MODEL,
        "BERTREC_VERSION": "",  # the newest of the test repository
    }
    del env["BERTREC_FEEDBACK_STORE"]  # Redis: test_feedback_store.py's business
    secrets = Secrets(env, CertificateAuthority(), [TokenEntry("lt", new_token(), ("read",))])
    secrets.write_certificate()
    secrets.write_auth()
    log = work / "server.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bertrec", "serve"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, bufsize=1,
        )  # fmt: skip
    server = ServerProcess(proc, log)
    threading.Thread(target=_pump, args=(proc, server.stdout_lines), daemon=True).start()
    try:
        match = server.wait_for_line(PORTS, READY_TIMEOUT_S)
        server.port, server.metrics_port = int(match.group(2)), int(match.group(4))
        serving = wait_for(lambda: health(f"127.0.0.1:{health_port}") == "SERVING", READY_TIMEOUT_S)
        assert serving, server.stderr()[-3000:]
        yield Deployed(server, health_port, secrets, docs)
    finally:
        server.terminate()


def wait_for(check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def health(target: str) -> str:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3.0
            )
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def tls_channel(d: Deployed) -> grpc.Channel:
    """A new connection (own subchannel pool) as a client in the cluster makes it: the CA
    from bertrec-ca, the Service's name."""
    credentials = grpc.ssl_channel_credentials(root_certificates=d.secrets.ca.cert_pem)
    options = [
        ("grpc.ssl_target_name_override", SERVICE_NAME),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.secure_channel(f"127.0.0.1:{d.server.port}", credentials, options)


def recommend(channel: grpc.Channel, token: str | None) -> str:
    """The status code of one Recommend call."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        pb_grpc.RecommenderServiceStub(channel).Recommend(
            pb.RecommendRequest(user_id=USER, k=3), metadata=metadata, timeout=10.0
        )
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )


def test_the_images_healthcheck_asks_the_plaintext_health_port(deployed: Deployed) -> None:
    ok = run_healthcheck(deployed.secrets.env)
    assert ok.returncode == 0, ok.stderr
    # Without the health port it would have to ask the TLS port in plaintext: it says so.
    closed = run_healthcheck({**deployed.secrets.env, "BERTREC_HEALTH_PORT": ""})
    assert closed.returncode == 1 and "BERTREC_HEALTH_PORT" in closed.stderr
    # The health port is health alone: the recommender is not served there.
    with grpc.insecure_channel(f"127.0.0.1:{deployed.health_port}") as channel:
        assert recommend(channel, deployed.secrets.tokens[0].token) == "UNIMPLEMENTED"


def test_the_grpc_port_needs_tls_and_a_token(deployed: Deployed) -> None:
    with grpc.insecure_channel(deployed.server.target) as channel:
        assert recommend(channel, deployed.secrets.tokens[0].token) == "UNAVAILABLE"
    with tls_channel(deployed) as channel:
        assert recommend(channel, None) == "UNAUTHENTICATED"
        assert recommend(channel, new_token()) == "UNAUTHENTICATED"
        assert recommend(channel, deployed.secrets.tokens[0].token) == "OK"


def test_a_secret_update_rotates_certificate_and_tokens_without_failing_a_call(
    deployed: Deployed,
) -> None:
    d, secrets = deployed, deployed.secrets
    old = secrets.tokens[0]
    failures: list[str] = []
    calls = [0]
    stop = threading.Event()

    def caller() -> None:
        """Calls with the old token on one long-lived connection, and on new ones."""
        with tls_channel(d) as held:
            while not stop.is_set():
                for channel in (held, tls_channel(d)):
                    code = recommend(channel, old.token)
                    calls[0] += 1
                    if code != "OK":
                        failures.append(code)
                    if channel is not held:
                        channel.close()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    try:
        ca = secrets.ca.cert_pem
        before = presented_serial(d.server.port, ca)
        new = TokenEntry("lt-2", new_token(), ("read",))
        secrets.tokens.append(new)  # step 1: the new token next to the old one, a new certificate
        secrets.write_auth()
        serial = secrets.write_certificate()
        assert serial != before
        rotated = wait_for(lambda: presented_serial(d.server.port, ca) == serial, ROTATION_S)
        assert rotated, "new connections never got the new certificate"
        with tls_channel(d) as channel:
            assert wait_for(lambda: recommend(channel, new.token) == "OK", ROTATION_S)
        stop.set()
        thread.join(30)
        assert calls[0] > 0 and failures == [], f"{len(failures)} of {calls[0]}: {failures}"
        secrets.tokens.remove(old)  # step 2: clients moved over; the old token goes
        secrets.write_auth()
        with tls_channel(d) as channel:
            assert wait_for(lambda: recommend(channel, old.token) == "UNAUTHENTICATED",
                            ROTATION_S)  # fmt: skip
            assert recommend(channel, new.token) == "OK"
    finally:
        stop.set()
        thread.join(30)
    # Each file was followed through the symlinks kubelet swaps; the server never restarted.
    assert d.server.proc.poll() is None
    assert "reloaded" in d.server.stderr()


def test_prometheus_scrapes_metrics_over_https_with_the_service_monitors_tls_config(
    deployed: Deployed, tmp_path: Path
) -> None:
    d = deployed
    url = f"127.0.0.1:{d.server.metrics_port}"
    with pytest.raises((OSError, http.client.HTTPException)):  # no plaintext HTTP
        urllib.request.urlopen(f"http://{url}/metrics", timeout=5)
    (endpoint,) = find(d.manifests, "ServiceMonitor")["spec"]["endpoints"]
    tls = endpoint["tlsConfig"]
    ca_file = tmp_path / tls["ca"]["configMap"]["key"]  # the bertrec-ca ConfigMap's file
    ca_file.write_bytes(d.secrets.ca.cert_pem)
    # What the Prometheus Operator generates from that endpoint.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "bertrec",
            "scheme": endpoint["scheme"],
            "metrics_path": endpoint["path"],
            "tls_config": {"ca_file": str(ca_file), "server_name": tls["serverName"]},
            "static_configs": [{"targets": [url]}],
        }],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def target() -> dict[str, Any]:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/targets", timeout=5
                ) as response:
                    (active,) = json.load(response)["data"]["activeTargets"]
            except (OSError, ValueError):
                return {}
            return dict(active)

        up = wait_for(lambda: target().get("health") == "up", 30.0)
        assert up, (target(), (tmp_path / "prometheus.log").read_text())
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_new_client_ca_reaches_the_metrics_port_like_the_grpc_port(
    model_repo: Path, tmp_path: Path
) -> None:
    ca, next_ca = CertificateAuthority(), CertificateAuthority("next CA")
    cert, key = ca.server((SERVICE_NAME, "localhost", "127.0.0.1")).write(tmp_path, "tls")
    project(tmp_path / "client-ca", {"ca.crt": ca.cert_pem})
    health_port = free_port()
    server = start_server(
        model_repo, tmp_path / "logs", "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(tmp_path / "client-ca" / "ca.crt"), "--metrics-tls", "true",
        "--health-port", str(health_port),
    )  # fmt: skip
    try:
        assert wait_for(lambda: health(f"127.0.0.1:{health_port}") == "SERVING", READY_TIMEOUT_S)
        old, new = ca.client("collector"), next_ca.client("collector")
        assert grpc_accepts(server.port, ca.cert_pem, old)
        assert metrics_accept(server.metrics_port, ca.cert_pem, old, tmp_path)
        assert not metrics_accept(server.metrics_port, ca.cert_pem, new, tmp_path)
        # Step 1 of a client CA rotation: the bundle holds the old and the new CA.
        project(tmp_path / "client-ca", {"ca.crt": ca.cert_pem + next_ca.cert_pem})
        assert wait_for(lambda: grpc_accepts(server.port, ca.cert_pem, new), ROTATION_S)
        assert wait_for(
            lambda: metrics_accept(server.metrics_port, ca.cert_pem, new, tmp_path), ROTATION_S
        ), "the metrics port still refuses a client of the new CA"
    finally:
        server.terminate()


def grpc_accepts(port: int, ca_pem: bytes, client: Issued) -> bool:
    """Whether a new mTLS connection presenting `client` gets a health answer."""
    credentials = grpc.ssl_channel_credentials(ca_pem, client.key_pem, client.cert_pem)
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return True


def metrics_accept(port: int, ca_pem: bytes, client: Issued, folder: Path) -> bool:
    """Whether GET /healthz over HTTPS presenting `client` is answered (a refused client
    certificate shows on the first read under TLS 1.3, not in the handshake)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.load_cert_chain(*client.write(folder, f"client-{client.serial}"))
    try:
        with urllib.request.urlopen(
            f"https://localhost:{port}/healthz", context=context, timeout=5
        ) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False
