"""server/auth.py without a server: the credentials file, the method table, bearer parsing,
mTLS identities and reloading."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from tls_material import IdentityEntry, TokenEntry, credentials_toml, write_auth_file

from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.server import auth
from bertrec.server.auth import (
    ADMIN,
    FEEDBACK,
    METHOD_ROLES,
    OPEN,
    READ,
    REFLECTION,
    AuthFileError,
    Authorizer,
    CredentialsFile,
    Principal,
    hash_token,
    parse_credentials,
)
from bertrec.server.errors import PermissionDenied, Unauthenticated
from bertrec.v1 import recommender_pb2 as pb

SHA = "a" * 64
TOKENS = {
    "reader": TokenEntry("reader", "tok-read", (READ,)),
    "collector": TokenEntry("collector", "tok-feedback", (FEEDBACK,)),
    "operator": TokenEntry("operator", "tok-admin", (ADMIN,)),
    "everything": TokenEntry("everything", "tok-all", (READ, FEEDBACK, ADMIN)),
}
IDENTITIES = (
    IdentityEntry("by-san", "san", "reader.internal", (READ,)),
    IdentityEntry("by-cn", "cn", "collector", (FEEDBACK,)),
)
RECOMMEND = "/bertrec.v1.RecommenderService/Recommend"
FORGET = "/bertrec.v1.RecommenderService/ForgetUser"


def _parse(text: str) -> auth.Credentials:
    return parse_credentials(text, "creds.toml")


def _authorizer(
    tmp_path: Path, reflection: str = "auth"
) -> tuple[Authorizer, list[str], CredentialsFile]:
    path = write_auth_file(tmp_path / "auth.toml", TOKENS.values(), IDENTITIES)
    reasons: list[str] = []
    credentials = CredentialsFile(path)
    return Authorizer(credentials, reflection, reasons.append), reasons, credentials


def _bearer(token: str) -> list[tuple[str, Any]]:
    return [("authorization", f"Bearer {token}")]


# ------------------------------------------------------------------------------------ parsing


def test_a_written_file_parses_to_hashes_names_and_roles() -> None:
    creds = _parse(credentials_toml(TOKENS.values(), IDENTITIES))
    by_name = {p.name: (digest, p.roles) for digest, p in creds.tokens}
    for entry in TOKENS.values():
        digest, roles = by_name[entry.name]
        assert digest == hashlib.sha256(entry.token.encode()).digest()
        assert roles == frozenset(entry.roles)
    assert [(k, v, p.name) for k, v, p in creds.identities] == [
        ("san", "reader.internal", "by-san"),
        ("cn", "collector", "by-cn"),
    ]
    assert "tok-read" not in credentials_toml(TOKENS.values())  # hashes only


def test_hash_token_is_hex_sha256() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


def test_an_uppercase_hash_is_accepted() -> None:
    creds = _parse(f'[[token]]\nname = "x"\nsha256 = "{hash_token("t").upper()}"\nroles = ["read"]')
    assert creds.tokens[0][0] == hashlib.sha256(b"t").digest()


def test_an_empty_file_has_no_credentials() -> None:
    assert _parse("") == auth.Credentials((), ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[token]\n", "creds.toml"),  # not TOML
        ('[[tokens]]\nname = "x"', "unknown table(s): tokens"),
        ('token = "x"', "token must be an array of tables"),
        ('[[token]]\nname = "x"\nsha256 = "' + SHA + '"\nroles = ["read"]\ntoken = "plain"',
         "token[0]: unknown key(s): token"),
        ('[[token]]\nname = "x"\nsha256 = "abc"\nroles = ["read"]', "64 hex digits"),
        ('[[token]]\nname = "x"\nsha256 = "' + "g" * 64 + '"\nroles = ["read"]', "64 hex digits"),
        ('[[token]]\nname = "x"\nroles = ["read"]', "64 hex digits"),
        ('[[token]]\nsha256 = "' + SHA + '"\nroles = ["read"]', "needs a name"),
        ('[[token]]\nname = ""\nsha256 = "' + SHA + '"\nroles = ["read"]', "needs a name"),
        ('[[token]]\nname = "x"\nsha256 = "' + SHA + '"', "roles must be a non-empty list"),
        ('[[token]]\nname = "x"\nsha256 = "' + SHA + '"\nroles = []', "non-empty list"),
        ('[[token]]\nname = "x"\nsha256 = "' + SHA + '"\nroles = "read"', "non-empty list"),
        ('[[token]]\nname = "x"\nsha256 = "' + SHA + '"\nroles = ["root"]', "non-empty list"),
        ('[[identity]]\nname = "x"\nroles = ["read"]', "identity[0]: needs exactly one of cn"),
        ('[[identity]]\nname = "x"\ncn = "a"\nsan = "b"\nroles = ["read"]', "exactly one"),
        ('[[identity]]\nname = "x"\ncn = ""\nroles = ["read"]', "exactly one"),
        ('[[identity]]\nname = "x"\nsubject = "a"\nroles = ["read"]', "unknown key(s): subject"),
    ],
    ids=[
        "not-toml", "unknown-table", "not-array", "plain-token-key", "short-hash", "non-hex-hash",
        "no-hash", "no-name", "empty-name", "no-roles", "empty-roles", "roles-string",
        "unknown-role", "identity-neither", "identity-both", "identity-empty", "identity-unknown",
    ],
)  # fmt: skip
def test_a_malformed_file_is_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(AuthFileError) as raised:
        _parse(text)
    assert message in str(raised.value)
    assert "creds.toml" in str(raised.value)


def test_a_second_entry_is_named_by_its_index() -> None:
    good = f'[[token]]\nname = "a"\nsha256 = "{SHA}"\nroles = ["read"]\n'
    with pytest.raises(AuthFileError, match=r"token\[1\]"):
        _parse(good + '[[token]]\nname = "b"\nsha256 = "zz"\nroles = ["read"]\n')


def test_a_missing_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="cannot read"):
        CredentialsFile(tmp_path / "absent.toml")


# ------------------------------------------------------------------------------ method table

# What each method needs, written from issue 13 (not copied from METHOD_ROLES).
EXPECTED = {
    **{f"/bertrec.v1.RecommenderService/{m}": READ for m in (
        "Recommend", "RecommendForText", "ScoreItems", "SimilarItems", "EmbedText",
        "GetModelInfo", "RecommendBatch", "StreamRecommendations")},
    "/bertrec.v1.RecommenderService/RecordFeedback": FEEDBACK,
    "/bertrec.v1.RecommenderService/ForgetUser": ADMIN,
    **{f"/inference.GRPCInferenceService/{m}": READ for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "RepositoryIndex")},
    "/inference.GRPCInferenceService/RepositoryModelLoad": ADMIN,
    "/inference.GRPCInferenceService/RepositoryModelUnload": ADMIN,
    **{f"/grpc.health.v1.Health/{m}": OPEN for m in ("Check", "Watch", "List")},
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": REFLECTION,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": REFLECTION,
}  # fmt: skip


def test_method_roles_is_what_the_issue_asks() -> None:
    assert dict(METHOD_ROLES) == EXPECTED


def test_every_served_method_is_listed() -> None:
    """A new RPC in the protos must be given a role on purpose (unlisted means admin)."""
    for service in (
        pb.DESCRIPTOR.services_by_name["RecommenderService"],
        oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    ):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in METHOD_ROLES, method.full_name


@pytest.mark.parametrize("holder", sorted(TOKENS))
@pytest.mark.parametrize("method", sorted(METHOD_ROLES))
def test_every_method_with_every_role(tmp_path: Path, method: str, holder: str) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    entry = TOKENS[holder]
    needed = METHOD_ROLES[method]
    if needed == OPEN:
        assert authorizer.check(method, [], {}) is None  # no credential looked at
        assert authorizer.check(method, _bearer("wrong"), {}) is None
    elif needed == REFLECTION or needed in entry.roles:
        assert authorizer.check(method, _bearer(entry.token), {}) == Principal(
            entry.name, frozenset(entry.roles)
        )
    else:
        with pytest.raises(PermissionDenied, match=f"'{needed}'"):
            authorizer.check(method, _bearer(entry.token), {})
        assert reasons == ["forbidden"]
    if needed != OPEN:
        with pytest.raises(Unauthenticated):
            authorizer.check(method, [], {})


def test_admin_does_not_imply_read(tmp_path: Path) -> None:
    """Roles are not ranked: an operator token cannot read recommendations."""
    authorizer, _, _ = _authorizer(tmp_path)
    with pytest.raises(PermissionDenied):
        authorizer.check(RECOMMEND, _bearer("tok-admin"), {})
    assert authorizer.check(FORGET, _bearer("tok-admin"), {}) is not None


@pytest.mark.parametrize(
    "method", ["/bertrec.v1.RecommenderService/DropEverything", "/other.Service/Recommend", ""]
)
def test_an_unknown_method_needs_admin(tmp_path: Path, method: str) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    for holder in ("reader", "collector"):
        with pytest.raises(PermissionDenied, match="'admin'"):
            authorizer.check(method, _bearer(TOKENS[holder].token), {})
    assert authorizer.check(method, _bearer("tok-admin"), {}) is not None
    with pytest.raises(Unauthenticated):
        authorizer.check(method, [], {})
    assert reasons == ["forbidden", "forbidden", "missing"]


def test_without_a_credentials_file_everything_is_open() -> None:
    authorizer = Authorizer(None, "auth")
    assert not authorizer.enabled
    for method in [*METHOD_ROLES, "/x.Y/Z"]:
        assert authorizer.check(method, [], {}) is None


@pytest.mark.parametrize(("mode", "open_"), [("on", True), ("auth", False), ("off", False)])
def test_reflection_modes(tmp_path: Path, mode: str, open_: bool) -> None:
    authorizer, _, _ = _authorizer(tmp_path, reflection=mode)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    if open_:
        assert authorizer.check(method, [], {}) is None
        assert authorizer.check(method, _bearer("wrong"), {}) is None  # not even looked at
    else:
        with pytest.raises(Unauthenticated):
            authorizer.check(method, [], {})
        # Any valid credential, whatever its roles.
        principal = authorizer.check(method, _bearer("tok-feedback"), {})
        assert principal == Principal("collector", frozenset({FEEDBACK}))


# ---------------------------------------------------------------------------- bearer parsing


@pytest.mark.parametrize(
    "value", ["Bearer tok-read", "bearer tok-read", "BEARER tok-read", "BeArEr tok-read",
              "Bearer tok-read ", "Bearer   tok-read"],
)  # fmt: skip
def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path, value: str) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    principal = authorizer.check(RECOMMEND, [("authorization", value)], {})
    assert principal is not None and principal.name == "reader" and not reasons


@pytest.mark.parametrize(
    "value",
    ["tok-read", "Basic tok-read", "Bearer", "Bearertok-read", "Token tok-read", "",
     b"Bearer tok-read"],
    ids=["bare", "basic", "scheme-only", "no-space", "other-scheme", "empty", "binary"],
)  # fmt: skip
def test_malformed_authorization(tmp_path: Path, value: Any) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    with pytest.raises(Unauthenticated, match="Bearer <token>"):
        authorizer.check(RECOMMEND, [("authorization", value)], {})
    assert reasons == ["malformed"]


@pytest.mark.parametrize("value", ["Bearer ", "Bearer tok-read-", "Bearer TOK-READ"])
def test_an_unknown_token_is_invalid(tmp_path: Path, value: str) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    with pytest.raises(Unauthenticated, match="invalid token"):
        authorizer.check(RECOMMEND, [("authorization", value)], {})
    assert reasons == ["invalid_token"]


def test_two_authorization_headers_are_refused(tmp_path: Path) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    both = [*_bearer("tok-read"), ("user-agent", "x"), *_bearer("tok-read")]
    with pytest.raises(Unauthenticated, match="more than one"):
        authorizer.check(RECOMMEND, both, {})
    assert reasons == ["malformed"]


def test_other_metadata_is_ignored(tmp_path: Path) -> None:
    authorizer, _, _ = _authorizer(tmp_path)
    metadata = [("x-authorization", "Bearer tok-admin"), *_bearer("tok-read")]
    assert authorizer.check(RECOMMEND, metadata, {}) == Principal("reader", frozenset({READ}))
    with pytest.raises(Unauthenticated, match="missing"):
        authorizer.check(RECOMMEND, [("authorization-x", "Bearer tok-read")], {})


def test_every_stored_hash_is_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matching entry's position does not change the work done (no early exit)."""
    authorizer, _, _ = _authorizer(tmp_path)
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in ("tok-read", "tok-all", "nope"):
        calls.clear()
        with contextlib.suppress(Unauthenticated):
            authorizer.check(RECOMMEND, _bearer(token), {})
        assert len(calls) == len(TOKENS), token


def test_failure_reasons_never_carry_the_token(tmp_path: Path) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    for metadata in ([], _bearer("secret-guess"), [("authorization", "Basic secret-guess")]):
        with pytest.raises(Unauthenticated) as raised:
            authorizer.check(RECOMMEND, metadata, {})
        assert "secret-guess" not in str(raised.value)
    with pytest.raises(PermissionDenied) as denied:
        authorizer.check(FORGET, _bearer("tok-read"), {})
    assert "tok-read" not in str(denied.value)
    assert reasons == ["missing", "invalid_token", "malformed", "forbidden"]


# ------------------------------------------------------------------------------- identities


def _peer(cn: str | None = None, sans: tuple[str, ...] = ()) -> dict[str, list[bytes]]:
    peer: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    if cn is not None:
        peer["x509_common_name"] = [cn.encode()]
    if sans:
        peer["x509_subject_alternative_name"] = [s.encode() for s in sans]
    return peer


def test_an_identity_by_san(tmp_path: Path) -> None:
    authorizer, _, _ = _authorizer(tmp_path)
    peer = _peer("whatever", ("other.internal", "reader.internal"))
    assert authorizer.check(RECOMMEND, [], peer) == Principal("by-san", frozenset({READ}))


def test_an_identity_by_cn(tmp_path: Path) -> None:
    authorizer, _, _ = _authorizer(tmp_path)
    principal = authorizer.check("/bertrec.v1.RecommenderService/RecordFeedback", [],
                                 _peer("collector"))  # fmt: skip
    assert principal == Principal("by-cn", frozenset({FEEDBACK}))
    with pytest.raises(PermissionDenied, match="'by-cn'"):
        authorizer.check(RECOMMEND, [], _peer("collector"))


def test_cn_and_san_are_not_interchangeable(tmp_path: Path) -> None:
    authorizer, reasons, _ = _authorizer(tmp_path)
    for peer in (_peer("reader.internal"), _peer("x", ("collector",))):
        with pytest.raises(Unauthenticated, match="missing"):
            authorizer.check(RECOMMEND, [], peer)
    assert reasons == ["missing", "missing"]


def test_identities_match_exactly(tmp_path: Path) -> None:
    authorizer, _, _ = _authorizer(tmp_path)
    for peer in (_peer(None, ("Reader.internal",)), _peer(None, ("reader.internal.evil",)),
                 _peer("collector "), {}):  # fmt: skip
        with pytest.raises(Unauthenticated):
            authorizer.check(RECOMMEND, [], peer)


def test_a_token_decides_before_the_identity(tmp_path: Path) -> None:
    authorizer, _, _ = _authorizer(tmp_path)
    reader_peer = _peer(None, ("reader.internal",))
    with pytest.raises(Unauthenticated, match="invalid token"):
        authorizer.check(RECOMMEND, _bearer("wrong"), reader_peer)
    principal = authorizer.check(FORGET, _bearer("tok-admin"), reader_peer)
    assert principal is not None and principal.name == "operator"


# -------------------------------------------------------------------------------- reloading


@pytest.fixture
def reload_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the file on every call (production checks at most once a second)."""
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)


def test_a_changed_file_is_reloaded(tmp_path: Path, reload_now: None) -> None:
    authorizer, _, credentials = _authorizer(tmp_path)
    new = TokenEntry("reader-2", "tok-read-2", (READ,))
    write_auth_file(credentials.path, [TOKENS["reader"], new])
    assert authorizer.check(RECOMMEND, _bearer("tok-read-2"), {}) is not None
    assert authorizer.check(RECOMMEND, _bearer("tok-read"), {}) is not None
    write_auth_file(credentials.path, [new])
    with pytest.raises(Unauthenticated, match="invalid token"):
        authorizer.check(RECOMMEND, _bearer("tok-read"), {})
    with pytest.raises(Unauthenticated):  # the identities went with the rewrite
        authorizer.check(RECOMMEND, [], _peer(None, ("reader.internal",)))


def test_an_in_place_edit_of_the_same_size_is_reloaded(tmp_path: Path, reload_now: None) -> None:
    """Same size, new mtime: an editor saving over the file."""
    path = tmp_path / "auth.toml"
    path.write_text(credentials_toml([TokenEntry("a", "tok-aaaa", (READ,))]))
    credentials = CredentialsFile(path)
    authorizer = Authorizer(credentials, "auth")
    old = os.stat(path)
    path.write_text(credentials_toml([TokenEntry("a", "tok-bbbb", (READ,))]))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    assert os.stat(path).st_size == old.st_size
    assert authorizer.check(RECOMMEND, _bearer("tok-bbbb"), {}) is not None


def test_a_bad_edit_keeps_the_last_good_file(
    tmp_path: Path, reload_now: None, caplog: pytest.LogCaptureFixture
) -> None:
    authorizer, _, credentials = _authorizer(tmp_path)
    with caplog.at_level(logging.ERROR, logger="bertrec.server.auth"):
        credentials.path.write_text('[[token]]\nname = "x"\nsha256 = "short"\nroles = ["read"]\n')
        assert authorizer.check(RECOMMEND, _bearer("tok-read"), {}) is not None
        credentials.path.write_text("[[token]\nbroken")
        assert authorizer.check(RECOMMEND, _bearer("tok-read"), {}) is not None
        credentials.path.unlink()
        assert authorizer.check(RECOMMEND, _bearer("tok-read"), {}) is not None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("64 hex digits" in e and "keeping" in e for e in errors), errors
    assert any("cannot read" in e for e in errors), errors
    # A fixed file is picked up again.
    write_auth_file(credentials.path, [TokenEntry("fixed", "tok-fixed", (READ,))])
    assert authorizer.check(RECOMMEND, _bearer("tok-fixed"), {}) is not None
    with pytest.raises(Unauthenticated):
        authorizer.check(RECOMMEND, _bearer("tok-read"), {})


def test_the_file_is_not_read_again_within_the_check_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between checks a call costs no stat (an hour's interval: nothing is timed here)."""
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 3600.0)
    path = write_auth_file(tmp_path / "auth.toml", [TOKENS["reader"]])
    credentials = CredentialsFile(path)
    first = credentials.current()
    write_auth_file(path, [TOKENS["collector"]])
    assert credentials.current() is first
