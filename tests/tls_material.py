"""Certificates and credentials files made at run time, for tests and benchmarks of TLS and auth.

Nothing here is checked in: a test makes its own CA, a server certificate for localhost and
127.0.0.1 and client certificates (CN and/or SAN of its choice) with `cryptography`, writes them
as PEM files, and writes a credentials file (`--auth-file`) holding only token hashes. Files are
written atomically (a temporary file in the same folder, then a rename), as an operator rotating
them should, so a server that re-reads them on change never sees half a file.

`server_certificate` / `presented_serial` open a plain `ssl` connection to read the certificate
a server presents on a new connection: what a rotation test compares before and after.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bertrec.server.auth import hash_token

VALID_FOR = datetime.timedelta(days=2)
BACKDATE = datetime.timedelta(minutes=5)  # a clock a little behind ours still accepts them


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_pem).serial_number

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.crt` and `<stem>.key` atomically; returns (cert path, key path)."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        write_atomic(cert, self.cert_pem)
        write_atomic(key, self.key_pem, mode=0o600)
        return cert, key


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates (EC P-256: fast to make)."""

    def __init__(self, name: str = "bertrec test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, folder: Path, stem: str = "ca") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.crt"
        write_atomic(path, self.cert_pem)
        return path

    def server(self, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> Issued:
        """A server certificate whose SAN lists `hosts` (DNS names and IP addresses)."""
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue(hosts[0], names, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, cn: str, sans: Iterable[str] = ()) -> Issued:
        """A client certificate with common name `cn` and SANs `sans`: DNS names, or URIs
        for those with a scheme (a mesh's SPIFFE id, "spiffe://cluster.local/ns/x/sa/y")."""
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(s) if "://" in s else x509.DNSName(s) for s in sans
        ]
        return self._issue(cn, names, ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(
        self, cn: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def new_token() -> str:
    """A random bearer token (what `bertrec auth new-token` would print)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    token: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class IdentityEntry:
    name: str
    kind: str  # "cn" or "san"
    value: str
    roles: tuple[str, ...]


def credentials_toml(
    tokens: Iterable[TokenEntry] = (), identities: Iterable[IdentityEntry] = ()
) -> str:
    """The text of a credentials file: token hashes (never the tokens) and identities."""
    lines: list[str] = []
    for t in tokens:
        lines += ["[[token]]", f'name = "{t.name}"', f'sha256 = "{hash_token(t.token)}"',
                  f"roles = {_toml_list(t.roles)}", ""]  # fmt: skip
    for i in identities:
        lines += ["[[identity]]", f'name = "{i.name}"', f'{i.kind} = "{i.value}"',
                  f"roles = {_toml_list(i.roles)}", ""]  # fmt: skip
    return "\n".join(lines)


def write_auth_file(
    path: Path, tokens: Iterable[TokenEntry] = (), identities: Iterable[IdentityEntry] = ()
) -> Path:
    """Write (atomically) a credentials file for `--auth-file`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, credentials_toml(tokens, identities).encode(), mode=0o600)
    return path


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


def server_certificate(
    port: int,
    ca_pem: bytes,
    client: Issued | None = None,
    host: str = "127.0.0.1",
    server_name: str = "localhost",
    timeout_s: float = 10.0,
) -> x509.Certificate:
    """The certificate a TLS server on `host:port` presents to a new connection (verified
    against `ca_pem`; `client` is presented where the server requires one)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])  # what a gRPC client offers
    if client is not None:
        folder = Path(os.environ.get("TMPDIR", "/tmp"))
        cert, key = client.write(folder, f"client-{secrets.token_hex(4)}")
        try:
            context.load_cert_chain(cert, key)
        finally:
            cert.unlink()
            key.unlink()
    with (
        socket.create_connection((host, port), timeout=timeout_s) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def presented_serial(port: int, ca_pem: bytes, client: Issued | None = None) -> int:
    """The serial number of the certificate a new connection to `port` is shown."""
    return server_certificate(port, ca_pem, client).serial_number


def free_port() -> int:
    """A loopback port free right now (for flags that cannot take 0 and report back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_entries(specs: Mapping[str, Sequence[str]]) -> dict[str, TokenEntry]:
    """One fresh token per name: {"reader": ["read"]} -> {"reader": TokenEntry(...)}."""
    return {name: TokenEntry(name, new_token(), tuple(roles)) for name, roles in specs.items()}
