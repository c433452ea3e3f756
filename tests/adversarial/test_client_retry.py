"""The Python clients retry by the shared service config (clients/service_config.json).

Against a real gRPC server on loopback whose servicer fails its first calls with a chosen
status, then answers: the retryable codes (UNAVAILABLE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION)
are retried until an answer comes, the others are raised after one attempt, attempts stop at
`maxAttempts`, and retry throttling stops retries on a channel whose calls keep failing. Then
against the real `bertrec serve` during its warm-up: its FAILED_PRECONDITION is an answer gRPC
can retry (the server counts every attempt), and the call succeeds once it reports SERVING.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from server_harness import start_server

from adversarial.conftest import scrape
from bertrec.client import AsyncRecommenderClient, RecommenderClient, RecommenderError, RetryPolicy
from bertrec.server.metrics import code_label
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

Code = grpc.StatusCode
RETRIED = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION)
NOT_RETRIED = (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.INTERNAL, Code.DEADLINE_EXCEEDED)
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)  # the bundled codes and attempts
TIMEOUT_S = 10.0


class FlakyRecommender(pb_grpc.RecommenderServiceServicer):
    """Fails the first `failures` GetModelInfo calls with `code`, then answers; counts calls."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code = code
        self.failures = failures
        self.calls = 0
        self._lock = threading.Lock()

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self._lock:
            self.calls += 1
            call = self.calls
        if call <= self.failures:
            context.abort(self.code, f"attempt {call} refused")
        return pb.GetModelInfoResponse(model=pb.ModelRef(name="flaky", version=call))


@contextmanager
def flaky_server(code: grpc.StatusCode, failures: int) -> Iterator[tuple[str, FlakyRecommender]]:
    servicer = FlakyRecommender(code, failures)
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_RecommenderServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


@contextmanager
def flaky_client(
    code: grpc.StatusCode, failures: int, retry: RetryPolicy | None = FAST
) -> Iterator[tuple[RecommenderClient, FlakyRecommender]]:
    """A client of a fresh `flaky_server` (a fresh channel: full retry-throttling tokens)."""
    with (
        flaky_server(code, failures) as (target, servicer),
        RecommenderClient(target, timeout_s=TIMEOUT_S, retry=retry) as client,
    ):
        yield client, servicer


@pytest.mark.parametrize("code", RETRIED, ids=lambda c: c.name)
def test_retryable_failures_are_retried_until_the_answer(code: grpc.StatusCode) -> None:
    with flaky_client(code, failures=2) as (client, servicer):
        info = client.model_info()
    assert servicer.calls == 3
    assert info.model.version == 3  # the answer of the third attempt


def test_the_bundled_policy_rides_out_a_warm_up() -> None:
    """No RetryPolicy given: the service config file's own backoff and codes."""
    with flaky_client(Code.FAILED_PRECONDITION, failures=3, retry=None) as (client, servicer):
        assert client.model_info().model.version == 4
    assert servicer.calls == 4


def test_the_asyncio_client_retries_too() -> None:
    async def call(target: str) -> int:
        async with AsyncRecommenderClient(target, timeout_s=TIMEOUT_S, retry=FAST) as client:
            return (await client.model_info()).model.version

    with flaky_server(Code.FAILED_PRECONDITION, failures=2) as (target, servicer):
        assert asyncio.run(call(target)) == 3
    assert servicer.calls == 3


@pytest.mark.parametrize("code", NOT_RETRIED, ids=lambda c: c.name)
def test_other_failures_are_raised_after_one_attempt(code: grpc.StatusCode) -> None:
    with flaky_client(code, 1) as (client, servicer), pytest.raises(RecommenderError) as raised:
        client.model_info()
    assert raised.value.code == code and "attempt 1 refused" in raised.value.details
    assert servicer.calls == 1


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_attempts_stop_at_max_attempts(attempts: int) -> None:
    policy = RetryPolicy(max_attempts=attempts, initial_backoff_s=0.01, max_backoff_s=0.02)
    flaky = flaky_client(Code.UNAVAILABLE, 100, policy)
    with flaky as (client, servicer), pytest.raises(RecommenderError) as raised:
        client.model_info()
    assert raised.value.code == Code.UNAVAILABLE
    assert servicer.calls == attempts


def test_retryable_codes_can_be_narrowed() -> None:
    policy = RetryPolicy(retryable_codes=(Code.UNAVAILABLE,), initial_backoff_s=0.01)
    flaky = flaky_client(Code.FAILED_PRECONDITION, 1, policy)
    with flaky as (client, servicer), pytest.raises(RecommenderError):
        client.model_info()
    assert servicer.calls == 1


def test_throttling_stops_retries_on_a_channel_whose_calls_keep_failing() -> None:
    """retryThrottling (10 tokens, 0.1 per success): 5 failed attempts use up the margin."""
    with flaky_client(Code.RESOURCE_EXHAUSTED, failures=100) as (client, servicer):
        for _ in range(2):
            with pytest.raises(RecommenderError):
                client.model_info()
    assert servicer.calls == 5 + 1  # all attempts of the first call, no retry of the second


def handled(metrics_url: str, code: str) -> float:
    """grpc_server_handled_total of GetModelInfo with `code`, from the server's /metrics."""
    want = {("grpc_method", "GetModelInfo"), ("grpc_code", code_label(grpc.StatusCode[code]))}
    return sum(
        value
        for (name, labels), value in scrape(metrics_url).items()
        if name == "grpc_server_handled_total" and want <= labels
    )


def test_the_real_server_warming_up_is_retried_then_answers(
    model_repo: Path, tmp_path: Path
) -> None:
    # 300 warm-up batches: a start-up window far longer than five fast attempts.
    server = start_server(model_repo, tmp_path, "--warmup-iterations", "300")
    try:
        with RecommenderClient(server.target, timeout_s=TIMEOUT_S, retry=FAST) as client:
            with pytest.raises(RecommenderError) as raised:
                client.model_info()
            assert raised.value.code == Code.FAILED_PRECONDITION
            assert handled(server.metrics_url, "FAILED_PRECONDITION") == 5  # every attempt
            client.wait_until_serving(90)
            assert client.model_info().model.name == "tiny"
    finally:
        server.terminate()
