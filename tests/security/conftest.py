"""The security suite's servers: the real `bertrec serve` with TLS, mTLS and an auth file.

Certificates and tokens are made at run time (`tls_material.py`), once per session:
- a CA; a server certificate for localhost/127.0.0.1;
- client certificates: `reader` (SAN reader.internal, mapped to `read`), `collector`
  (CN feedback-collector, mapped to `feedback`), `mesh` (a SPIFFE URI SAN, mapped to `read`),
  `stranger` (signed by the CA, mapped to nothing) and `rogue` (signed by another CA);
- tokens: reader (`read`), collector (`feedback`), operator (`admin`).

Servers, each started once per session and only when a test asks for it:
- `tls_server`: TLS + tokens, reflection `auth`, a plaintext health-only port, /metrics over
  HTTPS, a SQLite feedback store, explicit model control (the admin RPCs are live);
- `mtls_server`: client certificates required (identities map to roles), reflection `on`,
  /metrics over HTTPS requiring a client certificate too;
- `plain_server`: plaintext on loopback + tokens, reflection `off`.
"""

from __future__ import annotations

import re
import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import READY_TIMEOUT_S, ServerProcess, start_server
from tls_material import (
    CertificateAuthority,
    IdentityEntry,
    Issued,
    TokenEntry,
    bearer,
    free_port,
    token_entries,
    write_auth_file,
)

READY = re.compile(r"bertrec serve: ready on port")
CALL_TIMEOUT_S = 10.0
SPIFFE_ID = "spiffe://cluster.local/ns/web/sa/frontend"  # a mesh workload's identity (URI SAN)
TOKENS = {"reader": ["read"], "collector": ["feedback"], "operator": ["admin"]}
IDENTITIES = (
    IdentityEntry("reader-service", "san", "reader.internal", ("read",)),
    IdentityEntry("feedback-collector", "cn", "feedback-collector", ("feedback",)),
    IdentityEntry("mesh-frontend", "san", SPIFFE_ID, ("read",)),
)


@dataclass(frozen=True)
class Pki:
    """Everything a test needs to reach the servers: files, PEM bytes and tokens."""

    folder: Path
    ca: CertificateAuthority
    ca_path: Path
    server: Issued
    server_cert: Path
    server_key: Path
    clients: dict[str, Issued]  # reader, collector, mesh, stranger, rogue
    tokens: dict[str, TokenEntry]

    def token(self, name: str) -> str:
        return self.tokens[name].token


@dataclass(frozen=True)
class SecureServer:
    """A running server and where to reach each of its ports."""

    process: ServerProcess
    pki: Pki
    health_port: int | None = None
    metrics_tls: bool = False

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def target(self) -> str:
        return self.process.target

    def log(self) -> str:
        return self.process.stderr()

    def metrics_text(self) -> str:
        """/metrics, over HTTPS (verified against the test CA) when the server serves it so."""
        if not self.metrics_tls:
            url = f"http://127.0.0.1:{self.process.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as reply:
                return str(reply.read().decode())
        context = ssl.create_default_context(cadata=self.pki.ca.cert_pem.decode())
        url = f"https://127.0.0.1:{self.process.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S, context=context) as reply:
            return str(reply.read().decode())

    def auth_failures(self) -> dict[str, float]:
        """bertrec_auth_failures_total by reason."""
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            if family.name == "bertrec_auth_failures":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        out[sample.labels["reason"]] = sample.value
        return out


def tls_channel(port: int, pki: Pki, client: Issued | None = None) -> grpc.Channel:
    """A TLS channel to 127.0.0.1:`port` trusting the test CA, presenting `client` if given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def call(
    channel: grpc.Channel, method: str, request: Any, token: str | None = None, **metadata: str
) -> tuple[grpc.StatusCode, str]:
    """One unary call; (status code, details). `metadata` adds raw headers."""
    pairs: list[tuple[str, str]] = list(bearer(token)) if token is not None else []
    pairs += list(metadata.items())
    rpc = channel.unary_unary(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=lambda raw: raw,
    )
    try:
        rpc(request, timeout=CALL_TIMEOUT_S, metadata=pairs or None)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@contextmanager
def launched(repo: Path, log_dir: Path, *flags: str) -> Iterator[ServerProcess]:
    """`bertrec serve` with `flags`, returned once it printed that it is serving.

    (server_harness.serving waits with a plaintext health call, which a TLS port refuses.)
    """
    process = start_server(repo, log_dir, *flags)
    try:
        process.wait_for_line(READY, READY_TIMEOUT_S)
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    server = ca.server()
    cert, key = server.write(folder, "server")
    clients = {
        "reader": ca.client("reader", sans=["reader.internal"]),
        "collector": ca.client("feedback-collector"),
        "stranger": ca.client("stranger", sans=["stranger.internal"]),
        "mesh": ca.client("frontend", sans=[SPIFFE_ID]),
        "rogue": CertificateAuthority("rogue CA").client("reader", sans=["reader.internal"]),
    }
    return Pki(folder, ca, ca.write(folder), server, cert, key, clients, token_entries(TOKENS))


def _auth_file(pki: Pki, folder: Path) -> Path:
    return write_auth_file(folder / "auth.toml", pki.tokens.values(), IDENTITIES)


@pytest.fixture(scope="session")
def tls_server(
    model_repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureServer]:
    folder = tmp_path_factory.mktemp("tls-server")
    health_port = free_port()
    flags = (
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--auth-file", str(_auth_file(pki, folder)), "--reflection", "auth",
        "--health-port", str(health_port), "--metrics-tls", "true",
        "--feedback-store", f"sqlite://{folder / 'feedback.db'}", "--model-control", "explicit",
    )  # fmt: skip
    with launched(model_repo, folder, *flags) as process:
        yield SecureServer(process, pki, health_port, metrics_tls=True)


@pytest.fixture(scope="session")
def mtls_server(
    model_repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureServer]:
    folder = tmp_path_factory.mktemp("mtls-server")
    flags = (
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca_path), "--auth-file", str(_auth_file(pki, folder)),
        "--reflection", "on", "--feedback-store", f"sqlite://{folder / 'feedback.db'}",
        "--metrics-tls", "true",
    )  # fmt: skip
    with launched(model_repo, folder, *flags) as process:
        yield SecureServer(process, pki, metrics_tls=True)


@pytest.fixture(scope="session")
def plain_server(
    model_repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureServer]:
    folder = tmp_path_factory.mktemp("plain-server")
    flags = ("--auth-file", str(_auth_file(pki, folder)), "--reflection", "off")
    with launched(model_repo, folder, *flags) as process:
        yield SecureServer(process, pki)
