"""Every RPC attacked four ways through real gRPC: bad input, oversize, garbage bytes, overload.

Each attack is a table with one row (or more) per method; `test_every_method_has_every_attack`
fails when the server serves a method that a table lacks, so a new RPC cannot ship untested.
A client mistake must never be answered UNKNOWN or INTERNAL (see `rpcs.ALLOWED`), the status
message must stay short, and the server must be healthy after each attack.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import grpc
import pytest
from google.protobuf.message import Message

from adversarial.bad_inputs import BAD_INPUT, Case
from adversarial.conftest import AdversarialServer
from adversarial.rpcs import (
    CONTROL,
    LIMITS,
    MAX_REQUEST_BYTES,
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
    tracebacks,
)  # fmt: skip
from bertrec.bench.request_memory import varint, with_unknown_field
from bertrec.server.metrics import code_label
from bertrec.v1 import recommender_pb2 as pb

# Overload is made deterministic by slow fillers: with a 1 s encoder window, each admitted
# RecommendForText holds one of the `max_concurrent_rpcs` slots for about a second.
SERVER_SETTINGS = {
    **LIMITS,
    **CONTROL,
    "max_concurrent_rpcs": 4,
    "grpc_max_workers": 8,
    "encoder_max_queue_delay_us": 1_000_000,
    "encoder_max_batch_size": 64,
    "encoder_max_queue_size": 64,
}


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


# -- bad input: one row per validation rule (the table is in bad_inputs.py) --------------------


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda c: c.id)
def test_bad_input(adversarial_channel: grpc.Channel, case: Case) -> None:
    outcome = invoke(adversarial_channel, RPCS[case.path], case.request.SerializeToString())
    assert outcome.problem() is None, outcome.problem()
    assert outcome.code in case.codes, (outcome.code, outcome.details[:300])
    assert case.says in outcome.details


# An id of 4-byte characters, echoed in a NOT_FOUND message: the message is cut to a number of
# characters, and must still come out short in bytes (what travels in the trailers).
EMOJI_ID = "\U0001f642" * 5_000
ECHOES = [
    pytest.param(path("rec", "Recommend"), pb.RecommendRequest(user_id=EMOJI_ID, k=5),
                 id="Recommend-user"),
    pytest.param(path("rec", "ScoreItems"),
                 pb.ScoreItemsRequest(user_id=USERS[1], item_ids=[EMOJI_ID]),
                 id="ScoreItems-item"),
    # ids are at most 512 bytes here, so the echo stays short
    pytest.param(path("rec", "RecordFeedback"), pb.RecordFeedbackRequest(events=[
        pb.FeedbackEvent(user_id="echo", item_id="\U0001f642" * 128, kind=pb.FEEDBACK_KIND_CLICK)
    ]), id="RecordFeedback-item"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_"), ECHOES)
def test_an_echoed_multibyte_id_keeps_the_message_short(
    adversarial_channel: grpc.Channel, method: str, request_: Message
) -> None:
    outcome = invoke(adversarial_channel, RPCS[method], request_.SerializeToString())
    assert outcome.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), outcome
    assert outcome.problem() is None, outcome.problem()


# -- oversize: over the transport's limit, and just under it ----------------------------------

UNKNOWN_FIELD = 536_870_911  # the largest field number: never a field of any request
NEAR_LIMIT = MAX_REQUEST_BYTES - 64 * 1024


@pytest.mark.parametrize("method", sorted(RPCS))
def test_oversize_message_is_resource_exhausted(
    adversarial_channel: grpc.Channel, method: str
) -> None:
    payload = with_unknown_field(
        VALID[method].SerializeToString(), MAX_REQUEST_BYTES + 1024, UNKNOWN_FIELD
    )
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
    outcome = invoke(
        adversarial_channel, RPCS[method], with_unknown_field(plain, NEAR_LIMIT, UNKNOWN_FIELD)
    )
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
    "deep-groups": varint(1000 << 3 | 3) * 200 + varint(1000 << 3 | 4) * 200,
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
    """grpc_server_<series>_total of one method (and code, a `grpc.StatusCode` name; None:
    any), scraped from /metrics, whatever spelling the server's label convention gives codes."""
    label = None if code is None else code_label(Code[code])
    service, name = method.lstrip("/").rsplit("/", 1)
    return sum(
        value
        for (sample, pairs), value in server.samples().items()
        for labels in [dict(pairs)]
        if sample == f"grpc_server_{series}_total"
        and (labels.get("grpc_service"), labels.get("grpc_method")) == (service, name)
        and label in (None, labels.get("grpc_code"))
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
    limit = int(adversarial_server.settings["max_concurrent_rpcs"])
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
