"""The security flags every client-side `bertrec` command shares (`models`, `loadtest`).

    --tls                      TLS, trusting the system's root certificates
    --tls-ca FILE              TLS, trusting this CA (PEM); implies --tls
    --tls-cert FILE --tls-key FILE
                               this client's certificate and key (a server with --tls-client-ca)
    --server-name NAME         the name the server certificate must carry, if not the target's
    --token-file FILE          the bearer token (default: the BERTREC_TOKEN environment variable)

A token is never a flag: a command line is visible to every user of the machine (`ps`,
/proc/PID/cmdline) and lands in shell history. Files are read once, when the command starts,
and a problem is a one-line error (exit code 2) that names the file, never the token.
grpc is not imported here, so registering the flags costs a `bertrec` command nothing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertrec.errors import BertrecError

if TYPE_CHECKING:
    import grpc

    from bertrec.client.security import BearerToken

TOKEN_ENV = "BERTREC_TOKEN"


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """How a command reaches the server: TLS material as PEM bytes and the token, all read."""

    tls: bool | bytes = False  # True: system roots; bytes: this CA
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: BearerToken | None = None
    server_name: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls is not False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata carrying the token, or None."""
        return None if self.token is None else self.token.metadata

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `RecommenderClient` / `AsyncRecommenderClient`."""
        return {"tls": self.tls or None, "client_cert": self.client_cert,
                "client_key": self.client_key, "token": self.token,
                "server_name": self.server_name}  # fmt: skip

    def channel(
        self, target: str, options: Sequence[tuple[str, Any]] = (), aio: bool = False
    ) -> grpc.Channel | grpc.aio.Channel:
        """A channel to `target` with this TLS configuration (the token goes per call:
        `metadata`).

        Raises:
            BertrecError: a token would travel in plaintext to a host other than loopback.
        """
        import grpc

        from bertrec.client import security as sec

        try:
            credentials, opts = sec.channel_arguments(
                target, (), self.tls or None, self.client_cert, self.client_key, self.token,
                self.server_name, options,
            )  # fmt: skip
        except ValueError as exc:
            raise BertrecError(str(exc)) from None
        if credentials is None:
            make = grpc.aio.insecure_channel if aio else grpc.insecure_channel
            return make(target, options=opts)
        if aio:
            return grpc.aio.secure_channel(target, credentials, options=opts)
        return grpc.secure_channel(target, credentials, options=opts)

    def __repr__(self) -> str:
        token = "<hidden>" if self.token is not None else None
        tls = "<CA>" if isinstance(self.tls, bytes) else self.tls
        return (
            f"ClientSecurity(tls={tls}, client_cert={self.client_cert is not None}, token={token})"
        )


FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--tls", {"action": "store_true",
               "help": "connect with TLS, trusting the system's root certificates"}),
    ("--tls-ca", {"type": Path, "metavar": "FILE",
                  "help": "connect with TLS, trusting this CA (PEM)"}),
    ("--tls-cert", {"type": Path, "metavar": "FILE",
                    "help": "client certificate (PEM) for a server that requires one (mTLS)"}),
    ("--tls-key", {"type": Path, "metavar": "FILE", "help": "private key (PEM) of --tls-cert"}),
    ("--server-name", {"metavar": "NAME",
                       "help": "name the server certificate must carry (default: the host)"}),
    ("--token-file", {"type": Path, "metavar": "FILE",
                      "help": f"bearer token file (default: ${TOKEN_ENV}); never a flag value"}),
)  # fmt: skip


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags in this module's docstring, in a group of their own."""
    group = parser.add_argument_group("TLS and authentication")
    for flag, spec in FLAGS:
        group.add_argument(flag, **spec)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ClientSecurity:
    """Read the files the flags name, and the token from its file or `$BERTREC_TOKEN`.

    Raises:
        BertrecError: a flag without its partner, an unreadable or non-PEM file, a bad token.
    """
    from bertrec.client import security as sec

    environ = os.environ if environ is None else environ
    if (args.tls_cert is None) != (args.tls_key is None):
        raise BertrecError("give --tls-cert and --tls-key together")
    secure = bool(args.tls or args.tls_ca or args.tls_cert)
    if args.server_name and not secure:
        raise BertrecError("--server-name checks a server certificate: it needs --tls or --tls-ca")
    try:
        tls: bool | bytes = secure if args.tls_ca is None else sec.pem(args.tls_ca, "--tls-ca")
        cert = None if args.tls_cert is None else sec.pem(args.tls_cert, "--tls-cert")
        key = None if args.tls_key is None else sec.pem(args.tls_key, "--tls-key")
        token = _token(args.token_file, environ)
    except (OSError, ValueError) as exc:
        raise BertrecError(str(exc)) from None
    return ClientSecurity(tls, cert, key, token, args.server_name or None)


def _token(path: Path | None, environ: Mapping[str, str]) -> BearerToken | None:
    from bertrec.client.security import BearerToken, read_token_file

    if path is not None:
        text, where = read_token_file(path), f"--token-file {path}"
    else:
        text, where = environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
        if not text:
            return None
    try:
        return BearerToken(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
