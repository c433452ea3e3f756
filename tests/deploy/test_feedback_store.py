"""The feedback store in the Kubernetes manifests: SQLite on the single pod's own volume by
default, or the shared Redis of components/feedback-redis.

The Redis container's own start script, redis.conf and probe script are taken from the
rendered manifests and run against the real `redis-server` (its container paths mapped onto
a temporary folder, loopback and a free port), and the server's store URL, expanded the way
kubelet expands it, is opened with bertrec's Redis store.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from deploy_helpers import (
    REDIS_OVERLAYS,
    SQLITE_OVERLAYS,
    find,
    kubelet_expand,
    load_docs,
    pod_spec,
    process_env,
    server_env,
    tool,
)
from redis_harness import wait_until

from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.feedback.store import SQLITE_SCHEME, open_store

REDIS = "bertrec-redis"  # the StatefulSet, its Service and the Secret
PASSWORD = "0123456789abcdef" * 4  # what `openssl rand -hex 32` makes
START_TIMEOUT_S = 30.0

Docs = list[dict[str, Any]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def docs_of(rendered: dict[str, Path], overlay: str) -> Docs:
    return load_docs(rendered[overlay])


def store_url(docs: Docs, secrets: dict[tuple[str, str], str]) -> str:
    """BERTREC_FEEDBACK_STORE as the server process sees it: env in order, Secret references
    resolved from `secrets` ((name, key) -> value), $(VAR) expanded by kubelet's rules."""
    return process_env(docs, secrets)["BERTREC_FEEDBACK_STORE"]


def mounted_volume(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds `path` in the container (the longest mount path above it)."""
    mounts = [m for m in container["volumeMounts"] if f"{path}/".startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert not mount.get("readOnly"), f"{path} is on a read-only mount"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


# ---- SQLite, the default ----


@pytest.mark.parametrize("overlay", SQLITE_OVERLAYS)
def test_sqlite_store_is_on_a_writable_volume_of_its_own_that_outlives_the_pod(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    pod = pod_spec(docs, "Deployment", "bertrec")
    url = store_url(docs, {})
    path = url.removeprefix(SQLITE_SCHEME)  # as open_store reads it
    assert url.startswith(SQLITE_SCHEME) and path.startswith("/"), url
    volume = mounted_volume(pod, pod["containers"][0], path)
    claim = find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # Block storage for one pod, not the models' ReadWriteMany (network) volume.
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not [d for d in docs if d["metadata"]["name"].startswith(REDIS)]


@pytest.mark.parametrize("overlay", SQLITE_OVERLAYS)
def test_sqlite_store_has_one_pod_never_scaled_nor_surged(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    deployment = find(docs, "Deployment", "bertrec")["spec"]
    # More pods would need the ReadWriteOnce volume the first one holds.
    assert deployment["replicas"] == 1
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert deployment["strategy"] == {"type": "Recreate"}  # no surge pod in a rollout


@pytest.mark.parametrize("overlay", SQLITE_OVERLAYS)
def test_sqlite_server_opens_no_connection(rendered: dict[str, Path], overlay: str) -> None:
    policy = find(docs_of(rendered, overlay), "NetworkPolicy", "bertrec")["spec"]
    assert "Egress" in policy["policyTypes"] and policy["egress"] == []


# ---- Redis, the shared store ----


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_server_url_names_the_redis_service_with_the_secrets_password(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    redis_pod = pod_spec(docs, "StatefulSet", REDIS)
    (secret_volume,) = [v["secret"] for v in redis_pod["volumes"] if "secret" in v]
    (item,) = secret_volume["items"]
    url = urlsplit(store_url(docs, {(secret_volume["secretName"], item["key"]): PASSWORD}))
    assert url.scheme == "redis" and url.password == PASSWORD and url.path == "/0"
    service = find(docs, "Service", url.hostname)
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    container_ports = {p["name"]: p["containerPort"] for p in redis_pod["containers"][0]["ports"]}
    assert container_ports[port["targetPort"]] == port["port"]
    labels = find(docs, "StatefulSet", REDIS)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The password lives only in the Secret the operator creates, never in the manifests.
    assert not [d for d in docs if d["kind"] == "Secret"]


@pytest.mark.parametrize("overlay", [*REDIS_OVERLAYS, *SQLITE_OVERLAYS])
def test_every_env_reference_is_defined_before_it(rendered: dict[str, Path], overlay: str) -> None:
    # kubelet leaves "$(NAME)" as it is when NAME comes later or not at all: the server would
    # get a URL with "$(REDIS_PASSWORD)" in it.
    defined: set[str] = set()
    for entry in server_env(docs_of(rendered, overlay)):
        value = entry.get("value", "")
        leftover = kubelet_expand(value, dict.fromkeys(defined, ""))
        assert "$(" not in leftover, f"{entry['name']}={value}: not defined before it"
        defined.add(entry["name"])


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_with_redis_the_deployment_keeps_rolling_updates_and_several_replicas(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    deployment = find(docs, "Deployment", "bertrec")["spec"]
    assert deployment["strategy"]["type"] == "RollingUpdate" and deployment["replicas"] > 1
    assert find(docs, "HorizontalPodAutoscaler", "bertrec")["spec"]["maxReplicas"] > 1
    redis_set = find(docs, "StatefulSet", REDIS)["spec"]
    assert redis_set["replicas"] == 1  # one writer of the log
    # A Service named bertrec-* would put BERTREC_REDIS_PORT=tcp://... into every pod's env
    # (service links), a BERTREC_* variable that is no setting.
    assert pod_spec(docs, "Deployment", "bertrec")["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_redis_keeps_its_data_on_a_claim_per_pod_and_runs_locked_down(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    spec = find(docs, "StatefulSet", REDIS)["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    data_dir = redis_conf(docs)["dir"]
    (template,) = spec["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[data_dir] == template["metadata"]["name"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert (
        container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["sh", PING_SCRIPT], probe
    # The password reaches Redis as a file: nothing of the Secret in its environment.
    assert "env" not in container and "envFrom" not in container


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_network_policies_open_exactly_server_to_redis(
    rendered: dict[str, Path], overlay: str
) -> None:
    docs = docs_of(rendered, overlay)
    server_labels = find(docs, "Deployment", "bertrec")["spec"]["template"]["metadata"]["labels"]
    redis_labels = find(docs, "StatefulSet", REDIS)["spec"]["template"]["metadata"]["labels"]
    redis_port = find(docs, "Service", REDIS)["spec"]["ports"][0]
    egress = find(docs, "NetworkPolicy", "bertrec")["spec"]["egress"]
    to_redis = [
        rule for rule in egress
        if any(p.get("podSelector", {}).get("matchLabels", {}).items() <= redis_labels.items()
               and "namespaceSelector" not in p for p in rule["to"])
    ]  # fmt: skip
    assert [r["ports"] for r in to_redis] == [[{"port": redis_port["port"], "protocol": "TCP"}]]
    dns_ports = {
        (p["port"], p["protocol"]) for r in egress if r not in to_redis for p in r["ports"]
    }
    assert dns_ports == {(53, "UDP"), (53, "TCP")}  # to resolve bertrec-redis
    policy = find(docs, "NetworkPolicy", REDIS)["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}
    assert source["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert rule["ports"] == [{"port": redis_port["targetPort"], "protocol": "TCP"}]
    assert policy["egress"] == []


# ---- the Redis container's files, run for real ----

PING_SCRIPT = "/etc/redis/ping.sh"


def redis_files(docs: Docs) -> dict[str, str]:
    """The files of the Redis ConfigMap the StatefulSet mounts (redis.conf, ping.sh)."""
    pod = pod_spec(docs, "StatefulSet", REDIS)
    (config,) = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    data: dict[str, str] = find(docs, "ConfigMap", config)["data"]
    return data


def redis_conf(docs: Docs) -> dict[str, str]:
    """redis.conf's directives (name -> the rest of the line)."""
    lines = [ln.strip() for ln in redis_files(docs)["redis.conf"].splitlines()]
    pairs = [ln.split(None, 1) for ln in lines if ln and not ln.startswith("#")]
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


@pytest.mark.parametrize("overlay", REDIS_OVERLAYS)
def test_redis_conf_acknowledges_only_fsynced_writes_and_never_evicts(
    rendered: dict[str, Path], overlay: str
) -> None:
    conf = redis_conf(docs_of(rendered, overlay))
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always"
    assert conf["no-appendfsync-on-rewrite"] == "no"
    assert conf["save"] == '""'
    assert conf["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in conf  # the password is included from a file written at start


@dataclass
class RedisPod:
    """The Redis container's filesystem mapped onto a folder, and its start script."""

    root: Path
    port: int
    script: str

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def log(self) -> Path:
        return self.root / "container.log"  # its stdout and stderr, as kubectl logs shows

    def start(self, password: str) -> subprocess.Popen[bytes]:
        self.path("/run/secrets/redis/password").write_text(password)
        with self.log.open("ab") as log:
            return subprocess.Popen(["sh", "-c", self.script], stdout=log, stderr=log)

    def ping_script(self, password: str) -> subprocess.CompletedProcess[str]:
        self.path("/run/secrets/redis/password").write_text(password)
        script = self.path(PING_SCRIPT)
        return subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)


def localise(text: str, root: Path, port: int) -> str:
    """Container paths -> folders under `root`; the port -> `port`; every interface ->
    loopback. (test_localise_... fails when the files use a path this does not map.)"""
    for old, new in [
        ("bind * -::*", "bind 127.0.0.1"),
        ("6379", str(port)),
        *((p, f"{root}{p}") for p in ("/etc/redis/", "/run/secrets/redis/", "/run/redis/")),
        ("dir /data", f"dir {root}/data"),
    ]:
        if old in text:
            text = text.replace(old, new)
    return text


@pytest.fixture
def redis_pod(rendered: dict[str, Path], tmp_path: Path) -> Iterator[RedisPod]:
    tool("redis-server")  # the script execs it from PATH; fails (or skips) naming ci-deps.sh
    docs = docs_of(rendered, REDIS_OVERLAYS[0])
    port = free_port()
    for folder in ("etc/redis", "run/secrets/redis", "run/redis", "data"):
        (tmp_path / folder).mkdir(parents=True)
    for name, text in redis_files(docs).items():
        (tmp_path / "etc/redis" / name).write_text(localise(text, tmp_path, port))
    (container,) = pod_spec(docs, "StatefulSet", REDIS)["containers"]
    assert container["command"] == ["sh", "-c"]
    (script,) = container["args"]
    yield RedisPod(tmp_path, port, kubelet_expand(localise(script, tmp_path, port), {}))


def test_localise_maps_every_path_and_port_the_redis_files_use(rendered: dict[str, Path]) -> None:
    docs = docs_of(rendered, REDIS_OVERLAYS[0])
    (container,) = pod_spec(docs, "StatefulSet", REDIS)["containers"]
    for text in [*redis_files(docs).values(), *container["args"]]:
        local = localise(text, Path("/ROOT"), 7)
        unmapped = re.findall(r"(?<!/ROOT)(/(?:etc|run|data|var|tmp)\b\S*)|(6379)|(bind \*)", local)
        assert not unmapped, (unmapped, text)


def started(pod: RedisPod, proc: subprocess.Popen[bytes]) -> redis.Redis:
    """A client with the password, once Redis answers PING (or a failure with its output)."""
    client = redis.Redis(port=pod.port, password=PASSWORD, socket_timeout=5.0)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis exited {proc.returncode}: {pod.log.read_text()}")
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_until(answers, START_TIMEOUT_S, "the Redis container's start script to serve")
    return client


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_redis_starts_from_the_manifests_files_durable_and_password_protected(
    redis_pod: RedisPod,
) -> None:
    proc = redis_pod.start(PASSWORD)
    try:
        client = started(redis_pod, proc)
        config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"], config["save"]) == (
            "yes", "always", "",
        )  # fmt: skip
        assert config["maxmemory-policy"] == "noeviction" and int(str(config["maxmemory"])) > 0
        with (
            redis.Redis(port=redis_pod.port) as anonymous,
            pytest.raises(redis.exceptions.AuthenticationError),
        ):
            anonymous.ping()
        auth = redis_pod.path("/run/redis/auth.conf")
        assert auth.stat().st_mode & 0o077 == 0  # umask 077: only Redis's user reads it
        assert redis_pod.ping_script(PASSWORD).returncode == 0
        assert redis_pod.ping_script("wrong").returncode != 0
        client.close()
    finally:
        stop(proc)
    assert redis_pod.ping_script(PASSWORD).returncode != 0  # nothing listening


@pytest.mark.parametrize("password", ["", "p@ss:word", 'has"quote', "with space"])
def test_redis_refuses_a_password_the_servers_url_cannot_carry(
    redis_pod: RedisPod, password: str
) -> None:
    assert redis_pod.start(password).wait(timeout=30) == 1
    assert "secret bertrec-redis: password must be" in redis_pod.log.read_text()
    assert not redis_pod.path("/run/redis/auth.conf").exists()


def test_the_servers_expanded_url_opens_the_feedback_store(
    rendered: dict[str, Path], redis_pod: RedisPod
) -> None:
    docs = docs_of(rendered, REDIS_OVERLAYS[0])
    url = store_url(docs, {(REDIS, "password"): PASSWORD})
    host = urlsplit(url).netloc.rsplit("@", 1)[1]
    local_url = url.replace(f"@{host}/", f"@127.0.0.1:{redis_pod.port}/")
    assert local_url != url
    proc = redis_pod.start(PASSWORD)
    try:
        started(redis_pod, proc).close()
        store = open_store(local_url)  # refuses a Redis without appendonly + appendfsync always
        try:
            event = FeedbackEvent("u1", "i1", FeedbackKind.CLICK, 0.0, time.time(), "key-1")
            assert store.append([event]).accepted == 1
            assert [e.event for e in store.user_events("u1")] == [event]
            assert PASSWORD not in store.url
        finally:
            store.close()
        aof = redis_pod.path("/data/appendonlydir")
        assert b"key-1" in b"".join(p.read_bytes() for p in aof.iterdir())
    finally:
        stop(proc)
