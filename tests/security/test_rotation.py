"""Certificates and tokens rotated while a load runs, on the real server, with no failed call.

Two client threads call Recommend continuously over TLS with a token, opening a new channel
(with a subchannel of its own, so a new TCP connection and TLS handshake) every few calls.
Meanwhile the test
(a) replaces the server certificate and key with a new pair from the same CA, the way a
    Kubernetes Secret volume does: both files live in a folder reached through a `..data`
    symlink, and one rename swaps the link, so no reader ever sees a new certificate with the
    old key;
(b) rotates tokens in the auth file (written to a temporary file and renamed): the new token
    is added, the clients switch to it, the old one is removed.
Clients holding valid credentials must see 0 failed calls; new connections must present the
new certificate (its serial, read with `ssl`, and a gRPC channel that only accepts a name the
new certificate carries); the removed token must be refused afterwards.

A second test replaces the two files one at a time (certificate first, as two renames do): in
between, the server holds a certificate whose key it does not have, and must keep presenting the
previous pair rather than fail handshakes (gRPC and /metrics over HTTPS alike).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from tls_material import (
    CertificateAuthority,
    Issued,
    TokenEntry,
    bearer,
    new_token,
    presented_serial,
    write_atomic,
    write_auth_file,
)

from bertrec.v1 import recommender_pb2 as pb
from security.conftest import Pki, SecureServer, launched

RECOMMEND = "/bertrec.v1.RecommenderService/Recommend"
CALLS_PER_CHANNEL = 8
WAIT_S = 60.0  # the most any phase may take before the test fails (not a timing assertion)
ROTATED_NAME = "rotated.localhost"  # only the new certificate carries this name
OK = grpc.StatusCode.OK


@dataclass
class Client:
    """One load thread: its calls, its failures and its handshakes."""

    name: str
    ok_by_token: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    channels_opened: int = 0
    ok_on_channel_opened_after: dict[int, int] = field(default_factory=dict)  # epoch -> calls


class Load:
    """The clients, the token they use, and the rotation epoch (bumped at each cert swap)."""

    def __init__(self, port: int, ca_pem: bytes, token: TokenEntry, clients: int = 2) -> None:
        self.port = port
        self.credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self.token = token
        self.epoch = 0
        self.stop = threading.Event()
        self.clients = [Client(f"client-{i}") for i in range(clients)]
        self._threads = [
            threading.Thread(target=self._run, args=(c,), name=c.name, daemon=True)
            for c in self.clients
        ]
        self._request = pb.RecommendRequest(user_id="u0001", k=5).SerializeToString()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), thread.name

    def _run(self, client: Client) -> None:
        calls = 0
        channel: grpc.Channel | None = None
        opened_in = 0
        while not self.stop.is_set():
            if calls % CALLS_PER_CHANNEL == 0:
                if channel is not None:
                    channel.close()
                # A local subchannel pool: a new connection and handshake, never a shared one.
                options = [("grpc.use_local_subchannel_pool", 1)]
                channel = grpc.secure_channel(f"127.0.0.1:{self.port}", self.credentials, options)
                opened_in = self.epoch
                client.channels_opened += 1
            calls += 1
            token = self.token  # read once: the call and the bookkeeping use the same one
            rpc = channel.unary_unary(RECOMMEND)
            try:
                rpc(self._request, timeout=10, metadata=bearer(token.token))
            except grpc.RpcError as exc:
                client.failures.append(f"{token.name}: {exc.code().name} {exc.details()}")
                continue
            client.ok_by_token[token.name] = client.ok_by_token.get(token.name, 0) + 1
            client.ok_on_channel_opened_after[opened_in] = (
                client.ok_on_channel_opened_after.get(opened_in, 0) + 1
            )
        if channel is not None:
            channel.close()

    def wait_until(self, what: str, condition: object) -> None:
        """Wait until `condition()` holds for every client (or any failure shows up)."""
        assert callable(condition)
        deadline = time.monotonic() + WAIT_S
        while not all(condition(c) for c in self.clients):
            failures = [f for c in self.clients for f in c.failures]
            assert not failures, failures[:5]
            assert time.monotonic() < deadline, f"clients never {what}: {self.clients}"
            time.sleep(0.02)


def _call(port: int, ca_pem: bytes, token: str, name: str | None = None) -> grpc.StatusCode:
    """One Recommend on a fresh connection; `name`: the server name to verify instead."""
    options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1)]
    if name is not None:
        options.append(("grpc.ssl_target_name_override", name))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        try:
            channel.unary_unary(RECOMMEND)(
                pb.RecommendRequest(user_id="u0001", k=5).SerializeToString(),
                timeout=10,
                metadata=bearer(token),
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _wait_for(what: str, condition: object) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


class SecretVolume:
    """A folder laid out like a mounted Kubernetes Secret: tls.crt and tls.key are links through
    `..data`, which points at the current version's folder; `publish` swaps it in one rename."""

    def __init__(self, folder: Path, first: Issued) -> None:
        self.folder = folder
        self.version = 0
        folder.mkdir(parents=True)
        self.publish(first)
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", folder / name)
        self.cert, self.key = folder / "tls.crt", folder / "tls.key"

    def publish(self, issued: Issued) -> None:
        self.version += 1
        target = self.folder / f"..v{self.version}"
        target.mkdir()
        write_atomic(target / "tls.crt", issued.cert_pem)
        write_atomic(target / "tls.key", issued.key_pem, mode=0o600)
        staging = self.folder / "..data_tmp"
        os.symlink(target.name, staging)
        os.replace(staging, self.folder / "..data")


@pytest.fixture
def rotating(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> Iterator[tuple[SecureServer, Path, SecretVolume]]:
    """A TLS + token server whose certificate folder and auth file this test may rewrite."""
    volume = SecretVolume(tmp_path / "tls", pki.server)
    auth = write_auth_file(tmp_path / "auth.toml", [pki.tokens["reader"]])
    flags = ("--tls-cert", str(volume.cert), "--tls-key", str(volume.key),
             "--auth-file", str(auth), "--metrics-tls", "true")  # fmt: skip
    with launched(model_repo, tmp_path, *flags) as process:
        yield SecureServer(process, pki, metrics_tls=True), auth, volume


def test_rotation_under_load(rotating: tuple[SecureServer, Path, SecretVolume], pki: Pki) -> None:
    server, auth, volume = rotating
    ca_pem, port = pki.ca.cert_pem, server.port
    old_token = pki.tokens["reader"]
    new = TokenEntry("reader-next", new_token(), ("read",))
    assert presented_serial(port, ca_pem) == pki.server.serial
    assert _call(port, ca_pem, old_token.token, ROTATED_NAME) == grpc.StatusCode.UNAVAILABLE

    load = Load(port, ca_pem, old_token)
    load.start()
    try:
        load.wait_until("got going", lambda c: c.channels_opened >= 3)

        # (a) the certificate: a new pair from the same CA, swapped in with one rename.
        rotated = pki.ca.server(("localhost", "127.0.0.1", ROTATED_NAME))
        volume.publish(rotated)
        load.epoch = 1
        assert presented_serial(port, ca_pem) == rotated.serial  # the very next handshake
        assert presented_serial(server.process.metrics_port, ca_pem) == rotated.serial
        assert _call(port, ca_pem, old_token.token, ROTATED_NAME) == grpc.StatusCode.OK
        load.wait_until(
            "called on connections made after the swap",
            lambda c: c.ok_on_channel_opened_after.get(1, 0) >= 3 * CALLS_PER_CHANNEL,
        )

        # (b) the tokens: add the new one, move the clients over, remove the old one.
        write_auth_file(auth, [old_token, new])
        _wait_for("accepted the new token", lambda: _call(port, ca_pem, new.token) == OK)
        load.token = new
        load.wait_until("used the new token", lambda c: c.ok_by_token.get(new.name, 0) >= 20)
        write_auth_file(auth, [new])
        _wait_for(
            "refused the removed token",
            lambda: _call(port, ca_pem, old_token.token) == grpc.StatusCode.UNAUTHENTICATED,
        )
        done = {c.name: c.ok_by_token[new.name] for c in load.clients}
        load.wait_until("kept going", lambda c: c.ok_by_token[new.name] >= done[c.name] + 20)
    finally:
        load.join()

    failures = [f for c in load.clients for f in c.failures]
    assert failures == [], failures[:10]
    assert all(c.ok_by_token.get(old_token.name, 0) > 0 for c in load.clients)
    for _ in range(3):  # refused for good, on new connections too
        assert _call(port, ca_pem, old_token.token) == grpc.StatusCode.UNAUTHENTICATED
    assert presented_serial(port, ca_pem) == rotated.serial
    print(
        "rotation under load:",
        {c.name: (c.ok_by_token, c.channels_opened) for c in load.clients},
    )


def test_a_certificate_without_its_key_keeps_the_last_good_pair(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.server.write(tmp_path / "tls", "server")
    auth = write_auth_file(tmp_path / "auth.toml", [pki.tokens["reader"]])
    flags = ("--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth),
             "--metrics-tls", "true")  # fmt: skip
    with launched(model_repo, tmp_path, *flags) as process:
        ca_pem, token = pki.ca.cert_pem, pki.token("reader")
        ports = (process.port, process.metrics_port)
        rotated = pki.ca.server()
        write_atomic(cert, rotated.cert_pem)  # the first of two renames
        assert _call(process.port, ca_pem, token) == OK
        for port in ports:  # the old pair, on gRPC and on /metrics
            assert presented_serial(port, ca_pem) == pki.server.serial
        write_atomic(key, rotated.key_pem)  # the second
        assert _call(process.port, ca_pem, token) == OK
        for port in ports:
            assert presented_serial(port, ca_pem) == rotated.serial


def test_a_certificate_of_another_ca_is_served_as_configured(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> None:
    """The server does not judge what it is given: clients that trust only the old CA are
    refused after a swap to another CA's certificate, and trusted again after a swap back.
    (The check that catches a rotation gone wrong lives in the clients, as it should.)"""
    cert, key = pki.server.write(tmp_path / "tls", "server")
    auth = write_auth_file(tmp_path / "auth.toml", [pki.tokens["reader"]])
    flags = ("--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth))
    with launched(model_repo, tmp_path, *flags) as process:
        ca_pem, token = pki.ca.cert_pem, pki.token("reader")
        other = CertificateAuthority("other CA")
        foreign = other.server()
        _swap(cert, key, foreign)
        assert _call(process.port, ca_pem, token) == grpc.StatusCode.UNAVAILABLE
        assert _call(process.port, other.cert_pem, token) == OK
        _swap(cert, key, pki.server)
        assert _call(process.port, ca_pem, token) == OK


def _swap(cert: Path, key: Path, issued: Issued) -> None:
    """Both files replaced between two handshakes (no call runs during the swap)."""
    write_atomic(key, issued.key_pem, mode=0o600)
    write_atomic(cert, issued.cert_pem)
