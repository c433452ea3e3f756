"""TLS and bearer tokens for the bertrec clients: how a channel is secured, how a call is
authorised, and how neither leaks.

A server started with `--tls-cert/--tls-key` speaks only TLS; with `--tls-client-ca` it also
wants a client certificate (mTLS); with `--auth-file` every call but health needs
`authorization: Bearer <token>`. The clients take the same three things:

- `tls`: True trusts the system's root certificates; a path or PEM bytes trusts that CA only
  (a private CA, as most deployments have). `server_name` checks the certificate against
  another name than the target's host (an IP target, a tunnel, a test certificate).
- `client_cert` + `client_key`: the client's certificate for mTLS (paths or PEM bytes).
- `token`: sent on every call as metadata. The clients refuse to send it in plaintext to a
  host other than loopback, where anyone on the path could read and replay it; behind a mesh
  that encrypts for you, pass a `channel=` of your own and the token still goes with each call.

The token is kept in a `BearerToken`, whose repr is fixed, so it shows in no repr, log line or
traceback of a client; the server's answers never echo it either.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

# A CA or a certificate/key: a PEM file's path, or its bytes.
PemSource = str | os.PathLike[str] | bytes
AUTHORIZATION = "authorization"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


class BearerToken:
    """A token held for the `authorization` metadata; its repr and str never show it."""

    __slots__ = ("_metadata",)

    def __init__(self, token: str) -> None:
        # A header value must be printable ASCII; a token read from a file with its newline
        # would otherwise fail inside gRPC with a message that quotes it.
        if not token or not token.isascii() or not token.isprintable() or token != token.strip():
            raise ValueError(
                "token must be non-empty printable ASCII without surrounding whitespace"
            )
        self._metadata = ((AUTHORIZATION, f"Bearer {token}"),)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token."""
        return self._metadata

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a BearerToken is not pickled (it would write the token out)")


def as_token(token: str | BearerToken | None) -> BearerToken | None:
    """A client's `token=` argument, held (a BearerToken passes through)."""
    return token if token is None or isinstance(token, BearerToken) else BearerToken(token)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in a file, without surrounding whitespace (a trailing newline is usual).

    Raises:
        ValueError: the file is empty; OSError: it cannot be read.
    """
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: a token is ASCII text") from None
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


def pem(source: PemSource, what: str) -> bytes:
    """PEM bytes from a path or from bytes already read.

    Raises:
        ValueError: the content is not PEM (e.g. a DER file, or the wrong path).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if b"-----BEGIN" not in data:
        where = "the bytes given" if isinstance(source, bytes) else os.fspath(source)
        raise ValueError(f"{what}: {where} is not PEM (no -----BEGIN line)")
    return data


def channel_credentials(
    tls: bool | PemSource | None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """gRPC TLS credentials, or None for plaintext.

    Args:
        tls: None/False for plaintext, True for the system's roots, or the CA (path or PEM).
        client_cert, client_key: the client's certificate and key (mTLS), both or neither.

    Raises:
        ValueError: a client certificate without TLS, one of the pair alone, or a non-PEM file.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mTLS needs both)")
    if tls is None or tls is False:
        if client_cert is not None:
            raise ValueError("a client certificate needs tls= (True or the server's CA)")
        return None
    roots = None if tls is True else pem(tls, "tls (CA)")
    chain = None if client_cert is None else pem(client_cert, "client_cert")
    key = None if client_key is None else pem(client_key, "client_key")
    return grpc.ssl_channel_credentials(roots, key, chain)


def tls_options(server_name: str | None) -> list[tuple[str, Any]]:
    """Channel options checking the server's certificate for `server_name` (and sending it
    as the authority), or none."""
    if not server_name:
        return []
    return [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine ("127.0.0.1:50051", "[::1]:1", "unix:...")."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(target: str, token: BearerToken | None, secure: bool) -> None:
    """Refuse a token that would cross the network in plaintext.

    Raises:
        ValueError: a token, no TLS and a target that is not loopback.
    """
    if token is not None and not secure and not is_loopback(target):
        raise ValueError(
            f"token= over plaintext to {target} would let anyone on the path read it: pass "
            "tls= (True or the server's CA), or a channel= of your own (e.g. behind a mesh)"
        )


def channel_arguments(
    target: str,
    retry_options: Sequence[tuple[str, Any]],
    tls: bool | PemSource | None,
    client_cert: PemSource | None,
    client_key: PemSource | None,
    token: BearerToken | None,
    server_name: str | None,
    extra: Sequence[tuple[str, Any]],
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """What a client opens its channel with: TLS credentials (None: plaintext) and options
    (retries, the TLS name override, then the caller's own, which win).

    Raises:
        ValueError: inconsistent arguments, or a token that would travel in plaintext.
    """
    credentials = channel_credentials(tls, client_cert, client_key)
    if server_name and credentials is None:
        raise ValueError("server_name checks a server certificate: it needs tls=")
    check_token_transport(target, token, credentials is not None)
    return credentials, [*retry_options, *tls_options(server_name), *extra]


def describe(target: str, tls: object, client_cert: object, token: BearerToken | None) -> str:
    """The arguments a client's repr shows: where it goes and how, never the token."""
    parts = [repr(target)]
    if tls not in (None, False):
        parts.append("tls=True" if tls is True else "tls=<CA>")
    if client_cert is not None:
        parts.append("client_cert=<set>")
    if token is not None:
        parts.append("token=<hidden>")
    return ", ".join(parts)
