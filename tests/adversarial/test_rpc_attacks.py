"""Every RPC attacked four ways through real gRPC: bad input, oversize, garbage bytes, overload.

Each attack is a table with one row (or more) per method; `test_every_method_has_every_attack`
fails when the server serves a method that a table lacks, so a new RPC cannot ship untested.
A client mistake must never be answered UNKNOWN or INTERNAL (see `rpcs.ALLOWED`), the status
message must stay short, and the server must be healthy after each attack.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeAlias

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.parser import text_string_to_metric_families

from adversarial.conftest import AdversarialServer
from adversarial.rpcs import (
    ENCODER,
    ITEMS,
    MAX_RECEIVE_BYTES,
    RANKER,
    RPCS,
    USERS,
    VALID,
    Code,
    Kind,
    Outcome,
    assert_healthy,
    invoke,
    path,
    served_methods,
    tensor_bytes,
    tracebacks,
)  # fmt: skip
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.v1 import recommender_pb2 as pb

LIMITS = {"max_k": 50, "max_item_ids": 20, "max_texts": 12, "max_text_bytes": 400}
# Overload is made deterministic by slow fillers: with a 1 s encoder window, each admitted
# RecommendForText holds one of the `max_concurrent_rpcs` slots for about a second.
SERVER_SETTINGS = {
    **LIMITS,
    "max_concurrent_rpcs": 4,
    "grpc_max_workers": 8,
    "encoder_max_queue_delay_us": 1_000_000,
    "encoder_max_batch_size": 64,
    "encoder_max_queue_size": 64,
}
MAX_K, MAX_IDS = LIMITS["max_k"], LIMITS["max_item_ids"]
MAX_TEXTS, MAX_TEXT_BYTES = LIMITS["max_texts"], LIMITS["max_text_bytes"]
LONG = "y" * 20_000  # echoed at full length, this passes the 16 KB metadata limit
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
Input: TypeAlias = oip.ModelInferRequest.InferInputTensor
Contents = oip.InferTensorContents


@pytest.fixture(autouse=True)
def healthy_after(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> Iterator[None]:
    """After every attack: SERVING, a valid call answers, and no traceback was logged."""
    logged = len(adversarial_server.log())
    yield
    assert_healthy(adversarial_channel)
    new = tracebacks(adversarial_server.log()[logged:])
    assert not new, f"the server logged {len(new)} traceback(s) for a client mistake: {new[:3]}"


# -- bad input: one row per validation rule ---------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A request to `path` and the status it must get (`says`: part of the message).

    `code` may be a set where more than one answer is right (a control call refused because
    model control is off, or because the model does not exist).
    """

    path: str
    name: str
    request: Message
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


TOO_MANY_IDS = list(ITEMS[: MAX_IDS + 1])
R, T, S = pb.RecommendRequest, pb.RecommendForTextRequest, pb.ScoreItemsRequest
INVALID, NOT_FOUND, OK = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.OK
REFUSED = frozenset({INVALID, NOT_FOUND, Code.FAILED_PRECONDITION})
Load, Unload = oip.RepositoryModelLoadRequest, oip.RepositoryModelUnloadRequest
FILE_PARAMETER = {"file:1/model.onnx": oip.ModelRepositoryParameter(bytes_param=b"\x00" * 64)}

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


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda c: c.id)
def test_bad_input(adversarial_channel: grpc.Channel, case: Case) -> None:
    outcome = invoke(adversarial_channel, RPCS[case.path], case.request.SerializeToString())
    assert outcome.problem() is None, outcome.problem()
    assert outcome.code in case.codes, (outcome.code, outcome.details[:300])
    assert case.says in outcome.details


# -- oversize: over the transport's limit, and just under it ----------------------------------

UNKNOWN_FIELD = 536_870_911  # the largest field number: never a field of any request
NEAR_LIMIT = MAX_RECEIVE_BYTES - 64 * 1024


def with_unknown_field(payload: bytes, size: int) -> bytes:
    """`payload` plus an unknown length-delimited field of `size` bytes (still valid protobuf)."""
    return payload + _varint(UNKNOWN_FIELD << 3 | 2) + _varint(size) + b"u" * size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("method", sorted(RPCS))
def test_oversize_message_is_resource_exhausted(
    adversarial_channel: grpc.Channel, method: str
) -> None:
    payload = with_unknown_field(VALID[method].SerializeToString(), MAX_RECEIVE_BYTES + 1024)
    outcome = invoke(adversarial_channel, RPCS[method], payload)
    assert outcome.problem() is None, outcome.problem()
    assert outcome.code == Code.RESOURCE_EXHAUSTED, (outcome.code, outcome.details)


@pytest.mark.parametrize("method", sorted(RPCS))
def test_message_just_under_the_limit_is_answered(
    adversarial_channel: grpc.Channel, method: str
) -> None:
    # Unknown fields are legal (forward compatibility): the answer is VALID's, or a refusal.
    plain = VALID[method].SerializeToString()
    expected = invoke(adversarial_channel, RPCS[method], plain).code
    outcome = invoke(adversarial_channel, RPCS[method], with_unknown_field(plain, NEAR_LIMIT))
    assert outcome.problem() is None, outcome.problem()
    assert outcome.code in (expected, Code.RESOURCE_EXHAUSTED), (outcome.code, outcome.details)


# -- garbage: bytes that are not the request message ------------------------------------------

GARBAGE: dict[str, bytes] = {
    "all-ones": b"\xff" * 16,
    "field-zero": b"\x00\x01",
    "wire-type-7": b"\x0f\x00",
    "unterminated-varint": b"\x10\x80",
    "length-past-end": b"\x0a\x10abc",
    "huge-length": b"\x0a\xff\xff\xff\xff\x0f",
    "open-group": b"\x0b",
    "deep-groups": _varint(1000 << 3 | 3) * 200 + _varint(1000 << 3 | 4) * 200,
    "invalid-utf8-field-1": b"\x0a\x02\xc3\x28",
    "http": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "json": b'{"user_id": "u0001", "k": 5}',
}


def test_garbage_table_is_not_protobuf() -> None:
    """Each payload must fail to parse for most request types, or the table tests little.

    (Some parse where a request has no fields, or no string field 1: such calls must merely
    get an allowed status.)
    """
    for name, payload in GARBAGE.items():
        refused = [m for m, rpc in RPCS.items() if not rpc.decodes(payload)]
        assert len(refused) > len(RPCS) // 2, f"{name} parses for most requests"


@pytest.mark.parametrize("name", sorted(GARBAGE))
@pytest.mark.parametrize("method", sorted(RPCS))
def test_garbage_is_invalid_argument(
    adversarial_channel: grpc.Channel, method: str, name: str
) -> None:
    rpc = RPCS[method]
    outcome = invoke(adversarial_channel, rpc, GARBAGE[name])
    assert outcome.problem() is None, outcome.problem()
    if not rpc.decodes(GARBAGE[name]):
        assert outcome.code == Code.INVALID_ARGUMENT, (outcome.code, outcome.details)


def counted(
    server: AdversarialServer, method: str, code: str | None = None, series: str = "handled"
) -> float:
    """grpc_server_<series>_total of one method (and code; None: any), scraped from /metrics."""
    with urllib.request.urlopen(server.process.metrics_url, timeout=5) as response:
        text = response.read().decode()
    service, name = method.lstrip("/").rsplit("/", 1)
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"grpc_server_{series}_total"
        and (s.labels.get("grpc_service"), s.labels.get("grpc_method")) == (service, name)
        and code in (None, s.labels.get("grpc_code"))
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll for the server's bookkeeping to catch up (a wait, never a speed assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("method", sorted(RPCS))
def test_garbage_is_counted(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str
) -> None:
    before = counted(adversarial_server, method, "INVALID_ARGUMENT")
    invoke(adversarial_channel, RPCS[method], GARBAGE["all-ones"])
    assert wait_until(lambda: counted(adversarial_server, method, "INVALID_ARGUMENT") > before)
    assert counted(adversarial_server, method, "INVALID_ARGUMENT") == before + 1


# -- abandoned streams: the client cancels mid-stream ------------------------------------------


@pytest.mark.parametrize("method", sorted(m for m, r in RPCS.items() if r.kind is not Kind.UNARY))
def test_cancelled_stream_ends_quietly(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str
) -> None:
    """A client that walks away from a stream is no server fault: the call ends, nothing logged.

    The stream is cancelled once the server is surely waiting on it: a server stream after its
    first response, a bidirectional one once its handler has started and waits for a request.
    """
    rpc, payload = RPCS[method], VALID[method].SerializeToString()
    started, ended = (counted(adversarial_server, method, series=s) for s in ("started", "handled"))
    release = threading.Event()

    def hold() -> Iterator[bytes]:
        release.wait(30.0)
        yield payload

    if rpc.kind is Kind.BIDI_STREAM:
        call = adversarial_channel.stream_stream(method)(hold(), timeout=30.0)
        assert wait_until(lambda: counted(adversarial_server, method, series="started") > started)
    else:
        call = adversarial_channel.unary_stream(method)(payload, timeout=30.0)
        next(call)
    call.cancel()
    release.set()
    assert wait_until(lambda: counted(adversarial_server, method) > ended), "the stream never ended"


# -- overload: more concurrent calls than the server admits -----------------------------------

FILLER = path("rec", "RecommendForText")
TARGETS = 4


@pytest.mark.parametrize("method", sorted(RPCS))
def test_overload_is_resource_exhausted(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str
) -> None:
    limit = adversarial_server.settings["max_concurrent_rpcs"]
    filler, target = RPCS[FILLER], RPCS[method]
    expected = invoke(adversarial_channel, target, VALID[method].SerializeToString()).code

    def fill() -> Outcome:
        return invoke(adversarial_channel, filler, VALID[FILLER].SerializeToString(), 30.0)

    def attack() -> Outcome:
        return invoke(adversarial_channel, target, VALID[method].SerializeToString(), 30.0)

    with ThreadPoolExecutor(limit + 2 + TARGETS) as pool:
        fillers = [pool.submit(fill) for _ in range(limit + 2)]
        # The surplus fillers are refused at once; the admitted ones hold every slot for ~1 s.
        wait(fillers, timeout=30.0, return_when=FIRST_COMPLETED)
        targets = [pool.submit(attack) for _ in range(TARGETS)]
        filled = [f.result() for f in fillers]
        attacked = [f.result() for f in targets]
    assert all(o.code in (Code.OK, Code.RESOURCE_EXHAUSTED) for o in filled), filled
    assert any(o.code == Code.RESOURCE_EXHAUSTED for o in filled), filled
    assert all(o.code in (expected, Code.RESOURCE_EXHAUSTED) for o in attacked), attacked
    assert all(o.problem() is None for o in attacked), attacked


# -- coverage: a served method without a row fails here ---------------------------------------


def test_every_method_has_every_attack(adversarial_channel: grpc.Channel) -> None:
    served = served_methods(adversarial_channel)
    assert served == set(RPCS), f"untested: {served - set(RPCS)}; gone: {set(RPCS) - served}"
    assert served == set(VALID)  # oversize, garbage and overload start from VALID
    assert served == {c.path for c in BAD_INPUT}
