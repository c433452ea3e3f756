"""Every RPC the server answers, how to call any of them with raw bytes, and what a caller may see.

The suite attacks the server the way a hostile client would: it sends bytes, not objects, so a
request can be well-typed, mutated or plain garbage through one code path (a multicallable whose
serializer is the identity). `RPCS` is derived from the protos of the four services the server
registers, and `served_methods` asks the running server (reflection) what it really serves, so a
new RPC or service shows up as a coverage failure instead of going untested.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.server.config import ServerConfig
from bertrec.v1 import recommender_pb2 as pb

Code = grpc.StatusCode

# What a client mistake may be answered with. UNKNOWN and INTERNAL never: they mean the server
# failed on input it should have rejected. CANCELLED never either: the client did not cancel.
# UNIMPLEMENTED only for a method the server does not have (checked where such calls are made).
ALLOWED = frozenset({
    Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED,
    Code.FAILED_PRECONDITION, Code.DEADLINE_EXCEEDED,
})  # fmt: skip
# Status messages travel in HTTP/2 trailers; one that echoes input at full length can pass the
# peer's metadata limit and turn into a different error. Anything near 1 KB is an echo.
MAX_DETAILS_BYTES = 1024
CALL_TIMEOUT_S = 10.0
# The largest request the servers accept (their max_request_bytes, grpc's default size).
MAX_REQUEST_BYTES = 4 * 1024 * 1024

MODEL = "tiny"
# The request limits every adversarial server runs with (small, so "over" is cheap to send).
LIMITS: Mapping[str, int] = {"max_k": 50, "max_item_ids": 20, "max_texts": 12,
                             "max_text_bytes": 400, "max_feedback_events": 8,
                             "max_batch_users": 6, "max_stream_users": 30}  # fmt: skip
# Load and unload parse their parameters only where explicit model control is on. (Probed so
# the suite also runs on servers from before the setting: there every load is refused unread.)
CONTROL: Mapping[str, int | str] = (
    {"model_control": "explicit"}
    if "model_control" in {f.name for f in dataclasses.fields(ServerConfig)}
    else {}
)
ENCODER, RANKER = f"{MODEL}-encoder", f"{MODEL}-ranker"
# The ids of tests/fakes.py's model: 40 users and 60 items.
USERS = tuple(f"u{i:04d}" for i in range(40))
ITEMS = tuple(f"item-{i:05d}" for i in range(60))
# Feedback goes to users of its own: `assert_healthy` asks for USERS[1]'s recommendations after
# every attack, so no attack may forget USERS[1] or fill its list with rated items.
FEEDBACK_USER = "adversary-feedback"  # a cold user, known once its first event is stored
FORGOTTEN_USER = "adversary-forgotten"  # never has events: forgetting it is harmless


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    BIDI_STREAM = "bidi_stream"


@dataclass(frozen=True)
class Rpc:
    """One method: its path, its kind and its request message class."""

    path: str
    kind: Kind
    request: type[Message]

    def decodes(self, payload: bytes) -> bool:
        """Whether the server can parse `payload` (same protobuf runtime as the server)."""
        try:
            self.request.FromString(payload)
        except DecodeError:
            return False
        return True


def _rpcs(*services: ServiceDescriptor) -> dict[str, Rpc]:
    rpcs = {}
    for service in services:
        for method in service.methods:
            kind = (Kind.BIDI_STREAM if method.client_streaming
                    else Kind.SERVER_STREAM if method.server_streaming else Kind.UNARY)  # fmt: skip
            request = message_factory.GetMessageClass(method.input_type)
            rpcs[f"/{service.full_name}/{method.name}"] = Rpc(
                f"/{service.full_name}/{method.name}", kind, request
            )
    return rpcs


RPCS: Mapping[str, Rpc] = _rpcs(
    pb.DESCRIPTOR.services_by_name["RecommenderService"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)


def path(service: str, method: str) -> str:
    """The full path of a method of one of the served services, checked to exist."""
    full = {"rec": "bertrec.v1.RecommenderService", "oip": "inference.GRPCInferenceService",
            "health": "grpc.health.v1.Health",
            "reflection": "grpc.reflection.v1alpha.ServerReflection"}[service]  # fmt: skip
    name = f"/{full}/{method}"
    assert name in RPCS, name
    return name


def tensor_bytes(name: str, values: list[bytes]) -> oip.ModelInferRequest.InferInputTensor:
    """A BYTES input tensor of shape [len(values)] with typed contents."""
    return oip.ModelInferRequest.InferInputTensor(
        name=name, datatype="BYTES", shape=[len(values)],
        contents=oip.InferTensorContents(bytes_contents=values),
    )  # fmt: skip


# One well-formed, harmless request per method: the base that attacks start from. The server
# answers each OK, except the model-control calls, whose harmless form names a model that does
# not exist (loading or unloading the served model would change what later tests see).
VALID: Mapping[str, Message] = {
    path("rec", "Recommend"): pb.RecommendRequest(user_id=USERS[1], k=5),
    path("rec", "RecommendForText"): pb.RecommendForTextRequest(text="a film about the sea", k=5),
    path("rec", "ScoreItems"): pb.ScoreItemsRequest(user_id=USERS[1], item_ids=ITEMS[:3]),
    path("rec", "SimilarItems"): pb.SimilarItemsRequest(item_id=ITEMS[1], k=5),
    path("rec", "EmbedText"): pb.EmbedTextRequest(texts=["a film about the sea"]),
    path("rec", "GetModelInfo"): pb.GetModelInfoRequest(),
    path("rec", "RecommendBatch"): pb.RecommendBatchRequest(user_ids=USERS[1:4], k=5),
    path("rec", "StreamRecommendations"): pb.StreamRecommendationsRequest(
        user_ids=USERS[1:20], k=5
    ),
    # One rating under one fixed key: the first call stores it, every later one is a duplicate.
    path("rec", "RecordFeedback"): pb.RecordFeedbackRequest(
        events=[
            pb.FeedbackEvent(
                user_id=FEEDBACK_USER,
                item_id=ITEMS[1],
                kind=pb.FEEDBACK_KIND_RATING,
                rating=4.0,
                idempotency_key="adversarial-valid",
            )
        ]
    ),
    path("rec", "ForgetUser"): pb.ForgetUserRequest(user_id=FORGOTTEN_USER),
    path("oip", "ServerLive"): oip.ServerLiveRequest(),
    path("oip", "ServerReady"): oip.ServerReadyRequest(),
    path("oip", "ModelReady"): oip.ModelReadyRequest(name=RANKER),
    path("oip", "ServerMetadata"): oip.ServerMetadataRequest(),
    path("oip", "ModelMetadata"): oip.ModelMetadataRequest(name=ENCODER),
    path("oip", "ModelInfer"): oip.ModelInferRequest(
        model_name=RANKER, inputs=[tensor_bytes("user_id", [USERS[1].encode()])]
    ),
    path("oip", "RepositoryIndex"): oip.RepositoryIndexRequest(),
    path("oip", "RepositoryModelLoad"): oip.RepositoryModelLoadRequest(model_name="nope"),
    path("oip", "RepositoryModelUnload"): oip.RepositoryModelUnloadRequest(model_name="nope"),
    path("health", "Check"): health_pb2.HealthCheckRequest(service=""),
    path("health", "List"): health_pb2.HealthListRequest(),
    path("health", "Watch"): health_pb2.HealthCheckRequest(service=""),
    path("reflection", "ServerReflectionInfo"): reflection_pb2.ServerReflectionRequest(
        list_services=""
    ),
}


@dataclass(frozen=True)
class Outcome:
    """How a call ended: for streams, how the first response (or the stream) ended."""

    code: grpc.StatusCode
    details: str

    def problem(self) -> str | None:
        """Why this is not an acceptable answer to a client mistake, or None."""
        if self.code not in ALLOWED:
            return f"status {self.code.name}: {self.details[:300]!r}"
        size = len(self.details.encode("utf-8", "replace"))
        if size >= MAX_DETAILS_BYTES:
            return f"status message of {size} bytes: {self.details[:120]!r}..."
        return None


def invoke(
    channel: grpc.Channel, rpc: Rpc, payload: bytes, timeout_s: float = CALL_TIMEOUT_S
) -> Outcome:
    """Send `payload` as the request of `rpc`, unparsed, and report how the call ended.

    A server stream counts as accepted once its first response arrives; it is then cancelled
    (Watch never ends by itself). A bidirectional stream sends the one request, half-closes and
    is read to its end, as a well-behaved client would (cancelling streams is its own test).
    """
    try:
        if rpc.kind is Kind.UNARY:
            channel.unary_unary(rpc.path)(payload, timeout=timeout_s)
            return Outcome(Code.OK, "")
        if rpc.kind is Kind.BIDI_STREAM:
            for _ in channel.stream_stream(rpc.path)(iter([payload]), timeout=timeout_s):
                pass
            return Outcome(Code.OK, "")
        call = channel.unary_stream(rpc.path)(payload, timeout=timeout_s)
        try:
            next(call)
        except StopIteration:
            return Outcome(call.code(), call.details() or "")
        finally:
            call.cancel()
        return Outcome(Code.OK, "")
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")


def served_methods(channel: grpc.Channel) -> set[str]:
    """The paths of every method of every service the server lists through reflection.

    Each question is one half-closed reflection stream read to its end, as grpcurl asks: a
    stream left open and later cancelled would be an attack of its own.
    """
    info = RPCS[path("reflection", "ServerReflectionInfo")].path

    def ask(**question: str) -> reflection_pb2.ServerReflectionResponse:
        request = reflection_pb2.ServerReflectionRequest(**question).SerializeToString()
        (raw,) = list(channel.stream_stream(info)(iter([request]), timeout=CALL_TIMEOUT_S))
        return reflection_pb2.ServerReflectionResponse.FromString(raw)

    methods = set()
    for service in ask(list_services="").list_services_response.service:
        found = ask(file_containing_symbol=service.name).file_descriptor_response
        for raw in found.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for declared in file.service:
                if f"{file.package}.{declared.name}".lstrip(".") == service.name:
                    methods |= {f"/{service.name}/{m.name}" for m in declared.method}
    return methods


def assert_healthy(channel: grpc.Channel) -> None:
    """Health/Check says SERVING and a valid Recommend still answers with items."""
    check = RPCS[path("health", "Check")]
    response = channel.unary_unary(check.path)(b"", timeout=CALL_TIMEOUT_S)
    status = health_pb2.HealthCheckResponse.FromString(response).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"health is {status} after the attack"
    request = VALID[path("rec", "Recommend")].SerializeToString()
    raw = channel.unary_unary(path("rec", "Recommend"))(request, timeout=CALL_TIMEOUT_S)
    assert len(pb.RecommendResponse.FromString(raw).items) == 5


def tracebacks(log: str) -> list[str]:
    """The tracebacks in a server log excerpt, each as its last line (the exception)."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    return [b.strip().splitlines()[-1][:200] for b in blocks if b.strip()]
