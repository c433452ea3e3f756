"""Online feedback on the real server with a SQLite store, checked against numpy.

One server (a private copy of the session's tiny repository, polled every 0.2 s, keeping the
latest 2 versions loaded) lives through the module in order: feedback folds into the next
Recommend, ScoreItems and explanations; users are forgotten; the server restarts on the same
store; a new version is published and swapped in. After every step each user's answers on
each loaded version must equal what `Expected` computes from that version's exported arrays
(np.load, no server code) and the feedback the test sent: the implicit-ALS solve over the
whole catalogue, the rating head's ridge bias, and the items to exclude.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from server_harness import MODEL, Reference, ServerProcess, start_server

from bertrec.bench.versions import publish_variant
from bertrec.repository.artifacts import (
    RANK_ALPHA,
    RANK_POWER,
    RANK_REG,
    RATING_REG,
    RATING_REG_BIAS,
)
from bertrec.server.fold_in import (
    CLICK_CONFIDENCE,
    DEFAULT_TRAINING_CONFIDENCE,
    PURCHASE_CONFIDENCE,
    SKIP_CONFIDENCE,
)
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

Code = grpc.StatusCode
K = 6
TIMEOUT_S = 10.0
POLL_S = 0.2
KIND_WEIGHTS = {
    pb.FEEDBACK_KIND_CLICK: (CLICK_CONFIDENCE, 1.0),
    pb.FEEDBACK_KIND_PURCHASE: (PURCHASE_CONFIDENCE, 1.0),
    pb.FEEDBACK_KIND_SKIP: (SKIP_CONFIDENCE, 0.0),
}

KNOWN = "u0007"  # trained users
FORGOTTEN = "u0013"  # forgotten, and nothing after
RETURNING = "u0021"  # forgotten, then new feedback: a cold user from then on
COLD = "cold-reader-3f6b1c0e9d7a4e21b58c"
COLD_FORGOTTEN = "cold-forgotten-a94e07d2c61b4f3895de"


@dataclass(frozen=True)
class Sent:
    """One event as the test sent it (the server's store order is the send order)."""

    user: str
    item: str
    kind: int
    rating: float
    at: float


@dataclass
class Expected:
    """What every user's answers must be, from the feedback sent and a version's arrays."""

    sent: dict[str, list[Sent]] = field(default_factory=dict)
    masked: set[str] = field(default_factory=set)  # trained users forgotten: no training row
    clock: float = field(default_factory=lambda: time.time() - 3600.0)

    def event(self, user: str, item: str, kind: int, rating: float = 0.0) -> pb.FeedbackEvent:
        self.clock += 1.0
        sent = Sent(user, item, kind, rating, self.clock)
        self.sent.setdefault(user, []).append(sent)
        at = Timestamp()
        at.FromNanoseconds(int(self.clock * 1e9))
        return pb.FeedbackEvent(
            user_id=user, item_id=item, kind=kind, rating=rating, occurred_at=at,
            idempotency_key=uuid.uuid4().hex,
        )  # fmt: skip

    def forget(self, ref: Reference, user: str) -> None:
        self.sent.pop(user, None)
        if user in ref.user_ids:
            self.masked.add(user)

    def known(self, ref: Reference, user: str) -> bool:
        return bool(self.sent.get(user)) or self.training_row(ref, user) is not None

    def training_row(self, ref: Reference, user: str) -> int | None:
        if user in self.masked or user not in ref.user_ids:
            return None
        return ref.user_ids.index(user)

    def touched(self, ref: Reference, user: str) -> set[str]:
        return {s.item for s in self.sent.get(user, [])}

    def seen(self, ref: Reference, user: str) -> set[str]:
        row = self.training_row(ref, user)
        return self.touched(ref, user) | (set(ref.rated(user)) if row is not None else set())

    def vector(self, ref: Reference, user: str) -> np.ndarray:
        """The user's ranking vector: the exported one without feedback, else the exact
        minimiser of sum_i c_i (p_i - x . y_i)^2 + reg |x|^2 over every item i (c = 1, p = 0
        where the user did nothing), built as the full diagonal system."""
        row = self.training_row(ref, user)
        sent = self.sent.get(user, [])
        if not sent:
            assert row is not None
            return ref.users[row]
        terms: dict[int, list[tuple[float, float]]] = {}
        if row is not None:
            for item in ref.rated(user):
                terms[ref.item_ids.index(item)] = [(DEFAULT_TRAINING_CONFIDENCE, 1.0)]
        latest: dict[int, Sent] = {}
        extra: dict[int, list[tuple[float, float]]] = {}
        for s in sent:  # sent in client-time order
            j = ref.item_ids.index(s.item)
            if s.kind == pb.FEEDBACK_KIND_RATING:
                latest[j] = s
            else:
                extra.setdefault(j, []).append(KIND_WEIGHTS[s.kind])
        top = float(ref.manifest["scoring"]["rating_range"][1])
        for j, s in latest.items():
            terms[j] = [(RANK_ALPHA * (s.rating / top) ** RANK_POWER, 1.0)]
        for j, more in extra.items():
            terms[j] = terms.get(j, []) + more
        n = len(ref.item_ids)
        weight, target = np.ones(n), np.zeros(n)
        for j, pieces in terms.items():
            weight[j] = sum(c for c, _ in pieces)
            target[j] = sum(c * p for c, p in pieces) / weight[j]
        y = ref.items
        system = y.T @ (weight[:, None] * y) + RANK_REG * np.eye(y.shape[1])
        return np.linalg.solve(system, y.T @ (weight * target))

    def bias(self, ref: Reference, user: str) -> float:
        """The rating bias: exported, or the ridge step from it (from 0 for a cold user) that
        the user's latest ratings give, with the training ratings' precision."""
        row = self.training_row(ref, user)
        ratings: dict[int, float] = {}
        for s in self.sent.get(user, []):
            if s.kind == pb.FEEDBACK_KIND_RATING:
                ratings[ref.item_ids.index(s.item)] = s.rating
        dim = ref.items.shape[1]
        precision = np.diag([RATING_REG_BIAS] + [RATING_REG] * dim)
        centre = np.zeros(dim + 1)
        if row is not None:
            centre = np.concatenate([[ref.user_bias[row]], ref.users[row]])
            trained = features(ref, [ref.item_ids.index(i) for i in ref.rated(user)])
            precision = precision + trained.T @ trained
        if not ratings:
            return float(centre[0])
        new = features(ref, list(ratings))
        residual = np.array(list(ratings.values())) - ref.global_mean - ref.item_bias[list(ratings)]
        solved = np.linalg.solve(precision + new.T @ new, precision @ centre + new.T @ residual)
        return float(solved[0])

    def recommend(self, ref: Reference, user: str) -> list[tuple[str, float]]:
        return ref.top(self.vector(ref, user), K, skip=self.seen(ref, user))

    def ratings(self, ref: Reference, user: str, items: list[str]) -> list[float]:
        vector, bias = self.vector(ref, user), self.bias(ref, user)
        rows = [ref.item_ids.index(i) for i in items]
        return list(ref.global_mean + bias + ref.item_bias[rows] + ref.items[rows] @ vector)


def features(ref: Reference, rows: list[int]) -> np.ndarray:
    return np.hstack([np.ones((len(rows), 1)), ref.items[rows]])


@dataclass
class Stack:
    """The server under test and the store and repository it keeps across restarts."""

    repo: Path
    store: Path
    logs: Path
    server: ServerProcess | None = None

    def start(self) -> None:
        flags = ("--feedback-store", f"sqlite://{self.store}", "--poll-interval-s", str(POLL_S),
                 "--version-policy", "latest 2")  # fmt: skip
        self.server = start_server(self.repo, self.logs, *flags)
        self.server.wait_serving()

    def stop(self) -> None:
        if self.server is not None:
            assert self.server.terminate() == 0, self.server.stderr()[-3000:]
            self.server = None

    def call(self, method: str, request: object) -> object:
        assert self.server is not None
        with grpc.insecure_channel(self.server.target) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            return getattr(stub, method)(request, timeout=TIMEOUT_S)

    def record(self, *events: pb.FeedbackEvent) -> pb.RecordFeedbackResponse:
        response = self.call("RecordFeedback", pb.RecordFeedbackRequest(events=events))
        assert isinstance(response, pb.RecordFeedbackResponse)
        return response

    def recommend(
        self, user: str, explain: bool = False, model: pb.ModelRef | None = None
    ) -> pb.RecommendResponse:
        request = pb.RecommendRequest(user_id=user, k=K, explain=explain, model=model)
        response = self.call("Recommend", request)
        assert isinstance(response, pb.RecommendResponse)
        return response

    def code(self, method: str, request: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(method, request)
        return caught.value.code()

    def version(self) -> int:
        info = self.call("GetModelInfo", pb.GetModelInfoRequest())
        assert isinstance(info, pb.GetModelInfoResponse)
        return int(info.model.version)


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("feedback-server")
    shutil.copytree(model_repo / MODEL / "1", root / "repo" / MODEL / "1")
    (root / "store").mkdir()
    stack = Stack(root / "repo", root / "store" / "feedback.db", root / "logs")
    stack.start()
    try:
        yield stack
    finally:
        if stack.server is not None:
            stack.server.terminate()


@pytest.fixture(scope="module")
def expected() -> Expected:
    return Expected()


def assert_answers(stack: Stack, ref: Reference, expected: Expected, user: str) -> None:
    """Recommend and ScoreItems of `user` on `ref`'s version equal the numpy answers computed
    with that version's arrays (or NOT_FOUND)."""
    version = pb.ModelRef(version=int(ref.manifest["version"]))
    if not expected.known(ref, user):
        request = pb.RecommendRequest(user_id=user, model=version)
        assert stack.code("Recommend", request) == Code.NOT_FOUND
        return
    got = stack.recommend(user, model=version)
    assert got.model.version == version.version
    want = expected.recommend(ref, user)
    assert [i.item_id for i in got.items] == [i for i, _ in want], user
    np.testing.assert_allclose(
        [i.score for i in got.items], [s for _, s in want], rtol=1e-4, atol=1e-5
    )
    assert not {i.item_id for i in got.items} & expected.seen(ref, user)
    items = sorted(expected.touched(ref, user))[:4] + [i for i, _ in want[:2]]
    request = pb.ScoreItemsRequest(user_id=user, item_ids=items, model=version)
    scored = stack.call("ScoreItems", request)
    assert isinstance(scored, pb.ScoreItemsResponse)
    np.testing.assert_allclose(
        [i.predicted_rating for i in scored.items], expected.ratings(ref, user, items),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_feedback_is_folded_into_the_next_recommend(
    stack: Stack, expected: Expected, ref: Reference
) -> None:
    assert stack.code("Recommend", pb.RecommendRequest(user_id=COLD)) == Code.NOT_FOUND
    trained = ref.rated(KNOWN)[0]
    before = [i.item_id for i in stack.recommend(KNOWN).items]
    liked = before[-1]  # rated top: must leave the list
    fresh = [i for i in ref.item_ids if i not in ref.rated(KNOWN) and i != liked]
    e = expected
    response = stack.record(
        e.event(KNOWN, liked, pb.FEEDBACK_KIND_RATING, 5.0),
        e.event(KNOWN, fresh[1], pb.FEEDBACK_KIND_CLICK),
        e.event(KNOWN, fresh[2], pb.FEEDBACK_KIND_SKIP),
        e.event(KNOWN, trained, pb.FEEDBACK_KIND_RATING, 1.0),  # replaces the training pair
        e.event(COLD, fresh[3], pb.FEEDBACK_KIND_RATING, 4.5),
        e.event(COLD, fresh[4], pb.FEEDBACK_KIND_PURCHASE),
        e.event(COLD, fresh[3], pb.FEEDBACK_KIND_RATING, 2.0),  # re-rated: the later counts
    )
    assert (response.accepted, response.duplicates) == (7, 0)
    after = [i.item_id for i in stack.recommend(KNOWN).items]
    assert after != before and liked not in after
    for user in (KNOWN, COLD):
        assert_answers(stack, ref, expected, user)


def test_explanations_of_folded_users_attribute_the_whole_score(
    stack: Stack, expected: Expected, ref: Reference
) -> None:
    """A folded user's explanation splits each score exactly, and the attribution to the items
    they touched (feedback and training pairs) sums to the score without its bias."""
    for user in (KNOWN, COLD):
        got = stack.recommend(user, explain=True)
        assert [i.item_id for i in got.items] == [i for i, _ in expected.recommend(ref, user)]
        for item in got.items:
            why = item.explanation
            parts = why.bias_part + why.collaborative_part + why.text_part
            assert parts == pytest.approx(item.score, rel=1e-4, abs=1e-5)
            assert why.contributions_total == pytest.approx(
                item.score - why.bias_part, rel=1e-3, abs=1e-4
            )
            assert why.contributions
            assert {c.item_id for c in why.contributions} <= expected.seen(ref, user)


def test_bad_feedback_is_refused_whole(stack: Stack, expected: Expected, ref: Reference) -> None:
    good = pb.FeedbackEvent(user_id=COLD, item_id=ref.item_ids[0], kind=pb.FEEDBACK_KIND_CLICK)
    bad = pb.FeedbackEvent(user_id=COLD, item_id="no-such-item", kind=pb.FEEDBACK_KIND_CLICK)
    with pytest.raises(grpc.RpcError) as caught:
        stack.record(good, bad)
    assert caught.value.code() == Code.INVALID_ARGUMENT and "events[1]" in caught.value.details()
    assert_answers(stack, ref, expected, COLD)  # the good event was not applied either


def test_a_key_sent_twice_is_applied_once(stack: Stack, expected: Expected, ref: Reference) -> None:
    """Within one batch and across batches: a click counted twice would add its weight twice."""
    click = expected.event(COLD, ref.item_ids[1], pb.FEEDBACK_KIND_CLICK)
    response = stack.record(click, click)
    assert (response.accepted, response.duplicates) == (1, 1)
    response = stack.record(click)
    assert (response.accepted, response.duplicates) == (0, 1)
    assert_answers(stack, ref, expected, COLD)


def store_files(stack: Stack) -> list[Path]:
    files = sorted(stack.store.parent.glob(stack.store.name + "*"))
    assert stack.store in files
    return files


def files_holding(stack: Stack, text: str) -> list[str]:
    needles = [text.encode(codec) for codec in ("utf-8", "utf-16-le", "utf-32-le")]
    return [p.name for p in store_files(stack) if any(n in p.read_bytes() for n in needles)]


def test_forget_leaves_no_byte_of_the_user_and_makes_them_unknown(
    stack: Stack, expected: Expected, ref: Reference
) -> None:
    e, items = expected, ref.item_ids
    stack.record(
        e.event(FORGOTTEN, items[5], pb.FEEDBACK_KIND_RATING, 4.0),
        e.event(RETURNING, items[6], pb.FEEDBACK_KIND_CLICK),
        e.event(COLD_FORGOTTEN, items[7], pb.FEEDBACK_KIND_RATING, 3.0),
        e.event(COLD_FORGOTTEN, items[8], pb.FEEDBACK_KIND_SKIP),
    )
    assert files_holding(stack, COLD_FORGOTTEN) and files_holding(stack, FORGOTTEN)  # visible
    for user, deleted, had in [
        (FORGOTTEN, 1, True),
        (RETURNING, 1, True),
        (COLD_FORGOTTEN, 2, False),
    ]:
        response = stack.call("ForgetUser", pb.ForgetUserRequest(user_id=user))
        assert isinstance(response, pb.ForgetUserResponse)
        assert (response.events_deleted, response.had_model_factors) == (deleted, had), user
        expected.forget(ref, user)
        assert stack.code("Recommend", pb.RecommendRequest(user_id=user)) == Code.NOT_FOUND
        assert (
            stack.code("ScoreItems", pb.ScoreItemsRequest(user_id=user, item_ids=items[:1]))
            == Code.NOT_FOUND
        )
    for user in (FORGOTTEN, RETURNING, COLD_FORGOTTEN):
        assert files_holding(stack, user) == [], user
    assert files_holding(stack, COLD)  # the search sees ids that are there
    # New feedback after the forget: a cold user, their training pairs gone for good.
    trained = ref.rated(RETURNING)[0]
    stack.record(e.event(RETURNING, trained, pb.FEEDBACK_KIND_RATING, 3.5))
    for user in (KNOWN, COLD, FORGOTTEN, RETURNING, COLD_FORGOTTEN):
        assert_answers(stack, ref, expected, user)
    again = stack.call("ForgetUser", pb.ForgetUserRequest(user_id=FORGOTTEN))
    assert isinstance(again, pb.ForgetUserResponse)
    assert (again.events_deleted, again.had_model_factors) == (0, False)


ALL_USERS = (KNOWN, COLD, FORGOTTEN, RETURNING, COLD_FORGOTTEN)


def test_a_restart_replays_the_store(stack: Stack, expected: Expected, ref: Reference) -> None:
    before = {u: stack.recommend(u) for u in (KNOWN, COLD, RETURNING)}
    stack.stop()
    stack.start()
    for user in ALL_USERS:
        assert_answers(stack, ref, expected, user)
    for user, answer in before.items():
        again = stack.recommend(user)
        assert [(i.item_id, i.score) for i in again.items] == [
            (i.item_id, i.score) for i in answer.items
        ]


def test_folded_users_survive_a_version_swap(stack: Stack, expected: Expected) -> None:
    assert stack.server is not None
    publish_variant(stack.repo, MODEL, 1, seed=2, version=2)
    deadline = time.monotonic() + 60.0
    while stack.version() != 2:
        assert time.monotonic() < deadline, "version 2 never served"
        time.sleep(0.1)
    old, new = Reference(stack.repo / MODEL / "1"), Reference(stack.repo / MODEL / "2")
    for user in ALL_USERS:  # v2 replayed the store; v1 (still loaded) kept its users
        assert_answers(stack, new, expected, user)
        assert_answers(stack, old, expected, user)
    # Feedback and forgets now reach both loaded versions, each with its own factors.
    stack.record(expected.event(COLD, new.item_ids[9], pb.FEEDBACK_KIND_CLICK))
    stack.call("ForgetUser", pb.ForgetUserRequest(user_id=KNOWN))
    expected.forget(new, KNOWN)
    for user in (COLD, KNOWN):
        assert_answers(stack, new, expected, user)
        assert_answers(stack, old, expected, user)
