"""The Go load generator of `bench.server --load-generator go` against the real server: every
call it counts as answered is one the server counts as a successful Recommend."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import serving

from bertrec.bench.go_load import build_go_loadgen, run_go_load

RECOMMEND_OK = {
    "grpc_type": "unary",
    "grpc_service": "bertrec.v1.RecommenderService",
    "grpc_method": "Recommend",
    "grpc_code": "OK",
}


def recommend_ok(url: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "grpc_server_handled_total" and s.labels == RECOMMEND_OK:
                return s.value
    return 0.0


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_go_loadgen(tmp_path_factory.mktemp("go"))
    except RuntimeError as exc:
        required = os.environ.get("BERTREC_REQUIRE_TOOLCHAINS", "") not in ("", "0")
        if "missing toolchain" in str(exc) and not required:
            pytest.skip(str(exc).splitlines()[-1])
        raise


def test_go_loadgen_counts_what_the_server_answered(
    loadgen: Path, model_repo: Path, tmp_path: Path
) -> None:
    with serving(model_repo, tmp_path) as server:
        before = recommend_ok(server.metrics_url)
        run = run_go_load(
            loadgen, server.target, concurrency=8, duration_s=0.5, channels=2, users=8,
            user_format="u%04d",
        )  # fmt: skip
        answered = recommend_ok(server.metrics_url) - before
    assert run.errors == 0 and run.calls > 0
    assert answered == run.calls
    assert 0 < run.p50_ms <= run.p99_ms


def test_go_loadgen_counts_failed_calls_as_errors(
    loadgen: Path, model_repo: Path, tmp_path: Path
) -> None:
    with serving(model_repo, tmp_path) as server:
        run = run_go_load(
            loadgen, server.target, concurrency=2, duration_s=0.3, channels=1, users=8,
            user_format="nobody-%d",
        )  # fmt: skip
    assert run.calls == 0 and run.errors > 0  # NOT_FOUND for every unknown user
