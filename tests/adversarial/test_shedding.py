"""Load shedding on the encoder path (issue 12, item 6), through real gRPC.

A burst far above what the encoder can finish within the callers' deadline must be refused at
once with RESOURCE_EXHAUSTED (the caller can retry elsewhere or later), not left to queue until
DEADLINE_EXCEEDED; and the encoder must not compute texts for callers that already gave up.

The server runs in this process so that its encoder can be made slow and steady (a fixed sleep
per batch on top of the tiny model): the encoder, not the 2-core machine's gRPC transport, is
then the bottleneck, and the outcome does not depend on how busy the machine is.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_harness import MODEL

from bertrec.server.app import Server
from bertrec.server.config import load_config
from bertrec.server.model import Model
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

BATCH_SLEEP_S = 0.02  # on top of the tiny encoder: at most ~2 texts / 20 ms = 100 texts/s
BURST = 150
DEADLINE_S = 0.6  # the encoder can finish ~60 texts in time; the other ~90 must be shed
TEXT = "a fast paced thriller with a detective chasing an art thief across Europe"


@pytest.fixture(scope="module")
def slow_encoder_server(model_repo: Path) -> Iterator[Server]:
    """An in-process server whose encoder takes `BATCH_SLEEP_S` longer per batch."""
    patch = pytest.MonkeyPatch()
    encode = Model.encode

    def slow_encode(self: Model, texts: list[str]) -> list:  # type: ignore[type-arg]
        time.sleep(BATCH_SLEEP_S)
        return encode(self, texts)

    patch.setattr(Model, "encode", slow_encode)
    settings = {
        "model_repo": model_repo, "model": MODEL, "host": "127.0.0.1", "grpc_port": 0,
        "metrics_port": 0, "providers": "CPUExecutionProvider", "warmup_iterations": 1,
        "encoder_max_batch_size": 2, "encoder_max_queue_size": 1024,  # the bound never bites
        "grpc_max_workers": 2 * BURST, "max_concurrent_rpcs": 2 * BURST,
    }  # fmt: skip
    server = Server(load_config(settings, env={}))
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop(1.0)
        patch.undo()


def encoded_texts(server: Server) -> float:
    labels = {"model": MODEL, "batcher": "encoder"}
    return server.metrics.registry.get_sample_value("bertrec_batch_size_sum", labels) or 0.0


def burst(stub: pb_grpc.RecommenderServiceStub, calls: int, deadline_s: float) -> list[grpc.Call]:
    """`calls` RecommendForText calls sent at once; returns them once all have finished."""
    request = pb.RecommendForTextRequest(text=TEXT, k=5)
    futures = [stub.RecommendForText.future(request, timeout=deadline_s) for _ in range(calls)]
    for future in futures:
        future.exception()  # waits for the outcome, whatever it is
    return futures


def test_an_encoder_burst_over_capacity_is_shed_at_once_not_timed_out(
    slow_encoder_server: Server,
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{slow_encoder_server.port}") as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        for _ in range(3):  # the batcher learns its service time from a few real batches
            burst(stub, 4, 30.0)
        before = encoded_texts(slow_encoder_server)
        calls = burst(stub, BURST, DEADLINE_S)
        encoded = encoded_texts(slow_encoder_server) - before
    codes = Counter(c.code() for c in calls)
    details = {c.details() for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED}
    ok = codes[grpc.StatusCode.OK]
    summary = f"{dict(codes)}, {encoded:.0f} texts encoded"
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= BURST // 4, summary
    assert all("encoder is overloaded" in d for d in details), details
    assert codes[grpc.StatusCode.DEADLINE_EXCEEDED] <= BURST // 10, summary
    assert ok >= 20, summary  # the admitted calls were answered: shedding is not refusing all
    # Texts computed for callers that had given up: at most a batch or two at the margin.
    assert encoded - ok <= 4, summary


def test_the_server_serves_normally_once_the_burst_is_over(slow_encoder_server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{slow_encoder_server.port}") as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        burst(stub, BURST, DEADLINE_S)
        answer = stub.RecommendForText(pb.RecommendForTextRequest(text=TEXT, k=3), timeout=10)
    assert len(answer.items) == 3
