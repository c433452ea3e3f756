"""Who may call what: bearer tokens (and mTLS identities) with roles, checked per method.

The credentials file (`--auth-file`, TOML) never holds a token, only its SHA-256:

    [[token]]
    name = "web-frontend"            # shown in logs and metrics instead of the token
    sha256 = "9f86d081884c7d65..."   # `bertrec auth hash-token` prints it (token on stdin)
    roles = ["read"]

    [[identity]]                     # a client certificate (mTLS) and its roles
    name = "feedback-collector"
    san = "collector.internal"       # or cn = "..."; matched exactly
    roles = ["feedback"]

Roles: `read` (recommendations, scores, embeddings, model info, Open Inference Protocol
inference and listing), `feedback` (RecordFeedback), `admin` (model control and ForgetUser).
A method missing from `METHOD_ROLES` needs `admin`: a new RPC is closed until someone decides.
Health stays open (probes carry no credentials); reflection is open, closed or needs any valid
credential (`--reflection on|off|auth`).

A presented token is hashed and compared with every entry by `hmac.compare_digest`, so the
time taken says nothing about which entry matched or how close a guess came. The file is
re-read when its size or mtime changes (checked at most once a second), so tokens rotate
without a restart: add the new token, move clients over, remove the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertrec.errors import BertrecError
from bertrec.server.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

READ, FEEDBACK, ADMIN = "read", "feedback", "admin"
ROLES = frozenset({READ, FEEDBACK, ADMIN})
OPEN = "open"  # no credentials needed
REFLECTION = "reflection"  # decided by --reflection
RELOAD_CHECK_S = 1.0

_REC = "/bertrec.v1.RecommenderService/"
_OIP = "/inference.GRPCInferenceService/"
_READ_METHODS = (
    *(_REC + m for m in ("Recommend", "RecommendForText", "ScoreItems", "SimilarItems",
                         "EmbedText", "GetModelInfo", "RecommendBatch",
                         "StreamRecommendations")),
    *(_OIP + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                         "ModelMetadata", "ModelInfer", "RepositoryIndex")),
)  # fmt: skip
METHOD_ROLES: Mapping[str, str] = {
    **dict.fromkeys(_READ_METHODS, READ),
    _REC + "RecordFeedback": FEEDBACK,
    _REC + "ForgetUser": ADMIN,
    _OIP + "RepositoryModelLoad": ADMIN,
    _OIP + "RepositoryModelUnload": ADMIN,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": REFLECTION,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": REFLECTION,
}
REFLECTION_MODES = ("on", "off", "auth")
BEARER = "bearer "


class AuthFileError(BertrecError):
    """The credentials file is missing or malformed (exit code 2 at start; kept at reload)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name for logs and metrics, and its roles."""

    name: str
    roles: frozenset[str]


@dataclass(frozen=True)
class Credentials:
    """The parsed credentials file."""

    tokens: tuple[tuple[bytes, Principal], ...]  # (sha256 digest, principal)
    identities: tuple[tuple[str, str, Principal], ...]  # ("cn" | "san", value, principal)


def hash_token(token: str) -> str:
    """The hex SHA-256 the credentials file stores for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_credentials(text: str, source: str) -> Credentials:
    """Parse the TOML credentials file. Raises AuthFileError naming the problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthFileError(f"{source}: {exc}") from None
    unknown = sorted(set(doc) - {"token", "identity"})
    if unknown:
        raise AuthFileError(f"{source}: unknown table(s): {', '.join(unknown)}")
    tokens = []
    for i, entry in enumerate(_entries(doc, "token", source)):
        where = f"{source}: token[{i}]"
        _only_keys(entry, {"name", "sha256", "roles"}, where)
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AuthFileError(f"{where}: sha256 must be 64 hex digits (the token's hash)")
        tokens.append((bytes.fromhex(digest), _principal(entry, where)))
    identities = []
    for i, entry in enumerate(_entries(doc, "identity", source)):
        where = f"{source}: identity[{i}]"
        _only_keys(entry, {"name", "cn", "san", "roles"}, where)
        kinds = [k for k in ("cn", "san") if k in entry]
        if len(kinds) != 1 or not str(entry[kinds[0]]):
            raise AuthFileError(f"{where}: needs exactly one of cn or san")
        identities.append((kinds[0], str(entry[kinds[0]]), _principal(entry, where)))
    return Credentials(tuple(tokens), tuple(identities))


def _entries(doc: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise AuthFileError(f"{source}: {key} must be an array of tables ([[{key}]])")
    return value


def _only_keys(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s): {', '.join(unknown)}")


def _principal(entry: dict[str, Any], where: str) -> Principal:
    name = entry.get("name")
    roles = entry.get("roles")
    if not isinstance(name, str) or not name:
        raise AuthFileError(f"{where}: needs a name")
    if not isinstance(roles, list) or not roles or not set(roles) <= ROLES:
        raise AuthFileError(f"{where}: roles must be a non-empty list of {sorted(ROLES)}")
    return Principal(name, frozenset(roles))


class CredentialsFile:
    """The credentials file, re-read when it changes; a bad edit keeps the last good one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._credentials = self._read()
        self._checked = time.monotonic()

    def current(self) -> Credentials:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self._credentials
        with self._lock:
            if now - self._checked >= RELOAD_CHECK_S:
                self._checked = now
                self._reload_if_changed()
        return self._credentials

    def _reload_if_changed(self) -> None:
        try:
            signature = self._stat()
        except AuthFileError as exc:
            log.error("auth: %s; keeping the credentials read before", exc)
            return
        if signature == self._signature:
            return
        try:
            self._credentials = self._read()
        except AuthFileError as exc:
            log.error("auth: %s; keeping the credentials read before", exc)
            return
        self._signature = signature
        c = self._credentials
        log.info("auth: reloaded %s (%d tokens, %d identities)", self.path, len(c.tokens),
                 len(c.identities))  # fmt: skip

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise AuthFileError(f"{self.path}: cannot read the credentials file: {exc}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> Credentials:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AuthFileError(f"{self.path}: cannot read the credentials file: {exc}") from None
        return parse_credentials(text, str(self.path))


class Authorizer:
    """Decides each call from its method, its metadata and its TLS peer.

    Args:
        credentials: the credentials file; None turns authentication off (every method open
            except reflection when `reflection` is "auth", which then needs nothing either).
        reflection: "on" (open), "off" (not served at all; the server does not register it)
            or "auth" (any valid credential).
        failures: called with the reason of every refusal (metrics); never with a token.
    """

    def __init__(
        self,
        credentials: CredentialsFile | None,
        reflection: str,
        failures: Any = None,
    ) -> None:
        self._credentials = credentials
        self._reflection = reflection
        self._failures = failures

    @property
    def enabled(self) -> bool:
        return self._credentials is not None

    def check(
        self, method: str, metadata: Iterable[tuple[str, Any]], peer: Any
    ) -> Principal | None:
        """The caller, if the call may proceed.

        Args:
            method: the full method path.
            metadata: the invocation metadata.
            peer: the call's `auth_context()` (TLS peer properties), or {}.

        Raises:
            Unauthenticated: no valid credential where one is needed.
            PermissionDenied: a valid credential without the method's role.
        """
        needed = METHOD_ROLES.get(method, ADMIN)
        if needed == OPEN or self._credentials is None:
            return None
        if needed == REFLECTION and self._reflection == "on":
            return None
        principal = self._authenticate(metadata, peer)
        if needed == REFLECTION or needed in principal.roles:
            return principal
        self._refused("forbidden")
        raise PermissionDenied(f"{principal.name!r} lacks the {needed!r} role for {method}")

    def _authenticate(self, metadata: Iterable[tuple[str, Any]], peer: Any) -> Principal:
        assert self._credentials is not None
        credentials = self._credentials.current()
        header = None
        for key, value in metadata:
            if key == "authorization":
                if header is not None:
                    self._refused("malformed")
                    raise Unauthenticated("more than one authorization header")
                header = value
        if header is not None:
            if not isinstance(header, str) or not header.lower().startswith(BEARER):
                self._refused("malformed")
                raise Unauthenticated("authorization must be 'Bearer <token>'")
            digest = hashlib.sha256(header[len(BEARER) :].strip().encode()).digest()
            found: Principal | None = None
            for stored, entry in credentials.tokens:  # every entry: constant time
                if hmac.compare_digest(stored, digest):
                    found = entry
            if found is None:
                self._refused("invalid_token")
                raise Unauthenticated("invalid token")
            return found
        identified = _identity(credentials, peer)
        if identified is None:
            self._refused("missing")
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
        return identified

    def _refused(self, reason: str) -> None:
        if self._failures is not None:
            self._failures(reason)


def _identity(credentials: Credentials, peer: Any) -> Principal | None:
    """The principal of a verified client certificate (mTLS), by CN or SAN."""
    if not peer or not credentials.identities:
        return None
    names = {
        "cn": {_text(v) for v in peer.get("x509_common_name", [])},
        "san": {_text(v) for v in peer.get("x509_subject_alternative_name", [])},
    }
    for kind, value, principal in credentials.identities:
        if value in names[kind]:
            return principal
    return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
