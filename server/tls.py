"""TLS and mTLS for the gRPC port, with certificates re-read on change (no restart).

grpc's dynamic server credentials ask a fetcher for the certificate configuration on every
new handshake; ours stats the three files and rebuilds the configuration only when one of them
changed (size, mtime or inode: `mv` of a new file counts), so rotating is writing new files
(atomically: write elsewhere, then rename) and waiting for the next connection. Connections
already open keep the certificate they were set up with. A half-written or mismatched pair is
logged and the last good configuration stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from bertrec.errors import BertrecError

log = logging.getLogger(__name__)


class TlsError(BertrecError):
    """A certificate, key or CA file cannot be read at start (exit code 2)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)


class RotatingCredentials:
    """`grpc.ServerCredentials` that follow the files in `TlsFiles`."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = self._stat()
        initial = self._configuration()
        if initial is None:
            raise TlsError(
                f"cannot use the TLS files {files.cert}, {files.key} (see the error logged above)"
            )
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=files.client_ca is not None
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: a new configuration, or None for no change."""
        with self._lock:
            try:
                signature = self._stat()
            except TlsError as exc:
                log.error("tls: %s; keeping the certificate loaded before", exc)
                return None
            if signature == self._signature:
                return None
            configuration = self._configuration()
            if configuration is None:
                return None  # logged; the next handshake tries again
            self._signature = signature
            log.info("tls: reloaded the certificate from %s", self.files.cert)
            return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration | None:
        f = self.files
        try:
            cert, key = f.cert.read_bytes(), f.key.read_bytes()
            ca = f.client_ca.read_bytes() if f.client_ca is not None else None
        except OSError as exc:
            log.error("tls: cannot read a certificate file: %s", exc)
            return None
        if (
            b"-----BEGIN" not in cert
            or b"-----BEGIN" not in key
            or (ca is not None and b"-----BEGIN" not in ca)
        ):
            log.error("tls: %s, %s: not PEM files (a write in progress?)", f.cert, f.key)
            return None
        if not _pair_matches(f.cert, f.key):
            return None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        paths = [self.files.cert, self.files.key]
        if self.files.client_ca is not None:
            paths.append(self.files.client_ca)
        try:
            stats = [os.stat(p) for p in paths]
        except OSError as exc:
            raise TlsError(f"cannot read a TLS file: {exc}") from None
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


def _pair_matches(cert: Path, key: Path) -> bool:
    """Whether the key belongs to the certificate (OpenSSL checks when loading the pair): a
    rotation caught between its two renames must keep the old pair, and a wrong key at start
    must name the files, not fail later as a bind error."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        log.error("tls: %s, %s do not make a certificate and its key: %s", cert, key, exc)
        return False
    return True
