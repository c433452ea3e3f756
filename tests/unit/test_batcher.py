"""The dynamic batcher against a fake model: windows, sizes, drops, rejection, shedding,
failures, trace spans. The batch-time estimate it sheds by is tested alone in
test_service_time.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from bertrec.server.batcher import Batcher, BatcherConfig
from bertrec.server.errors import DeadlineExceeded, InternalError, NotReady, ResourceExhausted
from bertrec.server.metrics import ServerMetrics
from bertrec.server.tracing import Tracing, capture, tracing_anywhere


class FakeModel:
    """Doubles its inputs; records every batch; can be held (gate) or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: int | None = None
        self.batch_s = 0.0  # simulated compute time per batch

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.set()
        self.gate.wait(5)
        time.sleep(self.batch_s)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("boom")
        return [2 * i for i in items]


def far() -> float:
    return time.monotonic() + 30.0


def value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, {"model": "m", "batcher": "b", **labels})
    return 0.0 if sample is None else sample


@pytest.fixture
def setup() -> Iterator[tuple[FakeModel, ServerMetrics, list[Batcher[int, int]]]]:
    created: list[Batcher[int, int]] = []
    yield FakeModel(), ServerMetrics(), created
    for batcher in created:
        batcher.close(drain=False, timeout_s=5)


def make(
    setup: tuple[FakeModel, ServerMetrics, list[Batcher[int, int]]],
    max_batch_size: int = 8,
    delay_us: int = 50_000,
    queue: int = 100,
    shed: bool = True,
) -> Batcher[int, int]:
    model, metrics, created = setup
    config = BatcherConfig(max_batch_size, delay_us, queue, shed)
    batcher: Batcher[int, int] = Batcher("b", model, config, metrics.for_batcher("m", "b"))
    created.append(batcher)
    return batcher


def test_items_within_the_window_run_as_one_batch(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=8, delay_us=100_000)
    batcher.start()
    futures = [batcher.submit(i, far()) for i in range(5)]
    assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8]
    assert model.batches == [[0, 1, 2, 3, 4]]
    assert value(metrics, "bertrec_batch_size_sum") == 5
    assert value(metrics, "bertrec_batch_size_count") == 1
    assert value(metrics, "bertrec_queue_wait_seconds_count") == 5
    assert value(metrics, "bertrec_inference_seconds_count") == 1


def test_window_is_measured_from_the_first_item(setup) -> None:
    model, _, _ = setup
    batcher = make(setup, max_batch_size=100, delay_us=150_000)
    batcher.start()
    start = time.monotonic()
    first = batcher.submit(1, far())
    time.sleep(0.05)
    second = batcher.submit(2, far())
    assert (first.result(5), second.result(5)) == (2, 4)
    elapsed = time.monotonic() - start
    assert 0.14 <= elapsed < 1.0
    assert model.batches == [[1, 2]]


def test_full_batch_runs_without_waiting_for_the_window(setup) -> None:
    model, _, _ = setup
    batcher = make(setup, max_batch_size=4, delay_us=10_000_000)
    batcher.start()
    start = time.monotonic()
    futures = [batcher.submit(i, far()) for i in range(4)]
    assert [f.result(5) for f in futures] == [0, 2, 4, 6]
    assert time.monotonic() - start < 2.0
    assert model.batches == [[0, 1, 2, 3]]


def test_max_batch_size_splits_a_burst(setup) -> None:
    model, _, _ = setup
    batcher = make(setup, max_batch_size=3, delay_us=50_000)
    futures = [batcher.submit(i, far()) for i in range(7)]  # queued before the worker starts
    batcher.start()
    assert [f.result(5) for f in futures] == [2 * i for i in range(7)]
    assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_expired_items_are_dropped_not_computed_and_counted(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=8, delay_us=100_000)
    batcher.start()
    expired = batcher.submit(1, time.monotonic() + 0.01)  # passes while the window is open
    alive = batcher.submit(2, far())
    assert alive.result(5) == 4
    with pytest.raises(DeadlineExceeded):
        expired.result(5)
    assert model.batches == [[2]]
    assert value(metrics, "bertrec_dropped_total", reason="expired") == 1
    assert value(metrics, "bertrec_dropped_total", reason="cancelled") == 0


def test_cancelled_items_are_dropped_not_computed_and_counted(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=8, delay_us=100_000)
    batcher.start()
    gone = batcher.submit(1, far())
    kept = batcher.submit(2, far())
    assert gone.cancel()
    assert kept.result(5) == 4
    assert gone.cancelled()
    assert model.batches == [[2]]
    assert value(metrics, "bertrec_dropped_total", reason="cancelled") == 1


def test_a_running_item_cannot_be_cancelled(setup) -> None:
    model, _, _ = setup
    batcher = make(setup, max_batch_size=1, delay_us=0)
    model.gate.clear()
    batcher.start()
    future = batcher.submit(3, far())
    assert model.entered.wait(5)
    assert not future.cancel()
    model.gate.set()
    assert future.result(5) == 6


def test_full_queue_rejects_at_once_with_resource_exhausted(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=1, delay_us=0, queue=2)
    model.gate.clear()
    batcher.start()
    running = batcher.submit(0, far())
    assert model.entered.wait(5)  # the worker holds item 0; the queue is empty again
    queued = [batcher.submit(i, far()) for i in (1, 2)]
    start = time.monotonic()
    with pytest.raises(ResourceExhausted, match="queue is full"):
        batcher.submit(3, far())
    assert time.monotonic() - start < 0.1
    assert value(metrics, "bertrec_rejected_total") == 1
    model.gate.set()
    assert [f.result(5) for f in (running, *queued)] == [0, 2, 4]


def test_failing_batch_fails_every_caller_and_later_batches_still_run(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=3, delay_us=50_000)
    model.fail_on = 1
    futures = [batcher.submit(i, far()) for i in range(3)]
    batcher.start()
    for future in futures:
        with pytest.raises(InternalError) as info:
            future.result(5)
        assert isinstance(info.value.__cause__, ValueError)
    assert value(metrics, "bertrec_failed_batches_total") == 1
    assert batcher.submit(5, far()).result(5) == 10


def test_wrong_number_of_results_fails_the_batch(setup) -> None:
    _, metrics, created = setup
    batcher: Batcher[int, int] = Batcher(
        "b", lambda items: [0], BatcherConfig(4, 50_000, 10), metrics.for_batcher("m", "b")
    )
    created.append(batcher)
    futures = [batcher.submit(i, far()) for i in range(2)]
    batcher.start()
    for future in futures:
        with pytest.raises(InternalError):
            future.result(5)


def test_close_drains_queued_work_then_refuses_new_items(setup) -> None:
    batcher = make(setup, max_batch_size=2, delay_us=1_000_000)
    futures = [batcher.submit(i, far()) for i in range(3)]
    batcher.start()
    batcher.close(drain=True, timeout_s=5)
    assert [f.result(0) for f in futures] == [0, 2, 4]
    with pytest.raises(NotReady):
        batcher.submit(9, far())


def test_close_without_drain_fails_queued_work(setup) -> None:
    batcher = make(setup)
    future: Future[int] = batcher.submit(1, far())
    batcher.close(drain=False, timeout_s=5)
    with pytest.raises(NotReady):
        future.result(0)


def test_concurrent_submitters_are_batched_together(setup) -> None:
    model, _, _ = setup
    batcher = make(setup, max_batch_size=64, delay_us=200_000)
    batcher.start()
    results: dict[int, int] = {}
    barrier = threading.Barrier(16)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = batcher.submit(i, far()).result(5)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == {i: 2 * i for i in range(16)}
    assert len(model.batches) == 1
    assert sorted(model.batches[0]) == list(range(16))


def test_a_full_queue_first_frees_the_slots_of_cancelled_items(setup) -> None:
    _, metrics, _ = setup
    batcher = make(setup, max_batch_size=8, delay_us=100_000, queue=2)  # worker not started
    first, second = batcher.submit(1, far()), batcher.submit(2, far())
    assert first.cancel()
    third = batcher.submit(3, far())  # takes the cancelled item's slot
    with pytest.raises(ResourceExhausted):
        batcher.submit(4, far())
    batcher.start()
    assert (second.result(5), third.result(5)) == (4, 6)
    assert value(metrics, "bertrec_dropped_total", reason="cancelled") == 1


# ---------------------------------------------------------------- shedding by expected wait


def learn(batcher: Batcher[int, int], batches: int, size: int) -> None:
    """Run a few batches so the batcher knows its service time."""
    for _ in range(batches):
        futures = [batcher.submit(i, far()) for i in range(size)]
        assert [f.result(5) for f in futures] == [2 * i for i in range(size)]


def busy(
    setup: tuple[FakeModel, ServerMetrics, list[Batcher[int, int]]],
    batch_s: float,
    max_batch_size: int,
    first: int = 0,
) -> tuple[Batcher[int, int], Future[int]]:
    """A started batcher that has learnt its batch time (`batch_s` a batch), now computing
    `first` held at the model's gate: the state in which admission judges a newcomer."""
    model, _, _ = setup
    model.batch_s = batch_s
    batcher = make(setup, max_batch_size=max_batch_size, delay_us=0)
    batcher.start()
    learn(batcher, 2, max_batch_size)
    model.gate.clear()
    model.entered.clear()  # set by the learning batches: wait for the held one itself
    running = batcher.submit(first, far())
    assert model.entered.wait(5)
    return batcher, running


def test_a_call_that_would_wait_past_its_deadline_is_refused_at_once(setup) -> None:
    model, metrics, _ = setup
    batcher, running = busy(setup, batch_s=0.1, max_batch_size=2)
    queued = [batcher.submit(i, far()) for i in range(1, 7)]  # three batches: >= 0.3 s
    assert batcher.expected_wait_s() >= 0.3
    start = time.monotonic()
    with pytest.raises(ResourceExhausted, match="overloaded"):
        batcher.submit(9, time.monotonic() + 0.05)
    assert time.monotonic() - start < 0.1
    assert value(metrics, "bertrec_rejected_total") == 1
    patient = batcher.submit(8, far())  # a caller with time to wait is still admitted
    model.gate.set()
    assert [f.result(5) for f in (running, *queued, patient)] == [2 * i for i in range(7)] + [16]


def test_callers_that_left_do_not_count_toward_the_expected_wait(setup) -> None:
    model, metrics, _ = setup
    batcher, running = busy(setup, batch_s=0.1, max_batch_size=2)
    gone = [batcher.submit(i, far()) for i in range(20)]  # ten batches: ~1 s if counted
    for future in gone:
        assert future.cancel()
    admitted = batcher.submit(5, time.monotonic() + 0.8)
    assert value(metrics, "bertrec_dropped_total", reason="cancelled") == 20
    assert value(metrics, "bertrec_rejected_total") == 0
    model.gate.set()
    assert (running.result(5), admitted.result(5)) == (0, 10)


def test_without_shedding_only_the_queue_bound_rejects(setup) -> None:
    model, metrics, _ = setup
    model.batch_s = 0.05
    batcher = make(setup, max_batch_size=2, delay_us=0, shed=False)
    batcher.start()
    learn(batcher, 2, 2)
    model.gate.clear()
    futures = [batcher.submit(i, far()) for i in range(9)]
    late = batcher.submit(9, time.monotonic() + 0.01)  # admitted; expires while queued
    model.gate.set()
    assert [f.result(5) for f in futures] == [2 * i for i in range(9)]
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert value(metrics, "bertrec_rejected_total") == 0


def test_a_call_whose_deadline_has_passed_is_refused_as_expired(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup)
    batcher.start()
    with pytest.raises(DeadlineExceeded):
        batcher.submit(1, time.monotonic() - 0.001)
    assert value(metrics, "bertrec_dropped_total", reason="expired") == 1
    assert model.batches == []


def test_dead_items_are_skipped_when_a_batch_is_formed_so_it_fills_with_live_work(setup) -> None:
    model, metrics, _ = setup
    batcher = make(setup, max_batch_size=2, delay_us=0)  # worker not started yet
    first = batcher.submit(1, far())
    gone = batcher.submit(2, far())
    late = batcher.submit(3, time.monotonic() + 0.02)
    last = batcher.submit(4, far())
    assert gone.cancel()
    time.sleep(0.05)  # `late` expires while queued
    batcher.start()
    assert (first.result(5), last.result(5)) == (2, 8)
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert model.batches == [[1, 4]]
    assert value(metrics, "bertrec_dropped_total", reason="cancelled") == 1
    assert value(metrics, "bertrec_dropped_total", reason="expired") == 1


def test_an_item_that_would_expire_during_its_batch_is_dropped_not_computed(setup) -> None:
    model, metrics, _ = setup
    batcher, running = busy(setup, batch_s=0.2, max_batch_size=1, first=1)
    # Admitted: ~0.2 s left of the running batch + 0.2 s of its own fit in 0.6 s...
    doomed = batcher.submit(2, time.monotonic() + 0.6)
    time.sleep(0.3)  # ...but the running batch overruns: ~0.1 s will be left, not 0.2
    model.gate.set()
    assert running.result(5) == 2
    with pytest.raises(DeadlineExceeded):
        doomed.result(5)
    assert [2] not in model.batches
    assert value(metrics, "bertrec_dropped_total", reason="expired") == 1


def test_calibration_times_a_batch_of_one_and_a_full_batch_before_serving(setup) -> None:
    model, _, _ = setup
    model.batch_s = 0.05
    batcher = make(setup, max_batch_size=4, delay_us=0)
    assert batcher.expected_wait_s() == 0.0  # nothing known: admission by queue bound only
    batcher.calibrate(list(range(10)))
    assert model.batches == [[0], [0, 1, 2, 3]]
    # A fixed 50 ms per batch, whatever its size: not 4 x 50 ms for a full one.
    assert 0.04 < batcher.expected_wait_s() < 0.15


@pytest.fixture
def traced() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    yield tracing, exporter
    tracing.shutdown()


def traced_call(tracing: Tracing, batcher: Batcher[int, int], item: int) -> tuple[int, int]:
    """Submit `item` inside a server span, as the interceptor would; (result, trace id)."""
    span = tracing.start_call("/test.Svc/Call", ())
    trace_id = trace.get_current_span().get_span_context().trace_id
    try:
        return batcher.submit(item, far()).result(5), trace_id
    finally:
        span.end("OK", 0)


def test_each_traced_call_gets_queue_batch_and_step_spans_of_its_batch(setup, traced) -> None:
    tracing, exporter = traced
    model, metrics, created = setup
    # A batch of 3 with a 100 s window: it runs exactly when the third item arrives.
    config = BatcherConfig(3, 100_000_000, 100, shed=False)
    batcher: Batcher[int, int] = Batcher("b", model, config, metrics.for_batcher("m", "b"), "step")
    created.append(batcher)
    batcher.start()
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(traced_call(tracing, batcher, i)))
        for i in (1, 2)
    ]
    for thread in threads:
        thread.start()
    untraced = batcher.submit(3, far())
    for thread in threads:
        thread.join(5)
    assert untraced.result(5) == 6
    assert sorted(r for r, _ in results) == [2, 4]
    assert sorted(model.batches[0]) == [1, 2, 3] and len(model.batches) == 1
    spans = exporter.get_finished_spans()
    by_trace: dict[int, dict[str, ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, {})[span.name] = span
    assert set(by_trace) == {trace_id for _, trace_id in results}  # the untraced item: none
    batch_ids = set()
    for names in by_trace.values():
        assert set(names) == {"test.Svc/Call", "b queue", "b batch", "step"}
        server = names["test.Svc/Call"]
        assert names["b queue"].parent.span_id == server.context.span_id
        assert names["b batch"].parent.span_id == server.context.span_id
        assert names["step"].parent.span_id == names["b batch"].context.span_id
        assert names["b queue"].end_time <= names["b batch"].start_time
        assert names["b batch"].start_time <= names["step"].start_time
        assert names["step"].end_time <= names["b batch"].end_time <= server.end_time
        assert names["b batch"].attributes["bertrec.batch.size"] == 3
        batch_ids.add(names["b batch"].attributes["bertrec.batch.id"])
    assert len(batch_ids) == 1  # one batch, seen from both traces


def test_a_failed_batch_marks_its_traced_spans_as_errors(setup, traced) -> None:
    tracing, exporter = traced
    model, _, _ = setup
    batcher = make(setup, max_batch_size=1, delay_us=1_000)
    model.fail_on = 1
    batcher.start()
    with pytest.raises(InternalError):
        traced_call(tracing, batcher, 1)
    failed = {s.name: s for s in exporter.get_finished_spans()}
    assert failed["b batch"].status.status_code is StatusCode.ERROR
    assert failed["b"].status.status_code is StatusCode.ERROR  # the step (named after the batcher)
    assert failed["b queue"].status.status_code is StatusCode.UNSET


def test_untraced_items_capture_nothing() -> None:
    assert not tracing_anywhere()
    assert capture() is None
