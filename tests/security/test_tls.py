"""The transport on the real server: TLS, mTLS with identities as credentials, the plaintext
health-only port, /metrics over HTTPS, and the start refused for unusable TLS or auth files."""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from adversarial.rpcs import VALID, path
from grpc_health.v1 import health_pb2
from server_harness import MODEL
from tls_material import CertificateAuthority, new_token, server_certificate

from bertrec.v1 import recommender_pb2 as pb
from security.conftest import Pki, SecureServer, call, tls_channel

Code = grpc.StatusCode
RECOMMEND = path("rec", "Recommend")
FEEDBACK = path("rec", "RecordFeedback")
CHECK = path("health", "Check")


def _feedback() -> pb.RecordFeedbackRequest:
    event = pb.FeedbackEvent(user_id="u0005", item_id="item-00009", kind=pb.FEEDBACK_KIND_CLICK,
                             idempotency_key=f"mtls-{new_token()[:16]}")  # fmt: skip
    return pb.RecordFeedbackRequest(events=[event])


def _health(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    return call(channel, CHECK, health_pb2.HealthCheckRequest())


def test_the_server_presents_its_certificate(tls_server: SecureServer, pki: Pki) -> None:
    cert = server_certificate(tls_server.port, pki.ca.cert_pem)
    assert cert.serial_number == pki.server.serial


def test_plaintext_client_is_refused(tls_server: SecureServer, pki: Pki) -> None:
    with grpc.insecure_channel(tls_server.target) as ch:
        code, _ = call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))
        assert code == Code.UNAVAILABLE
        assert _health(ch)[0] == Code.UNAVAILABLE
    with tls_channel(tls_server.port, pki) as ch:  # the same call over TLS is answered
        assert call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))[0] == Code.OK


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: SecureServer) -> None:
    other = CertificateAuthority("another CA")
    credentials = grpc.ssl_channel_credentials(root_certificates=other.cert_pem)
    with grpc.secure_channel(tls_server.target, credentials) as ch:
        assert _health(ch)[0] == Code.UNAVAILABLE


def test_health_port_serves_health_alone_in_plaintext(tls_server: SecureServer, pki: Pki) -> None:
    assert tls_server.health_port is not None
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        assert _health(ch) == (Code.OK, "")
        code, _ = call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))
        assert code == Code.UNIMPLEMENTED  # health only: no other service, no token helps
    with tls_channel(tls_server.health_port, pki) as ch:
        assert _health(ch)[0] == Code.UNAVAILABLE  # plaintext, as probes need


def test_metrics_over_https_only(tls_server: SecureServer, pki: Pki) -> None:
    assert "bertrec_auth_failures_total" in tls_server.metrics_text()
    with pytest.raises((OSError, http.client.HTTPException)):
        url = f"http://127.0.0.1:{tls_server.process.metrics_port}/metrics"
        urllib.request.urlopen(url, timeout=10).read()
    untrusting = ssl.create_default_context(cadata=CertificateAuthority().cert_pem.decode())
    with pytest.raises(OSError):  # ssl.SSLCertVerificationError via URLError
        url = f"https://127.0.0.1:{tls_server.process.metrics_port}/metrics"
        urllib.request.urlopen(url, timeout=10, context=untrusting).read()


def test_mtls_metrics_need_a_client_certificate_too(mtls_server: SecureServer, pki: Pki) -> None:
    url = f"https://127.0.0.1:{mtls_server.process.metrics_port}/metrics"
    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(url, timeout=10, context=context).read()
    cert, key = pki.clients["stranger"].write(pki.folder, "metrics-client")
    context.load_cert_chain(cert, key)
    with urllib.request.urlopen(url, timeout=10, context=context) as reply:
        assert b"bertrec_auth_failures_total" in reply.read()


def test_mtls_without_a_client_certificate_is_refused(mtls_server: SecureServer, pki: Pki) -> None:
    with tls_channel(mtls_server.port, pki) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))[0] == (
            Code.UNAVAILABLE
        )
        assert _health(ch)[0] == Code.UNAVAILABLE  # no handshake, no probe either


def test_mtls_with_a_certificate_of_another_ca_is_refused(
    mtls_server: SecureServer, pki: Pki
) -> None:
    """Same CN and SAN as the reader identity: only the signature differs."""
    with tls_channel(mtls_server.port, pki, pki.clients["rogue"]) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))[0] == (
            Code.UNAVAILABLE
        )


def test_mtls_identity_by_san_has_its_roles_without_a_token(
    mtls_server: SecureServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.port, pki, pki.clients["reader"]) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND]) == (Code.OK, "")
        code, details = call(ch, FEEDBACK, _feedback())
        assert code == Code.PERMISSION_DENIED and "'reader-service'" in details


def test_mtls_identity_by_cn_has_its_roles_without_a_token(
    mtls_server: SecureServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.port, pki, pki.clients["collector"]) as ch:
        assert call(ch, FEEDBACK, _feedback()) == (Code.OK, "")
        code, details = call(ch, RECOMMEND, VALID[RECOMMEND])
        assert code == Code.PERMISSION_DENIED and "'feedback-collector'" in details


def test_mtls_certificate_without_an_identity_needs_a_token(
    mtls_server: SecureServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.port, pki, pki.clients["stranger"]) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND])[0] == Code.UNAUTHENTICATED
        assert call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader")) == (Code.OK, "")
        assert _health(ch) == (Code.OK, "")


def test_a_token_sent_over_mtls_decides_instead_of_the_identity(
    mtls_server: SecureServer, pki: Pki
) -> None:
    """The collector's certificate with the reader's token reads; an invalid token is refused
    even from a certificate whose identity could read (no silent fallback)."""
    with tls_channel(mtls_server.port, pki, pki.clients["collector"]) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND], token=pki.token("reader"))[0] == Code.OK
    with tls_channel(mtls_server.port, pki, pki.clients["reader"]) as ch:
        code, _ = call(ch, RECOMMEND, VALID[RECOMMEND], token=new_token())
        assert code == Code.UNAUTHENTICATED


def test_mtls_identity_by_spiffe_uri_san(mtls_server: SecureServer, pki: Pki) -> None:
    """A mesh workload's certificate (URI SAN) maps to roles like a DNS SAN does."""
    with tls_channel(mtls_server.port, pki, pki.clients["mesh"]) as ch:
        assert call(ch, RECOMMEND, VALID[RECOMMEND]) == (Code.OK, "")
        code, details = call(ch, FEEDBACK, _feedback())
        assert code == Code.PERMISSION_DENIED and "'mesh-frontend'" in details


def _serve_fails(model_repo: Path, *flags: str) -> str:
    """Run `bertrec serve` with `flags`, expecting it to refuse to start: its stderr."""
    command = [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
               "--model", MODEL, "--grpc-port", "0", "--metrics-port", "0", *flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr


def test_a_malformed_auth_file_stops_the_start(model_repo: Path, tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text('[[token]]\nname = "x"\nsha256 = "abc"\nroles = ["read"]\n')
    stderr = _serve_fails(model_repo, "--auth-file", str(auth))
    assert f"{auth}: token[0]: sha256 must be 64 hex digits" in stderr


def test_a_certificate_that_is_not_pem_stops_the_start(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("not a certificate\n")
    stderr = _serve_fails(model_repo, "--tls-cert", str(cert), "--tls-key", str(pki.server_key))
    assert f"cannot use the TLS files {cert}" in stderr


def test_a_key_of_another_certificate_stops_the_start_naming_the_files(
    model_repo: Path, pki: Pki, tmp_path: Path
) -> None:
    _, other_key = pki.ca.server().write(tmp_path, "other")
    stderr = _serve_fails(model_repo, "--tls-cert", str(pki.server_cert), "--tls-key",
                          str(other_key))  # fmt: skip
    last = stderr.strip().splitlines()[-1]
    assert "cannot bind" not in last, last
    assert str(pki.server_cert) in last and str(other_key) in last, last
