"""The bad-input table: one request per validation rule of every RPC, and the status it must get.

Rows are data, so a reviewer can read the API's rules in one place; `test_rpc_attacks.py` runs
them against the real server (started with `rpcs.LIMITS`) and checks that every served method has
at least one row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from adversarial.rpcs import (
    ENCODER,
    FEEDBACK_USER,
    FORGOTTEN_USER,
    ITEMS,
    LIMITS,
    MODEL,
    RANKER,
    USERS,
    Code,
    path,
    tensor_bytes,
)
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.v1 import recommender_pb2 as pb

MAX_K, MAX_IDS = LIMITS["max_k"], LIMITS["max_item_ids"]
MAX_TEXTS, MAX_TEXT_BYTES = LIMITS["max_texts"], LIMITS["max_text_bytes"]
MAX_EVENTS = LIMITS["max_feedback_events"]
MAX_BATCH, MAX_STREAM = LIMITS["max_batch_users"], LIMITS["max_stream_users"]
LONG = "y" * 20_000  # echoed at full length, this passes the 16 KB metadata limit
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
Input: TypeAlias = oip.ModelInferRequest.InferInputTensor
Contents = oip.InferTensorContents


@dataclass(frozen=True)
class Case:
    """A request to `path` and the status it must get (`says`: part of the message).

    `code` may be a set where more than one answer is right (a control call refused because
    model control is off, or because the model does not exist).
    """

    path: str
    name: str
    request: Message = field(repr=False)
    code: grpc.StatusCode | frozenset[grpc.StatusCode]
    says: str = ""

    @property
    def codes(self) -> frozenset[grpc.StatusCode]:
        return self.code if isinstance(self.code, frozenset) else frozenset({self.code})

    @property
    def id(self) -> str:
        return f"{self.path.rsplit('/', 1)[1]}-{self.name}"


def rec(method: str, name: str, request: Message, code: Code, says: str = "") -> Case:
    return Case(path("rec", method), name, request, code, says)


def infer(name: str, code: Code, says: str = "", **fields: object) -> Case:
    return Case(path("oip", "ModelInfer"), name, oip.ModelInferRequest(**fields), code, says)


def control(method: str, name: str, request: Message) -> Case:
    """A model-control call that must be refused: the model is unknown, the name hostile, or
    model control is switched off."""
    return Case(path("oip", method), name, request, REFUSED)


def users(*ids: str) -> Input:
    return tensor_bytes("user_id", [u.encode() for u in ids])


def texts(*values: str) -> Input:
    return tensor_bytes("text", [t.encode() for t in values])


def k_tensor(value: int, datatype: str = "INT64", shape: Sequence[int] = (1,)) -> Input:
    field = {"INT64": "int64_contents", "INT32": "int_contents"}[datatype]
    count = 1
    for d in shape:
        count *= d
    return Input(name="k", datatype=datatype, shape=list(shape),
                 contents=Contents(**{field: [value] * count}))  # fmt: skip


RATING, CLICK = pb.FEEDBACK_KIND_RATING, pb.FEEDBACK_KIND_CLICK
NAN, INF = float("nan"), float("inf")
# Past any clock skew the server allows (minutes) for as long as the suite runs.
AN_HOUR_AHEAD_S = int(time.time()) + 3600


def event(n: int, **fields: object) -> pb.FeedbackEvent:
    """A valid rating of ITEMS[n] by the feedback user, under a key of its own; `fields` laid
    over it."""
    base = {"user_id": FEEDBACK_USER, "item_id": ITEMS[n % len(ITEMS)], "kind": RATING,
            "rating": 4.0, "idempotency_key": f"bad-input-{n}"}  # fmt: skip
    return pb.FeedbackEvent(**{**base, **fields})


def feedback(name: str, code: Code, says: str, *events: pb.FeedbackEvent) -> Case:
    return rec("RecordFeedback", name, pb.RecordFeedbackRequest(events=events), code, says)


def bad_event(name: str, says: str, **fields: object) -> Case:
    """Four events, the third bad: the whole batch is refused, naming `events[2]` and the field."""
    events = [event(0), event(1), event(2, **fields), event(3)]
    return feedback(name, INVALID, f"events[2].{says}", *events)


def forget(name: str, user_id: str, code: Code, says: str = "") -> Case:
    return rec("ForgetUser", name, pb.ForgetUserRequest(user_id=user_id), code, says)


TOO_MANY_IDS = list(ITEMS[: MAX_IDS + 1])
R, T, S = pb.RecommendRequest, pb.RecommendForTextRequest, pb.ScoreItemsRequest
INVALID, NOT_FOUND, OK = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.OK
REFUSED = frozenset({INVALID, NOT_FOUND, Code.FAILED_PRECONDITION})
Load, Unload = oip.RepositoryModelLoadRequest, oip.RepositoryModelUnloadRequest
P = oip.ModelRepositoryParameter
FILE_PARAMETER = {"file:1/model.onnx": P(bytes_param=b"\x00" * 64)}


def versioned(version: str | int, key: str = "version") -> dict[str, oip.ModelRepositoryParameter]:
    """A "version" parameter (int64 or text), or a Triton "config" pinning that version."""
    if key == "config":
        policy = {"version_policy": {"specific": {"versions": [version]}}}
        return {"config": P(string_param=json.dumps(policy))}
    if isinstance(version, int):
        return {"version": P(int64_param=version)}
    return {"version": P(string_param=version)}


def served_load(name: str, parameters: dict[str, oip.ModelRepositoryParameter]) -> Case:
    """A load (or, for names starting "unload", an unload) of the served model with hostile
    parameters: refused, never a server fault, and the served version keeps serving."""
    unload = name.startswith("unload")
    message = Unload if unload else Load
    method = "RepositoryModelUnload" if unload else "RepositoryModelLoad"
    return control(method, name, message(model_name=MODEL, parameters=parameters))


BAD_INPUT: list[Case] = [
    rec("Recommend", "empty-user", R(user_id="", k=5), INVALID, "user_id is empty"),
    rec("Recommend", "unknown-user", R(user_id="ghost", k=5), NOT_FOUND, "ghost"),
    rec("Recommend", "long-unknown-user", R(user_id=LONG, k=5), NOT_FOUND),
    rec("Recommend", "nul-user", R(user_id="u0001\x00", k=5), NOT_FOUND),
    rec("Recommend", "negative-k", R(user_id=USERS[1], k=-1), INVALID, "k must be"),
    rec("Recommend", "k-over-max", R(user_id=USERS[1], k=MAX_K + 1), INVALID, "k must be"),
    rec("Recommend", "k-int32-max", R(user_id=USERS[1], k=INT32_MAX), INVALID, "k must be"),
    rec("Recommend", "k-int32-min", R(user_id=USERS[1], k=-(2**31)), INVALID, "k must be"),
    rec("Recommend", "include-over-max", R(user_id=USERS[1], k=5, include_item_ids=TOO_MANY_IDS),
        INVALID, "max_item_ids"),
    rec("Recommend", "exclude-over-max", R(user_id=USERS[1], k=5, exclude_item_ids=TOO_MANY_IDS),
        INVALID, "max_item_ids"),
    rec("Recommend", "include-far-over-max",
        R(user_id=USERS[1], k=5, include_item_ids=[f"i{n}" for n in range(100_000)]), INVALID),
    rec("Recommend", "include-duplicate",
        R(user_id=USERS[1], k=5, include_item_ids=[ITEMS[2], ITEMS[2]]), INVALID, "more than once"),
    rec("Recommend", "exclude-duplicate",
        R(user_id=USERS[1], k=5, exclude_item_ids=[ITEMS[2], ITEMS[2]]), INVALID, "more than once"),
    rec("Recommend", "include-empty-id", R(user_id=USERS[1], k=5, include_item_ids=[""]), INVALID),
    rec("Recommend", "include-unknown", R(user_id=USERS[1], k=5, include_item_ids=["nope"]),
        NOT_FOUND, "nope"),
    rec("Recommend", "exclude-unknown", R(user_id=USERS[1], k=5, exclude_item_ids=[LONG]),
        NOT_FOUND),
    rec("Recommend", "no-candidates-left",
        R(user_id=USERS[1], k=5, include_item_ids=ITEMS[:3], exclude_item_ids=ITEMS[:3]), OK),
    # model: the version to answer from (0 = serving); only loaded versions of this model
    rec("Recommend", "model-version-not-loaded",
        R(user_id=USERS[1], k=5, model=pb.ModelRef(version=INT64_MAX)), NOT_FOUND),
    rec("Recommend", "model-version-negative",
        R(user_id=USERS[1], k=5, model=pb.ModelRef(version=-1)), INVALID, "model.version"),
    rec("Recommend", "model-other-name",
        R(user_id=USERS[1], k=5, model=pb.ModelRef(name=LONG)), NOT_FOUND),
    rec("Recommend", "model-serving-version", R(user_id=USERS[1], k=5, model=pb.ModelRef()), OK),
    # explain: validation comes first; the shared version has no attribution arrays (still OK)
    rec("Recommend", "explain-unknown-user", R(user_id="ghost", k=5, explain=True), NOT_FOUND,
        "ghost"),
    rec("Recommend", "explain-k-over-max", R(user_id=USERS[1], k=MAX_K + 1, explain=True),
        INVALID, "k must be"),
    rec("Recommend", "explain-no-candidates-left",
        R(user_id=USERS[1], k=5, include_item_ids=ITEMS[:3], exclude_item_ids=ITEMS[:3],
          explain=True), OK),
    rec("Recommend", "explain-without-attribution-arrays",
        R(user_id=USERS[1], k=MAX_K, exclude_rated=False, explain=True), OK),
    rec("RecommendForText", "explain-empty-text", T(text="", k=5, explain=True), INVALID,
        "text is empty"),
    rec("RecommendForText", "empty-text", T(text="", k=5), INVALID, "text is empty"),
    rec("RecommendForText", "blank-text", T(text=" \t\n\u3000", k=5), INVALID, "text is empty"),
    rec("RecommendForText", "text-over-max", T(text="x" * (MAX_TEXT_BYTES + 1), k=5), INVALID,
        "max_text_bytes"),
    rec("RecommendForText", "multibyte-over-max", T(text="é" * (MAX_TEXT_BYTES // 2 + 1), k=5),
        INVALID, "max_text_bytes"),
    rec("RecommendForText", "text-far-over-max", T(text=LONG, k=5), INVALID, "max_text_bytes"),
    rec("RecommendForText", "negative-k", T(text="sea", k=-1), INVALID, "k must be"),
    rec("RecommendForText", "k-over-max", T(text="sea", k=MAX_K + 1), INVALID, "k must be"),
    rec("ScoreItems", "no-items", S(user_id=USERS[1]), INVALID, "item_ids is empty"),
    rec("ScoreItems", "items-over-max", S(user_id=USERS[1], item_ids=TOO_MANY_IDS), INVALID,
        "max_item_ids"),
    rec("ScoreItems", "duplicate-item", S(user_id=USERS[1], item_ids=[ITEMS[3]] * 2), INVALID,
        "more than once"),
    rec("ScoreItems", "empty-item", S(user_id=USERS[1], item_ids=[ITEMS[3], ""]), INVALID),
    rec("ScoreItems", "unknown-item", S(user_id=USERS[1], item_ids=[ITEMS[3], "x"]), NOT_FOUND),
    rec("ScoreItems", "long-unknown-item", S(user_id=USERS[1], item_ids=[LONG]), NOT_FOUND),
    rec("ScoreItems", "empty-user", S(user_id="", item_ids=[ITEMS[3]]), INVALID),
    rec("ScoreItems", "unknown-user", S(user_id="ghost", item_ids=[ITEMS[3]]), NOT_FOUND),
    rec("SimilarItems", "empty-item", pb.SimilarItemsRequest(item_id="", k=3), INVALID),
    rec("SimilarItems", "unknown-item", pb.SimilarItemsRequest(item_id="nope", k=3), NOT_FOUND),
    rec("SimilarItems", "long-unknown-item", pb.SimilarItemsRequest(item_id=LONG, k=3), NOT_FOUND),
    rec("SimilarItems", "negative-k", pb.SimilarItemsRequest(item_id=ITEMS[1], k=-5), INVALID),
    rec("SimilarItems", "k-over-max", pb.SimilarItemsRequest(item_id=ITEMS[1], k=MAX_K + 1),
        INVALID),
    rec("EmbedText", "no-texts", pb.EmbedTextRequest(), INVALID, "texts is empty"),
    rec("EmbedText", "texts-over-max", pb.EmbedTextRequest(texts=["a"] * (MAX_TEXTS + 1)),
        INVALID, "max_texts"),
    rec("EmbedText", "empty-text", pb.EmbedTextRequest(texts=["fine", ""]), INVALID, "texts[1]"),
    rec("EmbedText", "text-over-max", pb.EmbedTextRequest(texts=["x" * (MAX_TEXT_BYTES + 1)]),
        INVALID, "max_text_bytes"),
    rec("EmbedText", "far-too-many-texts", pb.EmbedTextRequest(texts=["a"] * 100_000), INVALID),
    rec("GetModelInfo", "no-fields", pb.GetModelInfoRequest(), OK),
    # RecommendBatch and StreamRecommendations: the list is checked whole; strangers are no error
    *[row for method, request, limit, name in (
        ("RecommendBatch", pb.RecommendBatchRequest, MAX_BATCH, "max_batch_users"),
        ("StreamRecommendations", pb.StreamRecommendationsRequest, MAX_STREAM, "max_stream_users"),
    ) for row in (
        rec(method, "no-users", request(k=5), INVALID, "user_ids is empty"),
        rec(method, "empty-user", request(user_ids=[USERS[1], ""], k=5), INVALID, "user_ids[1]"),
        rec(method, "duplicate-user", request(user_ids=[USERS[1], USERS[2], USERS[1]], k=5),
            INVALID, "user_ids[2]"),
        rec(method, "users-over-max", request(user_ids=[f"u{i}" for i in range(limit + 1)], k=5),
            INVALID, name),
        rec(method, "users-far-over-max", request(user_ids=[f"u{i}" for i in range(100_000)]),
            INVALID, name),
        rec(method, "long-duplicate-user", request(user_ids=[LONG, LONG], k=5), INVALID,
            "more than once"),
        rec(method, "negative-k", request(user_ids=[USERS[1]], k=-1), INVALID, "k must be"),
        rec(method, "k-over-max", request(user_ids=[USERS[1]], k=MAX_K + 1), INVALID, "k must be"),
        rec(method, "k-int32-min", request(user_ids=[USERS[1]], k=-(2**31)), INVALID, "k must be"),
        rec(method, "model-version-not-loaded",
            request(user_ids=[USERS[1]], k=5, model=pb.ModelRef(version=99)), NOT_FOUND),
        rec(method, "model-other-name",
            request(user_ids=[USERS[1]], k=5, model=pb.ModelRef(name="other")), NOT_FOUND),
        rec(method, "unknown-users-are-not-found-entries",
            request(user_ids=["ghost", LONG, "u0001\x00", USERS[1]], k=5), OK),
        rec(method, "users-at-max", request(user_ids=USERS[:limit], k=MAX_K), OK),
    )],
    # RecordFeedback: the whole batch is checked first; one bad event refuses all of it
    feedback("no-events", INVALID, "events is empty"),
    feedback("events-over-max", INVALID, "max_feedback_events",
             *[event(n) for n in range(MAX_EVENTS + 1)]),
    feedback("events-far-over-max", INVALID, "max_feedback_events", *[event(0)] * 20_000),
    bad_event("empty-user", "user_id is empty", user_id=""),
    bad_event("user-over-max", "user_id is longer", user_id="u" * 513),
    bad_event("multibyte-user-over-max", "user_id is longer", user_id="é" * 257),
    bad_event("user-far-over-max", "user_id is longer", user_id=LONG),
    bad_event("empty-item", "item_id is empty", item_id=""),
    bad_event("unknown-item", "item_id 'nope'", item_id="nope"),
    bad_event("nul-item", "item_id", item_id=ITEMS[2] + "\x00"),
    bad_event("item-far-over-max", "item_id is longer", item_id=LONG),
    bad_event("rating-over-range", "rating", rating=5.5),
    bad_event("rating-under-range", "rating", rating=0.5),
    bad_event("rating-missing", "rating", rating=0.0),
    bad_event("rating-nan", "rating", rating=NAN),
    bad_event("rating-inf", "rating", rating=INF),
    bad_event("rating-minus-inf", "rating", rating=-INF),
    bad_event("rating-on-click", "rating", kind=CLICK, rating=3.0),
    bad_event("nan-on-click", "rating", kind=CLICK, rating=NAN),
    bad_event("kind-unspecified", "kind", kind=pb.FEEDBACK_KIND_UNSPECIFIED),
    bad_event("kind-unknown-number", "kind", kind=99),
    bad_event("kind-negative", "kind", kind=-1),
    bad_event("occurred-beyond-skew", "occurred_at",
              occurred_at=Timestamp(seconds=AN_HOUR_AHEAD_S)),
    bad_event("occurred-year-3000", "occurred_at", occurred_at=Timestamp(seconds=32_503_680_000)),
    bad_event("occurred-int64-max", "occurred_at", occurred_at=Timestamp(seconds=INT64_MAX)),
    bad_event("occurred-negative", "occurred_at", occurred_at=Timestamp(seconds=-1)),
    bad_event("occurred-int64-min", "occurred_at", occurred_at=Timestamp(seconds=-(2**63))),
    bad_event("nanos-negative", "occurred_at.nanos",
              occurred_at=Timestamp(seconds=1_700_000_000, nanos=-1)),
    bad_event("nanos-over-range", "occurred_at.nanos",
              occurred_at=Timestamp(seconds=1_700_000_000, nanos=1_000_000_000)),
    bad_event("key-over-max", "idempotency_key", idempotency_key="k" * 129),
    bad_event("multibyte-key-over-max", "idempotency_key", idempotency_key="é" * 65),
    bad_event("key-far-over-max", "idempotency_key", idempotency_key=LONG),
    # ... and the edges that are fine
    feedback("user-and-key-at-max", OK, "",
             event(40, user_id="u" * 512, idempotency_key="k" * 128)),
    feedback("every-kind", OK, "", event(41), event(42, kind=CLICK, rating=0.0),
             event(43, kind=pb.FEEDBACK_KIND_PURCHASE, rating=0.0),
             event(44, kind=pb.FEEDBACK_KIND_SKIP, rating=-0.0)),
    feedback("rating-range-ends", OK, "", event(45, rating=1.0), event(46, rating=5.0)),
    feedback("no-key", OK, "", event(47, idempotency_key="")),
    feedback("occurred-at-epoch", OK, "", event(48, occurred_at=Timestamp(seconds=0))),
    feedback("occurred-within-skew", OK, "",
             event(49, occurred_at=Timestamp(seconds=int(time.time()) + 60))),
    feedback("same-key-twice", OK, "", event(50), event(51, idempotency_key="bad-input-50")),
    feedback("events-at-max", OK, "", *[event(52 + n) for n in range(MAX_EVENTS)]),
    # ForgetUser: any non-empty id; forgetting someone unknown is no error. (None of these may
    # forget USERS[1], whom every test asks for afterwards.)
    forget("empty-user", "", INVALID, "user_id is empty"),
    forget("unknown-user", FORGOTTEN_USER, OK),
    forget("nul-after-a-known-user", USERS[1] + "\x00", OK),
    forget("blank-user", " ", OK),
    forget("long-user", LONG, OK),
    Case(path("oip", "ServerLive"), "no-fields", oip.ServerLiveRequest(), OK),
    Case(path("oip", "ServerReady"), "no-fields", oip.ServerReadyRequest(), OK),
    Case(path("oip", "ServerMetadata"), "no-fields", oip.ServerMetadataRequest(), OK),
    Case(path("oip", "ModelReady"), "unknown-model", oip.ModelReadyRequest(name="nope"), OK),
    Case(path("oip", "ModelReady"), "long-model", oip.ModelReadyRequest(name=LONG), OK),
    Case(path("oip", "ModelReady"), "unknown-version",
         oip.ModelReadyRequest(name=RANKER, version="99"), OK),
    Case(path("oip", "ModelMetadata"), "unknown-model", oip.ModelMetadataRequest(name="nope"),
         NOT_FOUND, "nope"),
    Case(path("oip", "ModelMetadata"), "long-model", oip.ModelMetadataRequest(name=LONG),
         NOT_FOUND),
    Case(path("oip", "ModelMetadata"), "unknown-version",
         oip.ModelMetadataRequest(name=ENCODER, version="99"), NOT_FOUND),
    Case(path("oip", "ModelMetadata"), "long-version",
         oip.ModelMetadataRequest(name=ENCODER, version=LONG), NOT_FOUND),
    infer("unknown-model", NOT_FOUND, model_name="nope", inputs=[users(USERS[1])]),
    infer("long-model", NOT_FOUND, model_name=LONG, inputs=[users(USERS[1])]),
    infer("unknown-version", NOT_FOUND, model_name=RANKER, model_version="7",
          inputs=[users(USERS[1])]),
    infer("no-inputs", INVALID, "needs input", model_name=RANKER),
    infer("unknown-input", INVALID, model_name=RANKER, inputs=[users(USERS[1]), texts("x")]),
    infer("long-input-name", INVALID, model_name=RANKER,
          inputs=[users(USERS[1]), tensor_bytes(LONG, [b"x"])]),
    infer("duplicate-input", INVALID, "more than once", model_name=RANKER,
          inputs=[users(USERS[1]), users(USERS[2])]),
    infer("wrong-datatype", INVALID, model_name=ENCODER,
          inputs=[Input(name="text", datatype="FP32", shape=[1],
                        contents=Contents(fp32_contents=[1.0]))]),
    infer("unsupported-datatype", INVALID, "datatype", model_name=RANKER,
          inputs=[users(USERS[1]), Input(name="k", datatype="FP64", shape=[1],
                                         contents=Contents(fp64_contents=[3.0]))]),
    infer("long-datatype", INVALID, model_name=RANKER,
          inputs=[Input(name="user_id", datatype=LONG, shape=[1])]),
    infer("negative-dimension", INVALID, "negative", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[-1],
                        contents=Contents(bytes_contents=[b"x"]))]),
    infer("wrong-rank", INVALID, "shape", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[1, 1],
                        contents=Contents(bytes_contents=[b"x"]))]),
    infer("shape-count-mismatch", INVALID, "elements", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[3],
                        contents=Contents(bytes_contents=[b"x"]))]),
    infer("huge-shape", INVALID, model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[INT64_MAX, INT64_MAX],
                        contents=Contents(bytes_contents=[b"x"]))]),
    infer("numeric-shape-huge-and-zero", INVALID, model_name=RANKER,
          inputs=[users(USERS[1]), Input(name="k", datatype="INT64", shape=[2**62, 0])]),
    infer("numeric-shape-70-dims", INVALID, model_name=RANKER,
          inputs=[users(USERS[1]), k_tensor(3, shape=[1] * 70)]),
    infer("raw-count-mismatch", INVALID, "raw_input_contents", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[1])],
          raw_input_contents=[b"\x01\x00\x00\x00x", b""]),
    infer("raw-and-typed", INVALID, "raw_input_contents", model_name=ENCODER,
          inputs=[texts("x")], raw_input_contents=[b"\x01\x00\x00\x00x"]),
    infer("raw-bytes-cut-length", INVALID, "length prefix", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[1])],
          raw_input_contents=[b"\x01\x00"]),
    infer("raw-bytes-claims-too-much", INVALID, "claims", model_name=ENCODER,
          inputs=[Input(name="text", datatype="BYTES", shape=[1])],
          raw_input_contents=[b"\xff\xff\xff\xffx"]),
    infer("raw-int-partial-element", INVALID, "whole number", model_name=RANKER,
          inputs=[Input(name="user_id", datatype="BYTES", shape=[1]),
                  Input(name="k", datatype="INT64", shape=[1])],
          raw_input_contents=[b"\x05\x00\x00\x00u0001", b"\x03\x00\x00"]),
    infer("raw-int-count-mismatch", INVALID, model_name=RANKER,
          inputs=[Input(name="user_id", datatype="BYTES", shape=[1]),
                  Input(name="k", datatype="INT32", shape=[1])],
          raw_input_contents=[b"\x05\x00\x00\x00u0001", b"\x03\x00\x00\x00" * 2]),
    infer("unknown-output", INVALID, "no output", model_name=RANKER, inputs=[users(USERS[1])],
          outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
    infer("duplicate-output", INVALID, "more than once", model_name=RANKER,
          inputs=[users(USERS[1])],
          outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="scores")] * 2),
    infer("no-users", INVALID, "empty", model_name=RANKER, inputs=[users()]),
    infer("invalid-utf8-user", INVALID, "UTF-8", model_name=RANKER,
          inputs=[tensor_bytes("user_id", [b"\xff\xfe"])]),
    infer("unknown-user", NOT_FOUND, model_name=RANKER, inputs=[users("ghost")]),
    infer("long-unknown-user", NOT_FOUND, model_name=RANKER, inputs=[users(LONG)]),
    infer("users-over-batch", INVALID, "ranking batch", model_name=RANKER,
          inputs=[users(*(USERS[i % 40] for i in range(65)))]),
    infer("negative-k", INVALID, "k must be", model_name=RANKER,
          inputs=[users(USERS[1]), k_tensor(-1)]),
    infer("k-int64-max", INVALID, "k must be", model_name=RANKER,
          inputs=[users(USERS[1]), k_tensor(INT64_MAX)]),
    infer("k-two-values", INVALID, "shape", model_name=RANKER,
          inputs=[users(USERS[1]), k_tensor(3, shape=[2])]),
    infer("explain-fp32", INVALID, "must be INT32", model_name=RANKER,
          inputs=[users(USERS[1]), Input(name="explain", datatype="FP32", shape=[1],
                                         contents=Contents(fp32_contents=[1.0]))]),
    infer("explain-two-values", INVALID, "shape", model_name=RANKER,
          inputs=[users(USERS[1]), Input(name="explain", datatype="INT32", shape=[2],
                                         contents=Contents(int_contents=[1, 1]))]),
    infer("explain-output-not-asked", INVALID, "explain", model_name=RANKER,
          inputs=[users(USERS[1])],
          outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="text_part")]),
    infer("explain-int64-max", OK, model_name=RANKER,
          inputs=[users(USERS[1]), Input(name="explain", datatype="INT64", shape=[1],
                                         contents=Contents(int64_contents=[INT64_MAX]))]),
    infer("empty-text", INVALID, "empty", model_name=ENCODER, inputs=[texts("ok", " ")]),
    infer("text-over-max", INVALID, "max_text_bytes", model_name=ENCODER,
          inputs=[texts("x" * (MAX_TEXT_BYTES + 1))]),
    infer("texts-over-max", INVALID, "max_texts", model_name=ENCODER,
          inputs=[texts(*["a"] * (MAX_TEXTS + 1))]),
    infer("invalid-utf8-text", INVALID, "UTF-8", model_name=ENCODER,
          inputs=[tensor_bytes("text", [b"ok \xc3\x28"])]),
    Case(path("oip", "RepositoryIndex"), "no-fields", oip.RepositoryIndexRequest(), OK),
    Case(path("oip", "RepositoryIndex"), "unknown-repository",
         oip.RepositoryIndexRequest(repository_name=LONG, ready=True), REFUSED | {OK}),
    control("RepositoryModelLoad", "unknown-model", Load(model_name="nope")),
    control("RepositoryModelLoad", "empty-model", Load(model_name="")),
    control("RepositoryModelLoad", "long-model", Load(model_name=LONG)),
    control("RepositoryModelLoad", "path-traversal", Load(model_name="../tiny")),
    control("RepositoryModelLoad", "absolute-path", Load(model_name="/etc")),
    control("RepositoryModelLoad", "nul-in-name", Load(model_name="tiny\x00")),
    control("RepositoryModelLoad", "file-override",
            Load(model_name="nope", parameters=FILE_PARAMETER)),
    control("RepositoryModelLoad", "unknown-repository",
            Load(repository_name="elsewhere", model_name="nope")),
    served_load("superscript-version", versioned("²")),
    served_load("arabic-indic-version", versioned("٣")),
    served_load("5000-digit-version", versioned("9" * 5000)),
    served_load("negative-version", versioned(-1)),
    served_load("int64-max-version", versioned(INT64_MAX)),
    served_load("unknown-version", versioned(7)),
    served_load("bool-version", {"version": P(bool_param=True)}),
    served_load("config-superscript-version", versioned("²", key="config")),
    served_load("config-5000-digit-number", {"config": P(string_param=(
        '{"version_policy": {"specific": {"versions": [' + "9" * 5000 + "]}}}"))}),
    served_load("config-two-versions", {"config": P(string_param=json.dumps(
        {"version_policy": {"specific": {"versions": [1, 2]}}}))}),
    served_load("config-not-json", {"config": P(string_param="{version_policy")}),
    served_load("config-deeply-nested", {"config": P(string_param="[" * 100_000 + "]" * 100_000)}),
    served_load("config-as-bytes", {"config": P(bytes_param=b"\xff")}),
    served_load("unload-no-version", {}),
    served_load("unload-the-only-version", versioned(1)),
    served_load("unload-superscript-version", versioned("²")),
    control("RepositoryModelUnload", "unknown-model", Unload(model_name="nope")),
    control("RepositoryModelUnload", "empty-model", Unload(model_name="")),
    control("RepositoryModelUnload", "long-model", Unload(model_name=LONG)),
    control("RepositoryModelUnload", "path-traversal", Unload(model_name="../tiny")),
    Case(path("health", "Check"), "unknown-service",
         health_pb2.HealthCheckRequest(service="nope"), NOT_FOUND),
    Case(path("health", "Check"), "long-service", health_pb2.HealthCheckRequest(service=LONG),
         NOT_FOUND),
    Case(path("health", "List"), "no-fields", health_pb2.HealthListRequest(), OK),
    # Watch answers an unknown service with a SERVICE_UNKNOWN message, not an error status.
    Case(path("health", "Watch"), "unknown-service",
         health_pb2.HealthCheckRequest(service="nope"), OK),
    Case(path("health", "Watch"), "long-service", health_pb2.HealthCheckRequest(service=LONG), OK),
    # Reflection answers lookups of unknown names with an error_response message.
    Case(path("reflection", "ServerReflectionInfo"), "unknown-file",
         reflection_pb2.ServerReflectionRequest(file_by_filename="nope.proto"), OK),
    Case(path("reflection", "ServerReflectionInfo"), "long-symbol",
         reflection_pb2.ServerReflectionRequest(file_containing_symbol=LONG), OK),
    Case(path("reflection", "ServerReflectionInfo"), "unknown-extension",
         reflection_pb2.ServerReflectionRequest(file_containing_extension=(
             reflection_pb2.ExtensionRequest(containing_type="nope", extension_number=-1))), OK),
    Case(path("reflection", "ServerReflectionInfo"), "nothing-asked",
         reflection_pb2.ServerReflectionRequest(), OK),
]  # fmt: skip
