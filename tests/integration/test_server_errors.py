"""Status codes from the real server: each malformed or impossible request, and load limits."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bertrec.client import RecommenderClient, RecommenderError
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_MANY = [f"item-{i:05d}" for i in range(21)]  # max_item_ids is 20


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(RecommenderError) as info:
        call(*args, **kwargs)
    return info.value.code, info.value.details


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("recommend", {"user_id": "u0001", "k": -1}, "k must be in 1..50, got -1"),
        ("recommend", {"user_id": "u0001", "k": 51}, "k must be in 1..50, got 51"),
        ("recommend", {"user_id": "", "k": 5}, "user_id is empty"),
        ("recommend", {"user_id": "u0001", "k": 5, "include_item_ids": TOO_MANY}, "max_item_ids"),
        ("recommend", {"user_id": "u0001", "k": 5, "exclude_item_ids": ["item-00001"] * 2},
         "lists 'item-00001' more than once"),
        ("recommend_for_text", {"text": "", "k": 5}, "text is empty"),
        ("recommend_for_text", {"text": "   ", "k": 5}, "text is empty"),
        ("recommend_for_text", {"text": "x" * 401, "k": 5}, "401 bytes, more than max_text_bytes"),
        ("recommend_for_text", {"text": "ok", "k": -1}, "k must be in"),
        ("score_items", {"user_id": "u0001", "item_ids": []}, "item_ids is empty"),
        ("score_items", {"user_id": "u0001", "item_ids": TOO_MANY}, "more than max_item_ids 20"),
        ("score_items", {"user_id": "u0001", "item_ids": ["item-00003", "item-00003"]},
         "more than once"),
        ("similar_items", {"item_id": "item-00001", "k": -3}, "k must be in"),
        ("similar_items", {"item_id": "", "k": 3}, "item_id is empty"),
        ("embed_text", {"texts": []}, "texts is empty"),
        ("embed_text", {"texts": ["a"] * 13}, "more than max_texts 12"),
        ("embed_text", {"texts": ["fine", ""]}, "texts[1] is empty"),
        ("embed_text", {"texts": ["é" * 201]}, "402 bytes"),
    ],
)  # fmt: skip
def test_malformed_requests_are_invalid_argument(
    client: RecommenderClient, method: str, kwargs: dict, message: str
) -> None:
    code, details = code_of(getattr(client, method), **kwargs)
    assert code == INVALID
    assert message in details


@pytest.mark.parametrize(
    ("method", "kwargs", "missing"),
    [
        ("recommend", {"user_id": "ghost", "k": 5}, "'ghost'"),
        ("recommend", {"user_id": "u0001", "k": 5, "include_item_ids": ["item-99999"]},
         "'item-99999'"),
        ("recommend", {"user_id": "u0001", "k": 5, "exclude_item_ids": ["nope"]}, "'nope'"),
        ("score_items", {"user_id": "ghost", "item_ids": ["item-00001"]}, "'ghost'"),
        ("score_items", {"user_id": "u0001", "item_ids": ["item-00001", "x"]}, "'x'"),
        ("similar_items", {"item_id": "item-77777", "k": 3}, "'item-77777'"),
    ],
)  # fmt: skip
def test_unknown_ids_are_not_found_and_named(
    client: RecommenderClient, method: str, kwargs: dict, missing: str
) -> None:
    code, details = code_of(getattr(client, method), **kwargs)
    assert code == NOT_FOUND
    assert missing in details


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def dropped(server, reason: str) -> float:
    key = ("bertrec_dropped_total",
           (("batcher", "encoder"), ("model", "tiny"), ("reason", reason)))  # fmt: skip
    return scrape(server).get(key, 0.0)


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_deadline_exceeded_and_the_queued_text_is_dropped(
    client: RecommenderClient, server
) -> None:
    def never_encoded() -> float:
        rejected = ("bertrec_rejected_total", (("batcher", "encoder"), ("model", "tiny")))
        shed = scrape(server).get(rejected, 0.0)  # refused at once: its wait cannot fit
        return dropped(server, "expired") + dropped(server, "cancelled") + shed

    before = never_encoded()
    # The encoder window is 200 ms, so a 30 ms deadline always passes while the text waits:
    # the batcher either refuses it at once (expected wait > deadline) or drops it unencoded.
    code, _ = code_of(client.recommend_for_text, "too slow for this deadline", 3, timeout_s=0.03)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: never_encoded() > before)


def test_cancelled_call_is_dropped_and_counted(channel: grpc.Channel, server) -> None:
    before = dropped(server, "cancelled")
    stub = pb_grpc.RecommenderServiceStub(channel)
    future = stub.EmbedText.future(pb.EmbedTextRequest(texts=["cancel me"]), timeout=10)
    depth = ("bertrec_queue_depth", (("batcher", "encoder"), ("model", "tiny")))
    assert wait_for(lambda: scrape(server).get(depth) == 1)  # queued for the 200 ms window
    assert future.cancel()
    assert wait_for(lambda: dropped(server, "cancelled") == before + 1)


def test_full_queue_is_resource_exhausted_at_once(client: RecommenderClient) -> None:
    code, details = code_of(client.embed_text, [f"text {i}" for i in range(10)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in details
    assert client.embed_text(["the queue is usable again"]).vectors.shape[0] == 1
