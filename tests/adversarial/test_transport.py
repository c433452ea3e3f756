"""Transport hardening (issue 12, items 2, 3, 4, 5, 7 and a start-up papercut), on the real server.

Each test attacks one defect the way a hostile or unlucky client did, against a real
`bertrec serve` on loopback, and checks both what the caller sees and what the metrics count.
Held calls are RecommendForText calls parked in the encoder's one-second batching window, so
"in flight at once" needs no timing beyond sending a handful of calls together.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import MODEL

from bertrec.bench.request_memory import with_unknown_field
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from bertrec.server.metrics import UNARY, code_label
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

from .conftest import AdversarialServer

Code = grpc.StatusCode
SERVER_SETTINGS = {
    "grpc_max_workers": 4,
    "max_concurrent_rpcs": 4,
    "max_streaming_rpcs": 3,
    "max_inflight_request_bytes": 1024 * 1024,
    "encoder_max_queue_delay_us": 1_000_000,  # a RecommendForText call is held ~1 s
}
TIMEOUT_S = 20.0
SERVICE = "/bertrec.v1.RecommenderService/"


def metric(server: AdversarialServer, name: str, **labels: str) -> float:
    return server.samples().get((name, frozenset(labels.items())), 0.0)


def handled(server: AdversarialServer, method: str, code: str) -> float:
    """grpc_server_handled_total of `method` with status `code` (a `grpc.StatusCode` name),
    whatever spelling the server's label convention gives the code."""
    return sum(
        value
        for (name, labels), value in server.samples().items()
        if name == "grpc_server_handled_total"
        and ("grpc_method", method) in labels
        and ("grpc_code", code_label(Code[code])) in labels
    )


def outcome(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


def held_calls(channel: grpc.Channel, requests: list[bytes]) -> list[Code]:
    """Send raw RecommendForText requests all at once; their status codes, in order."""
    method = channel.unary_unary(SERVICE + "RecommendForText")
    futures = [method.future(r, timeout=TIMEOUT_S) for r in requests]
    return [outcome(f.result) for f in futures]


TEXT_REQUEST = pb.RecommendForTextRequest(text="a quiet film", k=3).SerializeToString()


# Item 2: streams never starve unary calls.


def watches_ended(server: AdversarialServer) -> float:
    return sum(
        value
        for (name, labels), value in server.samples().items()
        if name == "grpc_server_handled_total" and ("grpc_method", "Watch") in labels
    )


@contextmanager
def watches(server: AdversarialServer, channel: grpc.Channel, count: int) -> Iterator[list[Code]]:
    """Open `count` health Watch streams; yields each one's first outcome (OK = got a status).

    On exit the streams are cancelled, and it waits until the server has ended them all, so
    their permits are back before the next test opens streams.
    """
    ended_before = watches_ended(server)
    health = health_pb2_grpc.HealthStub(channel)
    streams = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(count)]
    try:
        yield [outcome(lambda s=s: next(s)) for s in streams]  # type: ignore[misc]
    finally:
        for stream in streams:
            stream.cancel()
        deadline = time.monotonic() + 30
        while watches_ended(server) < ended_before + count and time.monotonic() < deadline:
            time.sleep(0.02)


def test_watch_streams_over_the_cap_are_refused_and_unary_calls_still_answer(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    cap = adversarial_server.settings["max_streaming_rpcs"]
    workers = adversarial_server.settings["grpc_max_workers"]
    refused_before = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="streams")
    with watches(adversarial_server, adversarial_channel, cap + workers) as firsts:
        # Which streams win is up to the order the server sees them in, not the order sent.
        assert firsts.count(Code.OK) == cap
        assert firsts.count(Code.RESOURCE_EXHAUSTED) == workers
        health = health_pb2_grpc.HealthStub(adversarial_channel)
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.RecommenderServiceStub(adversarial_channel)
        answer = stub.Recommend(pb.RecommendRequest(user_id="u0001", k=3), timeout=TIMEOUT_S)
        assert len(answer.items) == 3
    refused = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="streams")
    assert refused - refused_before == workers
    assert handled(adversarial_server, "Watch", "RESOURCE_EXHAUSTED") >= workers


def test_closed_streams_give_their_permits_back(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    for _ in range(3):  # more streams in all than the cap, never more than it at once
        with watches(adversarial_server, adversarial_channel, 3) as firsts:
            assert firsts == [Code.OK] * 3


# Item 7: every call over the limit gets RESOURCE_EXHAUSTED, and is counted.


def test_calls_over_max_concurrent_rpcs_are_resource_exhausted_and_counted(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    limit = adversarial_server.settings["max_concurrent_rpcs"]
    refused_before = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="calls")
    handled_before = handled(adversarial_server, "RecommendForText", "RESOURCE_EXHAUSTED")
    codes = held_calls(adversarial_channel, [TEXT_REQUEST] * (limit + 6))
    refused = codes.count(Code.RESOURCE_EXHAUSTED)
    assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}
    assert 1 <= codes.count(Code.OK) <= limit
    counted = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="calls")
    assert counted - refused_before == refused
    after = handled(adversarial_server, "RecommendForText", "RESOURCE_EXHAUSTED")
    assert after - handled_before == refused


# Item 3: a byte budget for the requests in flight.


def test_a_request_bigger_than_the_byte_budget_is_refused(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    budget = adversarial_server.settings["max_inflight_request_bytes"]
    big = with_unknown_field(TEXT_REQUEST, budget + 1)
    method = adversarial_channel.unary_unary(SERVICE + "RecommendForText")
    with pytest.raises(grpc.RpcError) as info:
        method(big, timeout=TIMEOUT_S)
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    assert "max_inflight_request_bytes" in info.value.details()


def test_requests_in_flight_never_pass_the_byte_budget(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    budget = adversarial_server.settings["max_inflight_request_bytes"]
    request = with_unknown_field(TEXT_REQUEST, budget * 2 // 5)  # two fit, a third does not
    refused_before = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="bytes")
    codes = held_calls(adversarial_channel, [request] * 3)
    assert sorted(c.name for c in codes) == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    refused = metric(adversarial_server, "bertrec_rejected_rpcs_total", reason="bytes")
    assert refused - refused_before == 1
    assert metric(adversarial_server, "bertrec_in_flight_request_bytes") == 0


# Item 4: undecodable requests are the caller's mistake, not the server's.

UNDECODABLE = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated": b"\x0a\x10ab",  # user_id claims 16 bytes, 2 follow
    "bad-utf8": b"\x0a\x02\xff\xfe",  # user_id is not UTF-8
}
METHODS = [
    SERVICE + "Recommend",
    SERVICE + "EmbedText",
    "/inference.GRPCInferenceService/ModelInfer",
    "/grpc.health.v1.Health/Check",
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
def test_undecodable_requests_are_invalid_argument_and_counted(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, method: str, kind: str
) -> None:
    name = method.rpartition("/")[2]
    before = handled(adversarial_server, name, "INVALID_ARGUMENT")
    call = adversarial_channel.unary_unary(method)
    with pytest.raises(grpc.RpcError) as info:
        call(UNDECODABLE[kind], timeout=TIMEOUT_S)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "cannot decode" in info.value.details()
    assert handled(adversarial_server, name, "INVALID_ARGUMENT") == before + 1


def test_undecodable_streaming_requests_are_invalid_argument(
    adversarial_channel: grpc.Channel,
) -> None:
    watch = adversarial_channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as info:
        next(iter(watch(UNDECODABLE["garbage"], timeout=TIMEOUT_S)))
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_undecodable_requests_log_no_traceback(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> None:
    call = adversarial_channel.unary_unary(SERVICE + "Recommend")
    assert outcome(lambda: call(UNDECODABLE["garbage"], timeout=TIMEOUT_S)) == Code.INVALID_ARGUMENT
    log = adversarial_server.log()
    assert "Traceback" not in log
    assert "Exception deserializing" not in log


# Item 5: errors never echo client input at full length.

LONG = "y" * 20_000


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Recommend", pb.RecommendRequest(user_id=LONG, k=3)),
        ("SimilarItems", pb.SimilarItemsRequest(item_id=LONG, k=3)),
        ("ScoreItems", pb.ScoreItemsRequest(user_id="u0001", item_ids=[LONG])),
    ],
)
def test_errors_naming_a_long_id_are_short(
    adversarial_server: AdversarialServer,
    adversarial_channel: grpc.Channel,
    method: str,
    request_: pb.RecommendRequest,
) -> None:
    before = handled(adversarial_server, method, "NOT_FOUND")
    call = adversarial_channel.unary_unary(
        SERVICE + method, request_serializer=type(request_).SerializeToString
    )
    with pytest.raises(grpc.RpcError) as info:
        call(request_, timeout=TIMEOUT_S)
    assert info.value.code() == Code.NOT_FOUND  # not a transport error: the status fits
    details = info.value.details()
    assert len(details.encode()) <= 300
    assert "yyyy" in details and "chars cut" in details
    assert handled(adversarial_server, method, "NOT_FOUND") == before + 1


def test_v2_errors_naming_a_long_model_are_short(adversarial_channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(adversarial_channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(oip.ModelMetadataRequest(name=LONG), timeout=TIMEOUT_S)
    assert info.value.code() == Code.NOT_FOUND
    assert len(info.value.details().encode()) <= 300


def test_server_is_healthy_after_the_attacks(adversarial_channel: grpc.Channel) -> None:
    stub = pb_grpc.RecommenderServiceStub(adversarial_channel)
    answer = stub.Recommend(pb.RecommendRequest(user_id="u0002", k=2), timeout=TIMEOUT_S)
    assert len(answer.items) == 2
    with ThreadPoolExecutor(4) as pool:  # the permits all came back: the limit is usable again
        codes = list(pool.map(lambda _: held_calls(adversarial_channel, [TEXT_REQUEST]), range(4)))
    assert codes == [[Code.OK]] * 4


# Item 12 (papercut): a missing model fails before any port is bound or announced.


def test_missing_version_fails_before_announcing_ports(model_repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
         "--model", MODEL, "--version", "9", "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "grpc " not in done.stdout
    assert "has no version 9" in done.stderr.strip().splitlines()[-1]


# A handler that sets its own status and raises (grpc's generated base class does this for every
# unimplemented method) keeps that status, and the server logs no traceback for it.


def unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_code(Code.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


def test_a_status_set_by_the_handler_stands_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from bertrec.server.interceptor import MetricsAndErrorsInterceptor
    from bertrec.server.metrics import ServerMetrics

    handler = grpc.method_handlers_generic_handler(
        "test.Svc", {"Missing": grpc.unary_unary_rpc_method_handler(unimplemented)}
    )
    metrics = ServerMetrics()
    server = grpc.server(
        ThreadPoolExecutor(2), handlers=[handler],
        interceptors=[MetricsAndErrorsInterceptor(metrics)], options=[("grpc.so_reuseport", 0)],
    )  # fmt: skip
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            caplog.at_level("DEBUG"),
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            channel.unary_unary("/test.Svc/Missing")(b"", timeout=TIMEOUT_S)
    finally:
        server.stop(None)
    assert (info.value.code(), info.value.details()) == (
        Code.UNIMPLEMENTED, "Method not implemented!"
    )  # fmt: skip
    assert "Traceback" not in caplog.text and "NotImplementedError" not in caplog.text
    labels = {"grpc_type": UNARY, "grpc_service": "test.Svc", "grpc_method": "Missing",
              "grpc_code": code_label(Code.UNIMPLEMENTED)}  # fmt: skip
    assert metrics.registry.get_sample_value("grpc_server_handled_total", labels) == 1
