"""The Python clients (sync and asyncio) against a real server with TLS and bearer tokens.

Two servers, certificates and tokens made at run time (`tls_material`): one with TLS and a
credentials file, one that also requires a client certificate (mTLS). The clients must work with
the right CA and token; fail UNAVAILABLE when the server's certificate is not from the CA they
trust (and for plaintext to a TLS port); surface UNAUTHENTICATED and PERMISSION_DENIED as
`RecommenderError`; refuse to send a token in plaintext off loopback; and never show the token
in a repr or str of a client or of an error. `bertrec loadtest` and `bertrec models` take the
same through --tls-ca/--tls-cert/--tls-key and --token-file or $BERTREC_TOKEN.
"""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from server_harness import MODEL, ServerProcess, start_server
from tls_material import CertificateAuthority, TokenEntry, token_entries, write_auth_file

from bertrec.cli import main
from bertrec.client import AsyncRecommenderClient, RecommenderClient, RecommenderError
from bertrec.client.security import BearerToken, read_token_file

READY_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Secured:
    """A running TLS server and what a client needs to reach it."""

    server: ServerProcess
    ca: Path
    tokens: dict[str, TokenEntry]
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def target(self) -> str:
        return self.server.target

    def token(self, name: str) -> str:
        return self.tokens[name].token


@contextmanager
def _serve_tls(
    model_repo: Path, folder: Path, mtls: bool
) -> Iterator[tuple[ServerProcess, Path, dict[str, TokenEntry], CertificateAuthority]]:
    ca = CertificateAuthority()
    ca_path = ca.write(folder)
    cert, key = ca.server().write(folder, "server")
    tokens = token_entries({"reader": ["read"], "admin": ["read", "feedback", "admin"]})
    auth = write_auth_file(folder / "auth.toml", tokens.values())
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth)]
    if mtls:
        flags += ["--tls-client-ca", str(ca_path)]
    server = start_server(model_repo, folder / "logs", *flags)
    try:
        yield server, ca_path, tokens, ca
    finally:
        server.terminate()


def _wait_serving(secured: Secured) -> None:
    """Health is open (probes carry no token), so the CA alone is enough to wait."""
    with RecommenderClient(
        secured.target, tls=secured.ca, client_cert=secured.client_cert,
        client_key=secured.client_key,
    ) as client:  # fmt: skip
        client.wait_until_serving(READY_TIMEOUT_S)


@pytest.fixture(scope="module")
def tls_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("tls")
    with _serve_tls(model_repo, folder, mtls=False) as (server, ca_path, tokens, _):
        secured = Secured(server, ca_path, tokens)
        _wait_serving(secured)
        yield secured


@pytest.fixture(scope="module")
def mtls_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("mtls")
    with _serve_tls(model_repo, folder, mtls=True) as (server, ca_path, tokens, ca):
        cert, key = ca.client("bertrec-test-client").write(folder, "client")
        secured = Secured(server, ca_path, tokens, cert, key)
        _wait_serving(secured)
        yield secured


# --- it works --------------------------------------------------------------------------------


def test_sync_client_with_ca_and_token(tls_server: Secured) -> None:
    with RecommenderClient(
        tls_server.target, tls=tls_server.ca, token=tls_server.token("reader")
    ) as client:
        assert client.health() == "SERVING"
        got = client.recommend_for_text("a gentle story about friendship", k=5)
        assert len(got.item_ids) == 5
        assert client.model_info().max_k > 0


def test_async_client_with_ca_bytes_and_token(tls_server: Secured) -> None:
    async def calls() -> tuple[int, int]:
        async with AsyncRecommenderClient(
            tls_server.target, tls=tls_server.ca.read_bytes(), token=tls_server.token("reader")
        ) as client:
            got = await client.recommend_for_text("a gentle story about friendship", k=4)
            embedded = await client.embed_text(["one", "two"])
            return len(got.item_ids), embedded.vectors.shape[0]

    assert asyncio.run(calls()) == (4, 2)


def test_server_name_overrides_the_checked_host(tls_server: Secured) -> None:
    """The certificate names localhost and 127.0.0.1; `server_name` picks which is checked,
    so a name the certificate lacks fails the handshake and one it has succeeds."""
    token = tls_server.token("reader")
    with RecommenderClient(
        tls_server.target, tls=tls_server.ca, token=token, server_name="localhost"
    ) as client:
        assert client.model_info().max_k > 0
    with (
        RecommenderClient(
            tls_server.target, tls=tls_server.ca, token=token, server_name="elsewhere.example"
        ) as client,
        pytest.raises(RecommenderError) as failed,
    ):
        client.model_info(timeout_s=5.0)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_certificate(mtls_server: Secured) -> None:
    token = mtls_server.token("reader")
    with RecommenderClient(
        mtls_server.target, tls=mtls_server.ca, client_cert=mtls_server.client_cert,
        client_key=mtls_server.client_key, token=token,
    ) as client:  # fmt: skip
        assert len(client.recommend_for_text("music", k=3).item_ids) == 3
    with (
        RecommenderClient(mtls_server.target, tls=mtls_server.ca, token=token) as bare,
        pytest.raises(RecommenderError) as refused,
    ):
        bare.model_info(timeout_s=5.0)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


# --- it fails the right way -------------------------------------------------------------------


def test_wrong_ca_is_unavailable_sync_and_async(tls_server: Secured, tmp_path: Path) -> None:
    stranger = CertificateAuthority("someone else's CA").write(tmp_path)
    token = tls_server.token("reader")
    with (
        RecommenderClient(tls_server.target, tls=stranger, token=token) as client,
        pytest.raises(RecommenderError) as sync_error,
    ):
        client.model_info(timeout_s=5.0)
    assert sync_error.value.code == grpc.StatusCode.UNAVAILABLE

    async def call() -> RecommenderError:
        async with AsyncRecommenderClient(tls_server.target, tls=stranger, token=token) as c:
            with pytest.raises(RecommenderError) as aio_error:
                await c.model_info(timeout_s=5.0)
            return aio_error.value

    assert asyncio.run(call()).code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_to_tls_server_is_unavailable(tls_server: Secured) -> None:
    with (
        RecommenderClient(tls_server.target, token=tls_server.token("reader")) as client,
        pytest.raises(RecommenderError) as refused,
    ):
        client.model_info(timeout_s=5.0)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_no_token_is_unauthenticated_sync_and_async(tls_server: Secured) -> None:
    with RecommenderClient(tls_server.target, tls=tls_server.ca) as client:
        assert client.health() == "SERVING"  # health stays open
        with pytest.raises(RecommenderError) as sync_error:
            client.recommend_for_text("a story", k=3)
    assert sync_error.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def call() -> RecommenderError:
        async with AsyncRecommenderClient(tls_server.target, tls=tls_server.ca) as c:
            with pytest.raises(RecommenderError) as aio_error:
                await c.recommend_for_text("a story", k=3)
            return aio_error.value

    assert asyncio.run(call()).code == grpc.StatusCode.UNAUTHENTICATED


def test_read_token_on_forget_user_is_permission_denied(tls_server: Secured) -> None:
    with (
        RecommenderClient(
            tls_server.target, tls=tls_server.ca, token=tls_server.token("reader")
        ) as client,
        pytest.raises(RecommenderError) as denied,
    ):
        client.forget_user("u0001")
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_token_over_plaintext_off_loopback_is_refused() -> None:
    token = "s3cret-token-value-123"
    for make in (RecommenderClient, AsyncRecommenderClient):
        with pytest.raises(ValueError, match="plaintext") as refused:
            make("10.20.30.40:50051", token=token)  # refused before any channel opens
        assert token not in str(refused.value)
    # Loopback is allowed (a sidecar or a local test), as is TLS to any host.
    RecommenderClient("127.0.0.1:1", token=token).close()
    RecommenderClient("[::1]:1", token=token).close()
    RecommenderClient("localhost:1", token=token).close()


def test_inconsistent_security_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        RecommenderClient("127.0.0.1:1", tls=True, client_cert=b"-----BEGIN x")
    with pytest.raises(ValueError, match="needs tls"):
        RecommenderClient("127.0.0.1:1", client_cert=b"-----BEGIN", client_key=b"-----BEGIN")
    with pytest.raises(ValueError, match="needs tls"):
        RecommenderClient("127.0.0.1:1", server_name="localhost")
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match="not PEM"):
        RecommenderClient("127.0.0.1:1", tls=der)
    with pytest.raises(ValueError, match="printable ASCII") as bad:
        RecommenderClient("127.0.0.1:1", token="tok-with-newline\n")
    assert "tok-with-newline" not in str(bad.value)


# --- the token never shows -----------------------------------------------------------------


def _everything_printed(error: BaseException) -> str:
    """What a log line or a crash would show of an error: str, repr and the whole traceback
    (chained causes included)."""
    shown = traceback.format_exception(error)
    return "\n".join([str(error), repr(error), *shown])


def test_token_never_in_repr_or_errors(tls_server: Secured) -> None:
    good = tls_server.token("reader")
    wrong = "not-a-valid-token-" + good[:8]  # shares a prefix, as a typo might
    for token in (good, wrong):
        client = RecommenderClient(tls_server.target, tls=tls_server.ca, token=token)
        try:
            assert "<hidden>" in repr(client)
            assert token not in repr(client) and token not in str(client)
            with pytest.raises(RecommenderError) as failed:
                if token == good:
                    client.forget_user("u0001")  # PERMISSION_DENIED
                else:
                    client.recommend_for_text("a story", k=3)  # UNAUTHENTICATED
            assert failed.value.code in (
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
            )  # fmt: skip
            printed = _everything_printed(failed.value)
            assert token not in printed
            assert token[8:] not in printed  # not even in part
        finally:
            client.close()

    async def aio_repr_and_error() -> tuple[str, str]:
        async with AsyncRecommenderClient(tls_server.target, tls=True, token=wrong) as c:
            shown = repr(c) + str(c)
            with pytest.raises(RecommenderError) as failed:
                await c.model_info(timeout_s=5.0)  # system roots: the test CA is not one
            return shown, _everything_printed(failed.value)

    shown, printed = asyncio.run(aio_repr_and_error())
    assert "tls=True" in shown and wrong not in shown and wrong not in printed
    # Nor does the server log either token (it counts the failures by reason).
    logged = tls_server.server.stderr()
    assert good not in logged and wrong not in logged


def test_bearer_token_hides_itself(tmp_path: Path) -> None:
    token = "abc-secret-0123456789"
    held = BearerToken(token)
    assert token not in repr(held) and token not in str(held) and token not in f"{held}"
    assert held.metadata == (("authorization", f"Bearer {token}"),)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(held)
    path = tmp_path / "token"
    path.write_text(token + "\n")
    assert read_token_file(path) == token
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(tmp_path / "empty")


# --- the client-side commands ----------------------------------------------------------------


def _token_file(folder: Path, token: str) -> Path:
    path = folder / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_loadtest_over_tls_with_a_token_file(
    tls_server: Secured, model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tls_server.token("reader")
    out = tmp_path / "report.json"
    code = main([
        "loadtest", "--target", tls_server.target, "--tls-ca", str(tls_server.ca),
        "--token-file", str(_token_file(tmp_path, token)),
        "--model-repo", str(model_repo), "--model", MODEL, "--mix", "recommend=3,similar_items=1",
        "--concurrency", "2", "--duration-s", "1", "--warmup-s", "0", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    (step,) = json.loads(out.read_text())["steps"]
    assert step["summary"]["requests"] > 0
    assert step["summary"]["ok"] == step["summary"]["requests"]
    assert token not in printed.out + printed.err + out.read_text()


def test_loadtest_without_a_token_names_unauthenticated(
    tls_server: Secured, model_repo: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("BERTREC_TOKEN", raising=False)
    code = main([
        "loadtest", "--target", tls_server.target, "--tls-ca", str(tls_server.ca),
        "--model-repo", str(model_repo), "--model", MODEL, "--concurrency", "1",
        "--duration-s", "1", "--warmup-s", "0", "--quiet",
    ])  # fmt: skip
    assert code == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_models_cli_takes_the_token_from_the_environment(
    tls_server: Secured, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    reader = tls_server.token("reader")
    tls = ["--target", tls_server.target, "--tls-ca", str(tls_server.ca)]
    monkeypatch.setenv("BERTREC_TOKEN", reader)
    assert main(["models", "list", *tls]) == 0
    listed = capsys.readouterr()
    assert MODEL in listed.out and "READY" in listed.out
    # A read token may list but not load (admin), and the error is one line without the token.
    code = main(["models", "load", "--version", "1", *tls,
                 "--token-file", str(_token_file(tmp_path, reader))])  # fmt: skip
    refused = capsys.readouterr()
    assert code == 2
    assert "PERMISSION_DENIED" in refused.err and reader not in refused.err + refused.out
    monkeypatch.delenv("BERTREC_TOKEN")
    assert main(["models", "list", *tls]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_cli_security_flags_fail_in_one_line(
    tls_server: Secured, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", tls_server.target]
    cases = [
        (["--tls-cert", str(tls_server.ca)], "together"),
        (["--tls-ca", str(tmp_path / "missing.crt")], "missing.crt"),
        (["--token-file", str(tmp_path / "none")], "none"),
        (["--server-name", "localhost"], "needs --tls"),
    ]
    for flags, words in cases:
        assert main(["models", "list", *target, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    # A token for another host, in plaintext: refused before anything is sent.
    token = _token_file(tmp_path, "plain-secret-token")
    assert main(["models", "list", "--target", "10.20.30.40:1", "--token-file", str(token)]) == 2
    err = capsys.readouterr().err
    assert "plaintext" in err and "plain-secret-token" not in err
