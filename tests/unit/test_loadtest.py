"""Load-test tool: schedules, intended-time accounting, bounds, mix weights, summary math, JSON,
the pass/fail verdict and the reachability check."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import numpy as np
import pytest

from bertrec.bench.loadtest import preflight, runner
from bertrec.bench.loadtest.recorder import Recorder, latency_stats, summarize, timeline
from bertrec.bench.loadtest.report import SCHEMA, build_report
from bertrec.bench.loadtest.schedule import (
    NS,
    open_loop_schedule,
    poisson_arrivals,
    rpc_sequence,
)
from bertrec.bench.loadtest.search import Slo, find_max_rate
from bertrec.bench.loadtest.verdict import Thresholds, judge, judge_search
from bertrec.bench.loadtest.workload import parse_id_list, parse_mix
from bertrec.client import RecommenderClient, RecommenderError
from bertrec.errors import BertrecError


def test_poisson_arrivals_have_the_asked_mean_rate_and_exponential_gaps() -> None:
    rate, horizon = 2000.0, 10.0
    arrivals = poisson_arrivals(rate, horizon, np.random.default_rng(1))
    expected = rate * horizon
    assert abs(arrivals.size - expected) < 4 * np.sqrt(expected)
    assert np.all(np.diff(arrivals) >= 0) and arrivals[-1] < horizon * NS
    gaps_s = np.diff(arrivals) / NS
    assert gaps_s.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps_s.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    per_second = np.bincount((arrivals // NS).astype(int))
    assert per_second.var() == pytest.approx(rate, rel=0.8)  # Poisson counts: var ~ mean


def test_open_loop_schedule_keeps_warmup_and_caps_measured_requests() -> None:
    rng = np.random.default_rng(2)
    schedule = open_loop_schedule(100.0, warmup_s=1.0, duration_s=10.0, max_requests=50, rng=rng)
    warm = int(np.sum(schedule < NS))
    assert 60 <= warm <= 140
    assert schedule.size == warm + 50
    unbounded = open_loop_schedule(100.0, 1.0, 2.0, None, np.random.default_rng(2))
    assert unbounded[-1] < 3 * NS


def test_mix_weights_are_normalised_and_sampled_in_proportion() -> None:
    mix = parse_mix("recommend=8, similar_items=1,score_items=1,embed_text=0")
    assert mix == pytest.approx({"recommend": 0.8, "similar_items": 0.1, "score_items": 0.1})
    picks = rpc_sequence(list(mix.values()), 100_000, np.random.default_rng(3))
    shares = np.bincount(picks, minlength=3) / picks.size
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.01)


@pytest.mark.parametrize("spec", ["bogus=1", "recommend=-1", "recommend=x", "embed_text=0", ""])
def test_bad_mixes_are_refused(spec: str) -> None:
    with pytest.raises(BertrecError, match="--mix"):
        parse_mix(spec)


def test_id_lists_from_flags_and_files(tmp_path) -> None:
    assert parse_id_list("u1, u2,,u3") == ("u1", "u2", "u3")
    (tmp_path / "ids.txt").write_text("a\n\n b \n")
    assert parse_id_list(f"@{tmp_path / 'ids.txt'}") == ("a", "b")
    assert parse_id_list(None) == ()


def test_latency_counts_from_the_intended_time_and_warmup_is_excluded() -> None:
    rec = Recorder(capacity=2)  # forces growth
    rec.add(0, intended_ns=0, sent_ns=0, done_ns=5_000_000, code=0)  # warm-up call
    rec.add(0, intended_ns=NS, sent_ns=NS + 40_000_000, done_ns=NS + 50_000_000, code=0)
    rec.add(1, intended_ns=NS + 1, sent_ns=NS + 1, done_ns=NS + 2_000_001, code=4)
    calls = rec.calls(since_ns=NS)
    assert calls.code.size == 2
    assert calls.latency_ms.tolist() == pytest.approx([50.0, 2.0])  # not 10 ms: the wait counts
    summary = summarize(calls, window_s=1.0)
    assert summary.send_lag_ms.max_ms == pytest.approx(40.0)
    assert summary.errors == {"DEADLINE_EXCEEDED": 1}
    assert (summary.ok, summary.requests, summary.throughput_rps) == (1, 2, 1.0)


def test_percentiles_are_exact_on_known_samples() -> None:
    stats = latency_stats(np.arange(1, 1001, dtype=np.float64))
    assert stats.percentiles_ms == {"p50": 500.0, "p90": 900.0, "p99": 990.0, "p99.9": 999.0}
    assert (stats.max_ms, stats.count, stats.mean_ms) == (1000.0, 1000, 500.5)
    assert np.isnan(latency_stats(np.zeros(0)).percentiles_ms["p99"])


def test_timeline_buckets_by_completion_second() -> None:
    rec = Recorder()
    for i in range(30):
        done = i * NS // 10 + 1_000_000
        rec.add(0, done - 1_000_000, done - 1_000_000, done, 0 if i % 10 else 14)
    buckets = timeline(rec.calls(), start_ns=0)
    assert [(b.ok, b.errors) for b in buckets] == [(9, 1)] * 3
    assert buckets[0].percentiles_ms["p99"] == pytest.approx(1.0)


class FakeRpcError(Exception):
    def code(self) -> object:
        import grpc

        return grpc.StatusCode.UNAVAILABLE


def _fake_grpc_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    monkeypatch.setattr(grpc, "RpcError", FakeRpcError)


def _spec(**kw: object) -> runner.LoadSpec:
    base: dict[str, object] = dict(target="fake", mix={"a": 0.5, "b": 0.5}, duration_s=10.0,
                                   warmup_s=0.0, progress=False)  # fmt: skip
    base.update(kw)
    return runner.LoadSpec(**base)  # type: ignore[arg-type]


def test_open_loop_reports_queueing_behind_a_slow_server() -> None:
    """Capacity 100/s, offered 200/s: intended-time latency grows; sent-time latency would not."""
    lock = asyncio.Lock()

    async def server(payload: bytes, timeout: float) -> bytes:
        async with lock:
            await asyncio.sleep(0.01)
        return payload

    spec = _spec(rate_rps=200.0, max_requests=60, max_in_flight=1)
    rec = Recorder()

    async def go() -> None:
        await runner._open_loop(spec, ["a", "b"], {"a": [b"x"], "b": [b"y"]},
                                [[server, server]], rec, time.perf_counter_ns())  # fmt: skip

    asyncio.run(go())
    calls = rec.calls()
    assert calls.code.size == 60
    service_ms = (calls.done_ns - calls.sent_ns) / 1e6
    assert np.median(service_ms) < 30
    assert calls.latency_ms.max() > 100  # ~60 calls * 5 ms of backlog by the end
    assert calls.latency_ms.max() > 4 * service_ms.max()


def test_closed_loop_stops_at_max_requests_and_records_errors(monkeypatch) -> None:
    _fake_grpc_error(monkeypatch)
    count = [0]

    async def flaky(payload: bytes, timeout: float) -> bytes:
        count[0] += 1
        await asyncio.sleep(0.001)
        if payload == b"y":
            raise FakeRpcError()
        return payload

    spec = _spec(concurrency=4, max_requests=50)
    rec = Recorder()
    asyncio.run(runner._closed_loop(spec, ["a", "b"], {"a": [b"x"], "b": [b"y"]},
                                    [[flaky, flaky]], rec, time.perf_counter_ns()))  # fmt: skip
    calls = rec.calls()
    assert calls.code.size == count[0] == 50
    assert set(calls.code[calls.rpc == 1].tolist()) == {14}  # UNAVAILABLE
    assert set(calls.code[calls.rpc == 0].tolist()) == {0}
    assert np.all(calls.intended_ns == calls.sent_ns)


def test_closed_loop_stops_at_the_duration() -> None:
    async def quick(payload: bytes, timeout: float) -> bytes:
        await asyncio.sleep(0.002)
        return payload

    spec = _spec(concurrency=2, duration_s=0.3, warmup_s=0.1)
    rec = Recorder()
    asyncio.run(runner._closed_loop(spec, ["a", "b"], {"a": [b"x"], "b": [b"y"]},
                                    [[quick, quick]], rec, time.perf_counter_ns()))  # fmt: skip
    # By the schedule, not the wall clock (a busy machine only stretches the calls): nothing
    # is sent after warm-up + duration, and the callers kept sending until then.
    end = int(0.4 * NS)
    sent = rec.calls().sent_ns
    assert sent.max() < end
    assert rec.calls().done_ns.max() >= end - int(0.05 * NS)
    assert rec.calls(since_ns=int(0.1 * NS)).code.size < rec.size  # warm-up calls dropped


def _summary_at(rate: float, capacity: float) -> object:
    rec = Recorder()
    latency = 10_000_000 if rate <= capacity else 500_000_000
    for i in range(100):
        rec.add(0, i, i, i + latency, 0)
    return summarize(rec.calls(), 1.0)


def test_max_rate_search_brackets_then_bisects_within_bounded_steps() -> None:
    tried: list[float] = []

    def measure(rate: float):  # type: ignore[no-untyped-def]
        tried.append(rate)
        return _summary_at(rate, capacity=437.0)

    result = find_max_rate(measure, Slo(50.0), start_rate_rps=50.0, max_steps=12)
    assert tried[:4] == [50, 100, 200, 400]
    assert result.converged and 437 * 0.95 <= result.best_rate_rps <= 437
    assert len(result.tried) <= 12

    low = find_max_rate(lambda r: _summary_at(r, 30.0), Slo(50.0), 100.0, max_steps=5)  # type: ignore[arg-type, return-value]
    assert [r for r, _ in low.tried][:3] == [100, 50, 25] and low.best_rate_rps >= 25
    assert len(low.tried) == 5


def test_report_follows_the_schema_and_is_json() -> None:
    rec = Recorder()
    for i in range(20):
        rec.add(i % 2, i * NS // 10, i * NS // 10, i * NS // 10 + 3_000_000, 0)
    step = runner.StepResult(_spec(concurrency=2), rec.calls(), 2.0, 0, 12.5)
    report = json.loads(json.dumps(build_report("t:1", {"a": 0.5, "b": 0.5}, "flags", [step])))
    assert report["schema"] == SCHEMA
    assert set(report) >= {"target", "mix", "inputs_source", "environment", "steps", "search"}
    (only,) = report["steps"]
    assert only["mode"] == "closed" and only["client_cpu_percent"] == 12.5
    summary = only["summary"]
    assert summary["requests"] == 20 and summary["ok"] == 20 and summary["errors"] == {}
    assert summary["throughput_rps"] == pytest.approx(10.0)
    assert set(summary["latency"]["percentiles_ms"]) == {"p50", "p90", "p99", "p99.9"}
    assert set(only["per_rpc"]) == {"a", "b"} and only["timeline"]
    assert report["verdict"] is None  # no verdict given


def _summary_of(codes: list[int], latency_ms: float = 3.0):  # type: ignore[no-untyped-def]
    rec = Recorder()
    for i, code in enumerate(codes):
        rec.add(0, i * 1000, i * 1000, i * 1000 + int(latency_ms * 1e6), code)
    return summarize(rec.calls(), 1.0)


def test_a_run_whose_calls_mostly_failed_fails_naming_the_codes() -> None:
    clean = _summary_of([0] * 200)
    failing = _summary_of([0] * 20 + [14] * 170 + [5] * 10)
    verdict = judge([("closed x4", clean), ("open 50/s", failing)], Thresholds(0.01))
    assert not verdict.passed
    (reason,) = verdict.reasons
    assert reason.startswith("open 50/s: 180 of 200 calls failed (90.00% > 1.00%")
    assert "NOT_FOUND 10" in reason and "UNAVAILABLE 170" in reason
    assert verdict.lines()[0].startswith("verdict: FAIL")


def test_the_error_share_threshold_is_inclusive() -> None:
    summary = _summary_of([0] * 99 + [8])  # 1% RESOURCE_EXHAUSTED
    assert judge([("s", summary)], Thresholds(0.01)).passed
    assert not judge([("s", summary)], Thresholds(0.005)).passed


def test_p99_is_checked_only_when_asked() -> None:
    slow = _summary_of([0] * 100, latency_ms=80.0)
    assert judge([("s", slow)], Thresholds(0.01)).passed
    verdict = judge([("s", slow)], Thresholds(0.01, max_p99_ms=50.0))
    assert verdict.reasons == ("s: p99 80.00 ms > 50 ms",)
    assert verdict.lines() == ["verdict: FAIL (errors <= 1.00%, p99 <= 50 ms)",
                               "  s: p99 80.00 ms > 50 ms"]  # fmt: skip


def test_nothing_measured_or_nothing_answered_fails() -> None:
    assert judge([("s", _summary_of([]))], Thresholds(1.0)).reasons == ("s: no call was measured",)
    assert "s: no call succeeded" in judge([("s", _summary_of([4] * 5))], Thresholds(1.0)).reasons
    assert not judge([], Thresholds()).passed


def test_a_search_passes_when_some_rate_met_the_slo() -> None:
    assert judge_search(350.0, 8, Thresholds(0.01, 50.0)).passed
    failed = judge_search(0.0, 5, Thresholds(0.01, 50.0))
    assert not failed.passed and "none of the 5 rates" in failed.reasons[0]


def test_the_report_carries_the_verdict() -> None:
    rec = Recorder()
    rec.add(0, 0, 0, 1_000_000, 14)
    step = runner.StepResult(_spec(concurrency=1), rec.calls(), 1.0, 0, 1.0)
    verdict = judge([("closed x1", summarize(step.calls, 1.0))], Thresholds(0.01, 20.0))
    report = json.loads(json.dumps(build_report("t:1", {"a": 1.0}, "flags", [step],
                                                verdict=verdict)))  # fmt: skip
    assert report["verdict"] == {"passed": False, "reasons": list(verdict.reasons),
                                 "max_error_rate": 0.01, "max_p99_ms": 20.0}  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_closed_port_is_reported_as_connection_refused() -> None:
    target = f"127.0.0.1:{_closed_port()}"
    with RecommenderClient(target) as client, pytest.raises(BertrecError) as raised:
        preflight.wait_until_serving(client, target, ready_timeout_s=600.0)
    assert str(raised.value) == (f"cannot connect to {target}: connection refused "
                                 "(is `bertrec serve` running there?)")  # fmt: skip


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (grpc.StatusCode.UNAVAILABLE, "cannot connect to h:1: DNS resolution failed"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "no answer from h:1 within 2 s"),
        (grpc.StatusCode.UNIMPLEMENTED, "h:1 has no grpc.health.v1 service"),
        (grpc.StatusCode.INTERNAL, "health check of h:1 failed: INTERNAL: DNS resolution failed"),
    ],
)
def test_unreachable_servers_are_named_in_words(code: grpc.StatusCode, words: str) -> None:
    assert preflight.unreachable("h:1", RecommenderError(code, "DNS resolution failed")).startswith(
        words
    )
