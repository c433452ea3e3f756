"""Hypothesis strategies for every RPC: well-typed hostile requests, and raw-byte mutations.

`STRATEGIES` maps each method path to a strategy of request messages whose every field is
hostile somewhere in its range (huge or negative k, empty, blank, unicode, NUL and very long
strings, unknown and duplicate ids, tensors whose shapes, datatypes and byte lengths disagree,
model-control parameters that do not parse, feedback events whose every field is wrong
somewhere: kind numbers past the enum, NaN ratings, timestamps past the year 3000 or before
1970, keys over 128 bytes); `mutated(method)` serializes one and damages its
bytes (bit flips, truncation, insertions, random bytes, a string field re-sent as invalid UTF-8).
Values sit on both sides of the limits in `rpcs.LIMITS`, the limits the servers run with.
"""

from __future__ import annotations

import json
import time

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from adversarial.rpcs import (
    ENCODER,
    FEEDBACK_USER,
    FORGOTTEN_USER,
    ITEMS,
    LIMITS,
    MODEL,
    RANKER,
    RPCS,
    USERS,
    VALID,
    path,
)
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.v1 import recommender_pb2 as pb

MAX_K, MAX_IDS = LIMITS["max_k"], LIMITS["max_item_ids"]
MAX_TEXTS, MAX_TEXT_BYTES = LIMITS["max_texts"], LIMITS["max_text_bytes"]
MAX_EVENTS = LIMITS["max_feedback_events"]

# -- hostile values ----------------------------------------------------------------------------

EDGE_STRINGS = [
    "", " ", "\t\n", "\x00", "a\x00b", "\u3000", "\ufeff", "\u200b", "\u202e", "🙂" * 4,
    "x" * MAX_TEXT_BYTES, "x" * (MAX_TEXT_BYTES + 1), "é" * (MAX_TEXT_BYTES // 2),
    "é" * (MAX_TEXT_BYTES // 2 + 1), "%s%n{}", "'\"\\",
]  # fmt: skip
strings = st.one_of(
    st.text(max_size=30),
    st.sampled_from(EDGE_STRINGS),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=MAX_TEXT_BYTES - 5, max_size=420),
    st.integers(1_000, 40_000).map(lambda n: "y" * n),
)
users = st.one_of(st.sampled_from(USERS), strings)
items = st.one_of(st.sampled_from(ITEMS), strings)
item_lists = st.one_of(
    st.lists(items, max_size=MAX_IDS + 3),
    st.lists(st.sampled_from(ITEMS), min_size=2, max_size=MAX_IDS + 3),  # duplicates likely
    st.integers(MAX_IDS + 1, 3_000).map(lambda n: [f"i{j}" for j in range(n)]),
)
user_lists = st.one_of(
    st.lists(users, max_size=LIMITS["max_batch_users"] + 2),
    st.lists(st.sampled_from(USERS), min_size=2, max_size=12),  # duplicates likely
    st.integers(LIMITS["max_batch_users"], 3_000).map(lambda n: [f"u{j}" for j in range(n)]),
)
ks = st.one_of(
    st.integers(-3, MAX_K + 3),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([-(2**31), 2**31 - 1, 0, MAX_K, MAX_K + 1]),
)
texts = st.one_of(strings, st.sampled_from(["a film about the sea", "robots in space"]))
int64s = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 60))
dims = st.one_of(
    st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([0, 2**31, 2**62, 2**63 - 1])),
             max_size=4),
    st.integers(60, 70).map(lambda n: [1] * n),
)  # fmt: skip
binaries = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([u.encode() for u in USERS[:3]] + [b"\xff\xfe", b"\xc3\x28"]),
)
model_names = st.one_of(st.sampled_from([ENCODER, RANKER, "tiny", ""]), strings)
versions = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "01"]), strings)

# -- well-typed hostile messages, one strategy per method ---------------------------------------


def _maybe_exclude_rated(draw: st.DrawFn) -> dict[str, bool]:
    value = draw(st.none() | st.booleans())
    return {} if value is None else {"exclude_rated": value}


@st.composite
def recommend(draw: st.DrawFn) -> Message:
    return pb.RecommendRequest(
        user_id=draw(users), k=draw(ks), include_item_ids=draw(item_lists),
        exclude_item_ids=draw(item_lists), **_maybe_exclude_rated(draw),
    )  # fmt: skip


@st.composite
def contents(draw: st.DrawFn) -> oip.InferTensorContents:
    """Typed tensor contents with any mix of element fields, values hostile."""
    fields = {
        "bytes_contents": st.lists(binaries, max_size=6),
        "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
        "int64_contents": st.lists(int64s, max_size=4),
        "fp32_contents": st.lists(st.floats(width=32), max_size=4),
        "fp64_contents": st.lists(st.floats(), max_size=4),
        "bool_contents": st.lists(st.booleans(), max_size=4),
        "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=4),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True))
    return oip.InferTensorContents(**{name: draw(fields[name]) for name in chosen})


def _framed(elements: list[bytes]) -> bytes:
    """A raw BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


raw_entries = st.one_of(
    st.binary(max_size=40),
    st.lists(binaries, max_size=5).map(_framed),
    st.integers(-(2**63), 2**63 - 1).map(lambda k: k.to_bytes(8, "little", signed=True)),
    st.integers(-(2**31), 2**31 - 1).map(lambda k: k.to_bytes(4, "little", signed=True)),
)


@st.composite
def input_tensor(draw: st.DrawFn) -> oip.ModelInferRequest.InferInputTensor:
    name = draw(st.one_of(st.sampled_from(["text", "user_id", "k"]), strings))
    datatype = draw(st.one_of(
        st.sampled_from(["BYTES", "INT32", "INT64", "FP32", "FP64", "BOOL", "UINT8", ""]),
        strings,
    ))  # fmt: skip
    tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=draw(dims))
    if draw(st.booleans()):
        tensor.contents.CopyFrom(draw(contents()))
    return tensor


def _shape(count: int) -> st.SearchStrategy[list[int]]:
    """Mostly the shape that matches `count` elements, sometimes any hostile shape."""
    return st.one_of(st.just([count]), st.just([count]), st.just([count]), dims)


def _add_bytes(
    request: oip.ModelInferRequest, name: str, elements: list[bytes], shape: list[int], raw: bool
) -> None:
    tensor = request.inputs.add(name=name, datatype="BYTES", shape=shape)
    if raw:
        request.raw_input_contents.append(_framed(elements))
    else:
        tensor.contents.bytes_contents.extend(elements)


def _add_k(
    request: oip.ModelInferRequest, datatype: str, value: int, shape: list[int], raw: bool
) -> None:
    bits = 32 if datatype == "INT32" else 64
    value = max(min(value, 2 ** (bits - 1) - 1), -(2 ** (bits - 1)))
    tensor = request.inputs.add(name="k", datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(value.to_bytes(bits // 8, "little", signed=True))
    elif bits == 32:
        tensor.contents.int_contents.append(value)
    else:
        tensor.contents.int64_contents.append(value)


@st.composite
def plausible_infer(draw: st.DrawFn) -> Message:
    """Right names and datatypes, hostile values: the paths past the tensor checks."""
    raw = draw(st.booleans())
    if draw(st.booleans()):
        model, name, values = ENCODER, "text", texts
    else:
        model, name, values = RANKER, "user_id", users
    elements = draw(st.lists(st.one_of(values.map(str.encode), binaries), max_size=70))
    request = oip.ModelInferRequest(model_name=model, id=draw(st.text(max_size=10)))
    _add_bytes(request, name, elements, draw(_shape(len(elements))), raw)
    if model == RANKER and draw(st.booleans()):
        datatype = draw(st.sampled_from(["INT32", "INT64"]))
        _add_k(request, datatype, draw(int64s), draw(_shape(1)), raw)
    outputs = st.one_of(st.sampled_from(["item_ids", "scores", "embedding"]), strings)
    for output in draw(st.lists(outputs, max_size=3)):
        request.outputs.add(name=output)
    return request


@st.composite
def chaotic_infer(draw: st.DrawFn) -> Message:
    """Anything well-typed: unknown models, mismatched raw entries, odd parameters."""
    request = oip.ModelInferRequest(
        model_name=draw(model_names), model_version=draw(versions), id=draw(strings),
        inputs=draw(st.lists(input_tensor(), max_size=4)),
        raw_input_contents=draw(st.lists(raw_entries, max_size=4)),
    )  # fmt: skip
    for key in draw(st.lists(st.text(max_size=8), max_size=3)):
        request.parameters[key].int64_param = draw(int64s)
    for name in draw(st.lists(strings, max_size=2)):
        request.outputs.add(name=name)
    return request


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8,
)
version_texts = st.one_of(
    st.sampled_from(["1", "2", "0", "-1", "01", "²", "٣", "1e3", " 1", "9" * 5000]), strings
)


def _pinning(version: str) -> str:
    return '{"version_policy": {"specific": {"versions": [' + version + "]}}}"


# Nesting and number sizes around the JSON parser's limits (recursion, int digits), and the
# near-misses of Triton's version policy.
NASTY_CONFIGS = [
    "[" * 999 + "]" * 999, "[" * 100_000 + "]" * 100_000, _pinning("9" * 4_300),
    _pinning("9" * 4_301), _pinning('"²"'), _pinning('"9"' * 2), _pinning("1, 2"), _pinning(""),
    '{"version_policy": {"latest": {"num_versions": -1}}}', '{"version_policy": null}',
    '{"versionPolicy": []}', "null", "[]", '"x"', "{",
]  # fmt: skip
configs = st.one_of(
    st.sampled_from(NASTY_CONFIGS),
    json_values.map(lambda v: json.dumps({"version_policy": v})),
    version_texts.map(lambda v: json.dumps({"version_policy": {"specific": {"versions": [v]}}})),
    json_values.map(json.dumps),
    strings,
)


P = oip.ModelRepositoryParameter
version_parameters = st.one_of(
    st.builds(P, int64_param=int64s), st.builds(P, string_param=version_texts),
    st.builds(P, bool_param=st.booleans()),
)  # fmt: skip
config_parameters = st.one_of(
    st.builds(P, string_param=configs), st.builds(P, bytes_param=st.binary())
)
other_parameters = st.dictionaries(
    st.one_of(st.sampled_from(["file:1/model.onnx", "file:../x"]), strings),
    st.one_of(st.builds(P, string_param=strings), st.builds(P, bytes_param=st.binary())),
    max_size=2,
)
# Naming the served model is safe (bertrec never unloads the only loaded version), and only a
# known model gets its parameters read: so most requests name it, with a "version" (read
# first) or only a "config" (read when no version is given).
served_names = st.sampled_from([MODEL, ENCODER, RANKER])
hostile_names = st.one_of(st.sampled_from(["../tiny", "/etc", "tiny/../tiny"]), strings)


@st.composite
def _control_fields(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(["version", "config", "other"]))
    parameters = dict(draw(other_parameters))
    if kind == "version":
        parameters["version"] = draw(version_parameters)
    elif kind == "config":
        parameters["config"] = draw(config_parameters)
    name = draw(hostile_names) if kind == "other" else draw(served_names)
    return {"model_name": name, "parameters": parameters,
            "repository_name": draw(st.one_of(st.just(""), strings))}  # fmt: skip


def _control(message: type[Message]) -> st.SearchStrategy[Message]:
    return _control_fields().map(lambda fields: message(**fields))


# -- feedback ------------------------------------------------------------------------------------

# Feedback may fold in anyone but USERS[1], whom `assert_healthy` asks for after every attack:
# a USERS[1] who had rated every item would have no list left to recommend.
FEEDBACK_USERS = (FEEDBACK_USER, *USERS[2:])
feedback_users = st.one_of(st.sampled_from(FEEDBACK_USERS), strings).filter(lambda u: u != USERS[1])
kinds = st.one_of(
    st.sampled_from([pb.FEEDBACK_KIND_RATING, pb.FEEDBACK_KIND_CLICK, pb.FEEDBACK_KIND_PURCHASE,
                     pb.FEEDBACK_KIND_SKIP]),
    st.sampled_from([pb.FEEDBACK_KIND_UNSPECIFIED, 5, 99, -1, 2**31 - 1, -(2**31)]),
)  # fmt: skip
ratings = st.one_of(
    st.sampled_from([1.0, 5.0, 3.5, 0.0, -0.0, 5.0000001, 0.9999999]),
    st.floats(0.5, 5.5),
    st.floats(),  # NaN, infinities, subnormals, huge
)
NOW_S = int(time.time())
timestamps = st.one_of(
    st.none(),  # unset: the server's clock
    st.builds(Timestamp, seconds=st.integers(0, NOW_S), nanos=st.integers(0, 999_999_999)),
    st.builds(
        Timestamp,
        seconds=st.one_of(st.integers(-(2**63), 2**63 - 1),
                          st.sampled_from([-1, NOW_S + 3600, 32_503_680_000, 253_402_300_800])),
        nanos=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 999_999_999)),
    ),
)  # fmt: skip
keys = st.one_of(
    st.just(""),
    st.text(max_size=20),
    st.integers(125, 132).map(lambda n: "k" * n),
    st.integers(60, 70).map(lambda n: "é" * n),  # 120..140 bytes in UTF-8
    strings,
)


@st.composite
def feedback_event(draw: st.DrawFn, hostile: bool = True) -> pb.FeedbackEvent:
    """An event with every field drawn hostile (`hostile`), or a valid one (a batch of them
    reaches the store and the fold-in)."""
    if not hostile:
        return pb.FeedbackEvent(
            user_id=draw(st.sampled_from(FEEDBACK_USERS)), item_id=draw(st.sampled_from(ITEMS)),
            kind=pb.FEEDBACK_KIND_RATING, rating=draw(st.floats(1.0, 5.0)),
            idempotency_key=draw(st.one_of(st.just(""), st.text(max_size=20))),
        )  # fmt: skip
    event = pb.FeedbackEvent(
        user_id=draw(feedback_users), item_id=draw(items), kind=draw(kinds),
        rating=draw(ratings), idempotency_key=draw(keys),
    )  # fmt: skip
    stamp = draw(timestamps)
    if stamp is not None:
        event.occurred_at.CopyFrom(stamp)
    return event


@st.composite
def record_feedback(draw: st.DrawFn) -> Message:
    """Mostly valid events with a hostile one mixed in somewhere, or hostile throughout, or far
    too many."""
    mix = draw(st.sampled_from(["one-bad", "all-hostile", "valid", "too-many"]))
    if mix == "too-many":
        count = draw(st.integers(MAX_EVENTS + 1, 5_000))
        return pb.RecordFeedbackRequest(events=[draw(feedback_event(hostile=False))] * count)
    valid = draw(st.lists(feedback_event(hostile=False), max_size=MAX_EVENTS))
    if mix == "valid":
        return pb.RecordFeedbackRequest(events=valid)
    if mix == "all-hostile":
        return pb.RecordFeedbackRequest(
            events=draw(st.lists(feedback_event(), max_size=MAX_EVENTS + 3))
        )
    valid.insert(draw(st.integers(0, len(valid))), draw(feedback_event()))
    return pb.RecordFeedbackRequest(events=valid)


# Forgetting takes a training user for good (NOT_FOUND afterwards), so only the last few are
# forgotten: the other methods' fuzz keeps most training users to ask about.
forget_users = st.one_of(
    st.sampled_from([FEEDBACK_USER, FORGOTTEN_USER, *USERS[-5:]]),
    strings.filter(lambda u: u != USERS[1]),
)

health_services = st.one_of(
    st.sampled_from(["", "bertrec.v1.RecommenderService", "inference.GRPCInferenceService"]),
    strings,
)
symbols = st.one_of(
    st.sampled_from(["bertrec.v1.RecommenderService", "bertrec.v1.RecommendRequest",
                     "inference.GRPCInferenceService", "grpc.health.v1.Health",
                     "bertrec/v1/recommender.proto"]),
    strings,
)  # fmt: skip
reflection_requests = st.one_of(
    st.builds(reflection_pb2.ServerReflectionRequest, host=strings, list_services=strings),
    st.builds(reflection_pb2.ServerReflectionRequest, file_by_filename=symbols),
    st.builds(reflection_pb2.ServerReflectionRequest, file_containing_symbol=symbols),
    st.builds(reflection_pb2.ServerReflectionRequest, all_extension_numbers_of_type=symbols),
    st.builds(
        reflection_pb2.ServerReflectionRequest,
        file_containing_extension=st.builds(
            reflection_pb2.ExtensionRequest, containing_type=symbols,
            extension_number=st.integers(-(2**31), 2**31 - 1),
        ),
    ),
    st.just(reflection_pb2.ServerReflectionRequest()),
)  # fmt: skip

STRATEGIES: dict[str, st.SearchStrategy[Message]] = {
    path("rec", "Recommend"): recommend(),
    path("rec", "RecommendForText"): st.builds(pb.RecommendForTextRequest, text=texts, k=ks),
    path("rec", "ScoreItems"): st.builds(pb.ScoreItemsRequest, user_id=users, item_ids=item_lists),
    path("rec", "SimilarItems"): st.builds(pb.SimilarItemsRequest, item_id=items, k=ks),
    path("rec", "EmbedText"): st.builds(
        pb.EmbedTextRequest, texts=st.lists(texts, max_size=MAX_TEXTS + 3)
    ),
    path("rec", "GetModelInfo"): st.just(pb.GetModelInfoRequest()),
    path("rec", "RecommendBatch"): st.builds(
        pb.RecommendBatchRequest, user_ids=user_lists, k=ks, exclude_rated=st.booleans()
    ),
    path("rec", "StreamRecommendations"): st.builds(
        pb.StreamRecommendationsRequest, user_ids=user_lists, k=ks, exclude_rated=st.booleans()
    ),
    path("rec", "RecordFeedback"): record_feedback(),
    path("rec", "ForgetUser"): st.builds(pb.ForgetUserRequest, user_id=forget_users),
    path("oip", "ServerLive"): st.just(oip.ServerLiveRequest()),
    path("oip", "ServerReady"): st.just(oip.ServerReadyRequest()),
    path("oip", "ModelReady"): st.builds(oip.ModelReadyRequest, name=model_names, version=versions),
    path("oip", "ServerMetadata"): st.just(oip.ServerMetadataRequest()),
    path("oip", "ModelMetadata"): st.builds(
        oip.ModelMetadataRequest, name=model_names, version=versions
    ),
    path("oip", "ModelInfer"): st.one_of(plausible_infer(), chaotic_infer()),
    path("oip", "RepositoryIndex"): st.builds(
        oip.RepositoryIndexRequest,
        repository_name=st.one_of(st.just(""), strings),
        ready=st.booleans(),
    ),
    path("oip", "RepositoryModelLoad"): _control(oip.RepositoryModelLoadRequest),
    path("oip", "RepositoryModelUnload"): _control(oip.RepositoryModelUnloadRequest),
    path("health", "Check"): st.builds(health_pb2.HealthCheckRequest, service=health_services),
    path("health", "List"): st.just(health_pb2.HealthListRequest()),
    path("health", "Watch"): st.builds(health_pb2.HealthCheckRequest, service=health_services),
    path("reflection", "ServerReflectionInfo"): reflection_requests,
}

# -- raw-byte mutations -------------------------------------------------------------------------


def _string_fields(message: type[Message]) -> list[int]:
    return [f.number for f in message.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING]


@st.composite
def mutated(draw: st.DrawFn, method: str) -> bytes:
    """A request of `method` (typed strategy or VALID) with one to four byte-level mutations."""
    seed = draw(st.one_of(st.just(VALID[method]), STRATEGIES[method]))
    data = bytearray(seed.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace",
                                   "append", "utf8", "random"]))  # fmt: skip
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "replace" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "utf8" and _string_fields(RPCS[method].request):
            # Re-send a string field (last one wins) holding bytes that are not UTF-8.
            number = draw(st.sampled_from(_string_fields(RPCS[method].request)))
            bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"]))
            data += bytes([number << 3 | 2, len(bad)]) + bad
        elif op == "random":
            data = bytearray(draw(st.binary(max_size=64)))
    return bytes(data)
