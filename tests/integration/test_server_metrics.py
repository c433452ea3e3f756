"""/metrics after known traffic: the standard grpc_server_* series and the bertrec_* series."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bertrec.client import RecommenderClient, RecommenderError

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SERVICE = "bertrec.v1.RecommenderService"


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def rpc(method: str, **extra: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, **extra}


def test_metrics_after_known_traffic(client: RecommenderClient, server) -> None:
    before = scrape(server.metrics_url)
    for user in ("u0001", "u0002", "u0003", "u0004", "u0005"):
        client.recommend(user, k=5)  # one at a time: five ranker batches of one
    with pytest.raises(RecommenderError):
        client.recommend("ghost", k=5)
    client.model_info()
    after = scrape(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    def now(name: str, **labels: str) -> float:
        return after[(name, frozenset(labels.items()))]

    assert delta("grpc_server_started_total", **rpc("Recommend")) == 6
    assert delta("grpc_server_handled_total", **rpc("Recommend", grpc_code="OK")) == 5
    assert delta("grpc_server_handled_total", **rpc("Recommend", grpc_code="NotFound")) == 1
    assert delta("grpc_server_handling_seconds_count", **rpc("Recommend")) == 6
    assert delta("grpc_server_handling_seconds_sum", **rpc("Recommend")) > 0
    assert delta("grpc_server_handled_total", **rpc("GetModelInfo", grpc_code="OK")) == 1

    ranker = {"model": "tiny", "batcher": "ranker"}
    assert delta("bertrec_batch_size_count", **ranker) == 5
    assert delta("bertrec_batch_size_sum", **ranker) == 5
    assert delta("bertrec_queue_wait_seconds_count", **ranker) == 5
    assert delta("bertrec_inference_seconds_count", **ranker) == 5
    assert delta("bertrec_inference_seconds_sum", **ranker) > 0
    assert now("bertrec_queue_depth", **ranker) == 0
    for batcher in ("encoder", "similar"):
        assert (
            "bertrec_batch_size_count",
            frozenset({"model": "tiny", "batcher": batcher}.items()),
        ) in after

    assert now("bertrec_in_flight_requests") == 0
    assert now("bertrec_catalogue_items", model="tiny") == 60
    assert now("bertrec_users", model="tiny") == 40
    info = {"model": "tiny", "version": "1", "provider": "CPUExecutionProvider",
            "encoder_file": "encoder.int8.onnx"}  # fmt: skip
    assert now("bertrec_model_info", **info) == 1
