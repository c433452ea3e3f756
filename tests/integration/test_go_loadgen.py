"""The Go load generator of `bench.server --load-generator go` against the real server: every
call it counts as answered is one the server counts as a successful Recommend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from server_harness import handled_ok, serving

from bertrec.bench.go_load import build_go_loadgen, run_go_load


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
        before = handled_ok(server.metrics_url, "Recommend")
        run = run_go_load(
            loadgen, server.target, concurrency=8, duration_s=0.5, channels=2, users=8,
            user_format="u%04d",
        )  # fmt: skip
        answered = handled_ok(server.metrics_url, "Recommend") - before
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
