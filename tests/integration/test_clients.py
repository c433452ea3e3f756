"""The Go, Java, C++ and TypeScript example clients against the live server.

Each `clients/<lang>/` holds two scripts with one contract (see clients/README.md):

    build.sh OUT_DIR                 regenerate the stubs from proto/ and build into OUT_DIR;
                                     exit 3 with "missing toolchain: ..." when one is absent
    run.sh OUT_DIR --target HOST:PORT --user-id U --text T --k K --feedback-user-id F
                                     call Health.Check, Recommend and EmbedText once each,
                                     RecommendBatch and StreamRecommendations for U and an unknown
                                     id (k=3; the stream read to its end), then RecordFeedback
                                     (F rated Recommend's top item, with a fixed idempotency
                                     key), and print one JSON document on stdout

    run.sh ... [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
                                     the same over TLS (mTLS with the client certificate), the
                                     token file's token sent as "authorization: Bearer <token>"

The test builds each client, runs it against a server with a SQLite feedback store and requires
its answers to equal the Python client's (the feedback one too: the Python client resending the
example's event is told it is a duplicate, and F's recommendations leave the rated item out);
then runs it against a server that fails each call's first attempts with the retryable codes,
which it must ride out by the shared retry policy (clients/service_config.json) as the Python
client does. A missing toolchain skips with the reason, unless
BERTREC_REQUIRE_TOOLCHAINS=1 (set by `make test`, which installs every toolchain) turns it into a
failure, so CI can never pass by skipping. Last, each runs against a server with mTLS and a
credentials file (certificates and tokens made at run time by `tls_material`): with the CA, its
client certificate and a token file it gets the Python client's answers; without the token its
Recommend fails UNAUTHENTICATED; and the token shows in none of its output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from server_harness import Reference, ServerProcess, serving, start_server
from tls_material import CertificateAuthority, token_entries, write_auth_file

from bertrec.client import Feedback, FeedbackRecorded, RecommenderClient, UserRecommendations
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = ("go", "java", "cpp", "typescript")
MISSING_TOOLCHAIN = 3
BUILD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 120
TEXT = "a gentle story about friendship, music and a long journey home"
K = 7
BULK_K = 3  # the k of every example's bulk calls (clients/README.md)
UNKNOWN_USER = "bertrec-example-unknown-user"  # the id every example adds to its bulk calls
RATING = 4.0  # the rating every example records (clients/README.md)


def feedback_key(user_id: str, item_id: str) -> str:
    """The fixed idempotency key of the examples' one event."""
    return f"bertrec-example:{user_id}:{item_id}"


def _require_toolchains() -> bool:
    return os.environ.get("BERTREC_REQUIRE_TOOLCHAINS", "") not in ("", "0")


@pytest.fixture(scope="module", params=LANGUAGES)
def built_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    lang: str = request.param
    out = tmp_path_factory.mktemp(f"client-{lang}")
    build = subprocess.run(
        ["bash", str(ROOT / "clients" / lang / "build.sh"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if build.returncode == MISSING_TOOLCHAIN and not _require_toolchains():
        pytest.skip(f"{lang} client not built: {build.stderr.strip().splitlines()[-1]}")
    log = f"{build.stdout[-3000:]}\n{build.stderr[-5000:]}"
    assert build.returncode == 0, f"{lang} build failed:\n{log}"
    return lang, out


@pytest.fixture(scope="module")
def feedback_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real server, with a feedback store the examples' RecordFeedback writes to."""
    store = tmp_path_factory.mktemp("feedback") / "feedback.db"
    logs = tmp_path_factory.mktemp("logs")
    with serving(model_repo, logs, "--feedback-store", f"sqlite:///{store}") as proc:
        yield proc


@pytest.fixture(scope="module")
def feedback_client(feedback_server: ServerProcess) -> Iterator[RecommenderClient]:
    with RecommenderClient(feedback_server.target, timeout_s=10.0) as c:
        yield c


def _start(
    lang: str, out: Path, target: str, user_id: str, feedback_user_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "clients" / lang / "run.sh"), str(out),
         "--target", target, "--user-id", user_id, "--text", TEXT, "--k", str(K),
         "--feedback-user-id", feedback_user_id, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip


def _run(
    lang: str, out: Path, target: str, user_id: str, feedback_user_id: str, *extra: str
) -> dict[str, Any]:
    result = _start(lang, out, target, user_id, feedback_user_id, *extra)
    assert result.returncode == 0, f"{lang} client failed:\n{result.stdout}\n{result.stderr}"
    try:
        document: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{lang} client printed no JSON document: {result.stdout!r}") from exc
    return document


def _assert_items_equal(mine: list[dict[str, Any]], theirs: Any) -> None:
    """A client's printed items against the Python client's, ids, ranks and scores."""
    assert [i["item_id"] for i in mine] == [i.item_id for i in theirs]
    assert [i["rank"] for i in mine] == [i.rank for i in theirs]
    for one, other in zip(mine, theirs, strict=True):
        assert math.isclose(one["score"], other.score, rel_tol=1e-6, abs_tol=1e-6)
        assert math.isclose(
            one["predicted_rating"], other.predicted_rating, rel_tol=1e-6, abs_tol=1e-6
        )


def _assert_bulk_equal(got: dict[str, Any], want: list[UserRecommendations]) -> None:
    """One bulk call's printed answer against the Python client's: every user, in order."""
    assert got["model"] == {"name": want[0].model.name, "version": want[0].model.version}
    assert [(r["user_id"], r["found"]) for r in got["results"]] == [
        (w.user_id, w.found) for w in want
    ]
    for mine, theirs in zip(got["results"], want, strict=True):
        _assert_items_equal(mine["items"], theirs.items)


def test_client_answers_equal_python_client(
    built_client: tuple[str, Path],
    feedback_server: ServerProcess,
    feedback_client: RecommenderClient,
    ref: Reference,
) -> None:
    lang, out = built_client
    client = feedback_client
    user_id = next(u for u in ref.user_ids if len(ref.rated(u)) > 1)
    rater = f"example-{lang}"  # a cold user of its own per language
    got = _run(lang, out, feedback_server.target, user_id, rater)

    assert got["health"] == "SERVING"

    want = client.recommend(user_id, K)
    rec = got["recommend"]
    assert rec["model"] == {"name": want.model.name, "version": want.model.version}
    _assert_items_equal(rec["items"], want.items)

    # Both bulk calls: the user's top BULK_K as Recommend ranks them, the stranger not found.
    ids = [user_id, UNKNOWN_USER]
    batch = client.recommend_batch(ids, BULK_K)
    assert [u.found for u in batch] == [True, False] and len(batch[0].items) == BULK_K
    assert batch[0].item_ids == want.item_ids[:BULK_K]
    _assert_bulk_equal(got["batch"], batch)
    _assert_bulk_equal(got["stream"], list(client.stream_recommendations(ids, BULK_K)))

    emb = client.embed_text([TEXT])
    vector = got["embed"]["values"]
    assert got["embed"]["model"] == {"name": emb.model.name, "version": emb.model.version}
    assert len(vector) == emb.vectors.shape[1]
    for mine_v, theirs_v in zip(vector, emb.vectors[0].tolist(), strict=True):
        assert math.isclose(mine_v, theirs_v, rel_tol=1e-6, abs_tol=1e-6)

    item, key = want.item_ids[0], feedback_key(rater, want.item_ids[0])
    assert got["feedback"] == {
        "user_id": rater, "item_id": item, "rating": RATING, "idempotency_key": key,
        "accepted": 1, "duplicates": 0,
    }  # fmt: skip
    # The example's event is in the store under its key, and folded in: the cold user is known.
    resent = Feedback(rater, item, "rating", rating=RATING, idempotency_key=key)
    assert client.record_feedback([resent]) == FeedbackRecorded(accepted=0, duplicates=1)
    assert item not in client.recommend(rater, K).item_ids


# What the flaky server answers each RPC's attempts with before it answers: every code the
# shared policy retries, and no more failures than retry throttling allows on a fresh channel
# (4: each spends one of 10 tokens, and retries stop at 5), so the bulk calls answer at once.
FAILURES = {
    "RecommendBatch": (),
    "StreamRecommendations": (),
    "Recommend": (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE),
    "EmbedText": (grpc.StatusCode.RESOURCE_EXHAUSTED,),
    "RecordFeedback": (grpc.StatusCode.UNAVAILABLE,),
}
FLAKY_MODEL = pb.ModelRef(name="flaky", version=3)


class FlakyRecommender(pb_grpc.RecommenderServiceServicer):
    """Fails the first attempts of each RPC (`FAILURES`), then answers. RecordFeedback keeps
    the keys of every attempt first, as a store whose answer was lost on the way would: the
    retry must then be counted a duplicate."""

    def __init__(self, failures: dict[str, tuple[grpc.StatusCode, ...]]) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()
        self.feedback: list[pb.RecordFeedbackRequest] = []
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
            n = self.calls[method]
        if n <= len(self.failures[method]):
            context.abort(self.failures[method][n - 1], f"{method} attempt {n} refused")

    def Recommend(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RecommendResponse:
        self._attempt("Recommend", context)
        item = pb.RankedItem(item_id=request.user_id + "-pick", score=1.5, rank=1)
        return pb.RecommendResponse(items=[item], model=FLAKY_MODEL)

    def EmbedText(
        self, request: pb.EmbedTextRequest, context: grpc.ServicerContext
    ) -> pb.EmbedTextResponse:
        self._attempt("EmbedText", context)
        vectors = [pb.Embedding(values=[0.5, -0.25]) for _ in request.texts]
        return pb.EmbedTextResponse(embeddings=vectors, dim=2, model=FLAKY_MODEL)

    def _bulk(self, user_ids: Iterable[str]) -> list[pb.UserRecommendations]:
        """The stand-in's bulk answer: a "u..." id is known and gets one pick; others are not."""
        answers = []
        for user in user_ids:
            known = user.startswith("u")
            picks = [pb.RankedItem(item_id=user + "-bulk", score=0.5, rank=1)] if known else []
            answers.append(pb.UserRecommendations(user_id=user, found=known, items=picks))
        return answers

    def RecommendBatch(
        self, request: pb.RecommendBatchRequest, context: grpc.ServicerContext
    ) -> pb.RecommendBatchResponse:
        self._attempt("RecommendBatch", context)
        return pb.RecommendBatchResponse(results=self._bulk(request.user_ids), model=FLAKY_MODEL)

    def StreamRecommendations(
        self, request: pb.StreamRecommendationsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRecommendationsResponse]:
        """One message per user, so the clients must read a stream of several to its end."""
        self._attempt("StreamRecommendations", context)
        for user in request.user_ids:
            yield pb.StreamRecommendationsResponse(results=self._bulk([user]), model=FLAKY_MODEL)

    def RecordFeedback(
        self, request: pb.RecordFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.RecordFeedbackResponse:
        keys = [e.idempotency_key for e in request.events]
        with self._lock:
            self.feedback.append(request)
            new = [k for k in keys if k not in self._keys]
            self._keys.update(keys)
        self._attempt("RecordFeedback", context)
        return pb.RecordFeedbackResponse(accepted=len(new), duplicates=len(keys) - len(new))


# A server without a feedback store: FAILED_PRECONDITION, which the feedback writes' own entry
# of the policy leaves out (a retry cannot help), though the service-wide entry retries it.
NO_STORE = {
    "RecommendBatch": (),
    "StreamRecommendations": (),
    "Recommend": (),
    "EmbedText": (),
    "RecordFeedback": (grpc.StatusCode.FAILED_PRECONDITION,) * 5,
}


@pytest.fixture
def flaky(request: pytest.FixtureRequest) -> Iterator[tuple[str, FlakyRecommender]]:
    servicer = FlakyRecommender(getattr(request, "param", FAILURES))
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_RecommenderServiceServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_client_retries_by_the_shared_service_config(
    built_client: tuple[str, Path], flaky: tuple[str, FlakyRecommender]
) -> None:
    lang, out = built_client
    target, servicer = flaky
    got = _run(lang, out, target, "u7", "rater")
    assert got["recommend"]["items"][0]["item_id"] == "u7-pick"
    assert got["embed"]["values"] == [0.5, -0.25]
    assert servicer.calls == {m: len(codes) + 1 for m, codes in FAILURES.items()}
    # Every chunk of the stream read, in order, as one call's answer.
    flaky_model = {"name": FLAKY_MODEL.name, "version": FLAKY_MODEL.version}
    want_users = [("u7", True, ["u7-bulk"]), (UNKNOWN_USER, False, [])]
    for bulk in (got["batch"], got["stream"]):
        assert bulk["model"] == flaky_model
        assert [
            (r["user_id"], r["found"], [i["item_id"] for i in r["items"]]) for r in bulk["results"]
        ] == want_users
    # The retry resent the event with its key, which the lost first attempt had stored.
    assert got["feedback"]["accepted"] == 0 and got["feedback"]["duplicates"] == 1
    first, retry = servicer.feedback
    assert first == retry
    (event,) = first.events
    assert (event.user_id, event.item_id) == ("rater", "u7-pick")
    assert (event.kind, event.rating) == (pb.FEEDBACK_KIND_RATING, RATING)
    assert event.idempotency_key == feedback_key("rater", "u7-pick")
    # The client's clock, sent as a google.protobuf.Timestamp (a day's slack for odd clocks).
    sent = event.occurred_at.seconds + event.occurred_at.nanos / 1e9
    assert abs(sent - time.time()) < 86_400


@pytest.mark.parametrize("flaky", [NO_STORE], indirect=True, ids=["no-store"])
def test_client_takes_the_feedback_writes_own_retry_entry(
    built_client: tuple[str, Path], flaky: tuple[str, FlakyRecommender]
) -> None:
    """A method's own entry wins over the service's in every language: one attempt only."""
    lang, out = built_client
    target, servicer = flaky
    result = _start(lang, out, target, "u7", "rater")
    assert result.returncode == 1, f"{lang}: {result.stdout}\n{result.stderr}"
    assert "RecordFeedback failed: FAILED_PRECONDITION" in result.stderr
    assert servicer.calls["RecordFeedback"] == 1


@dataclass(frozen=True)
class SecuredServer:
    """A server with mTLS and a credentials file, and the files an example client is given."""

    server: ServerProcess
    ca: Path
    client_cert: Path
    client_key: Path
    token: str
    token_file: Path

    def flags(self, *, token: bool = True) -> list[str]:
        flags = ["--tls-ca", str(self.ca), "--tls-cert", str(self.client_cert),
                 "--tls-key", str(self.client_key)]  # fmt: skip
        return flags + (["--token-file", str(self.token_file)] if token else [])

    def python_client(self) -> RecommenderClient:
        return RecommenderClient(
            self.server.target, tls=self.ca, client_cert=self.client_cert,
            client_key=self.client_key, token=self.token, timeout_s=10.0,
        )  # fmt: skip


@pytest.fixture(scope="module")
def secured_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecuredServer]:
    """TLS with client certificates required, a token with the read and feedback roles, and a
    feedback store (the examples record one event)."""
    folder = tmp_path_factory.mktemp("secured")
    ca = CertificateAuthority()
    ca_path = ca.write(folder)
    cert, key = ca.server().write(folder, "server")
    client_cert, client_key = ca.client("bertrec-example").write(folder, "client")
    entry = token_entries({"example": ["read", "feedback"]})["example"]
    auth = write_auth_file(folder / "auth.toml", [entry])
    token_file = folder / "token"
    token_file.write_text(entry.token + "\n")
    proc = start_server(
        model_repo, folder / "logs", "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(ca_path), "--auth-file", str(auth),
        "--feedback-store", f"sqlite:///{folder / 'feedback.db'}",
    )  # fmt: skip
    try:
        secured = SecuredServer(proc, ca_path, client_cert, client_key, entry.token, token_file)
        with secured.python_client() as client:
            client.wait_until_serving(90.0)
        yield secured
    finally:
        proc.terminate()


def test_client_over_mtls_with_a_token(
    built_client: tuple[str, Path], secured_server: SecuredServer, ref: Reference
) -> None:
    lang, out = built_client
    target, token = secured_server.server.target, secured_server.token
    user_id = next(u for u in ref.user_ids if len(ref.rated(u)) > 1)
    rater = f"secure-example-{lang}"
    got = _run(lang, out, target, user_id, rater, *secured_server.flags())
    with secured_server.python_client() as client:
        want = client.recommend(user_id, K)
        dim = client.embed_text([TEXT]).vectors.shape[1]
    assert got["health"] == "SERVING"
    assert [i["item_id"] for i in got["recommend"]["items"]] == want.item_ids
    assert len(got["embed"]["values"]) == dim
    assert got["feedback"]["accepted"] == 1 and got["feedback"]["user_id"] == rater

    # Without the token: health is open, Recommend is refused; the token never shows.
    refused = _start(lang, out, target, user_id, rater, *secured_server.flags(token=False))
    assert refused.returncode == 1, f"{lang}: {refused.stdout}\n{refused.stderr}"
    assert "Recommend failed: UNAUTHENTICATED" in refused.stderr
    assert token not in json.dumps(got) + refused.stdout + refused.stderr

    # A token or a client certificate without --tls-ca is a usage error, before any call.
    plain = _start(
        lang, out, target, user_id, rater, "--token-file", str(secured_server.token_file)
    )
    assert plain.returncode == 2, f"{lang}: {plain.stdout}\n{plain.stderr}"
    assert "--tls-ca" in plain.stderr and token not in plain.stderr + plain.stdout
