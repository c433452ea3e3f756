"""Dynamic batching: calls that arrive within a short window run as one batch.

One worker thread owns the queue (the server is a sync grpcio server, see `app.py`; request
threads hand work over and wait on a `concurrent.futures.Future`). The worker waits for the
first item, then for at most `max_queue_delay_us` measured from that item's arrival
(`time.monotonic`), or until `max_batch_size` items are queued, and runs them as one batch.
Inference therefore never runs on a request thread, and numpy/ONNX Runtime release the GIL while
they compute, so request threads keep accepting work meanwhile.

Admission sheds load early. The batcher learns how long its batches take (`service_time.py`)
and `submit` raises `ResourceExhausted` at once when the queue's expected wait does not fit in
the caller's remaining time (`ADMIT_WITHIN` of it), so under overload the excess is refused in
microseconds instead of queueing until its deadline and then being computed for nobody; the
queue also has a hard bound (`max_queue_size`). An item whose deadline has already passed is
refused with `DeadlineExceeded`. Items whose caller went away (cancelled future) or whose
deadline passed while queued (or would pass before their batch finishes) are skipped when a
batch is formed (so the batch fills with live work), checked again right before it runs, and
counted. A batch that raises fails every one of its callers; no future is ever left pending.

Tracing (`tracing.py`): an item queued by a traced call carries that call's trace context, and
the worker gives the call its queue, batch and step spans (recorded before the results are
handed out, so they are complete when the call returns). Untraced, it costs one check per item.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from bertrec.server.errors import DeadlineExceeded, InternalError, NotReady, ResourceExhausted
from bertrec.server.metrics import BatcherMetrics, ServerMetrics
from bertrec.server.service_time import ServiceTime, expected_wait_bound_s, expected_wait_s
from bertrec.server.tracing import BatchTimes, Traced, capture, record_batch, tracing_anywhere

log = logging.getLogger(__name__)

# Admit a call only if its expected wait fits in this share of its remaining time. Batch times
# vary (text lengths), so a queue kept right at the deadline would let about half the calls at
# the margin expire after admission; under sustained overload the queue stays non-empty either
# way, so the margin costs no goodput, only queueing latency.
ADMIT_WITHIN = 0.8

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatcherConfig:
    """Batching window and admission limits of one batcher.

    `shed`: refuse at once an item whose expected wait exceeds its caller's remaining time.
    """

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    shed: bool = True


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    deadline_s: float  # time.monotonic() value after which the result is useless
    enqueued_s: float
    traced: Traced | None = None  # the calling span's context, when the call is traced


class Batcher(Generic[T, R]):
    """Runs `run_batch` over items submitted from many threads, a batch at a time.

    Args:
        name: label for logs, the worker thread and metrics (e.g. "ranker").
        run_batch: computes results for a list of items, one result per item, in order.
        config: batch size, queue delay and queue bound.
        metrics: the series to record into (a private registry when omitted).
        step: the trace span name of the computation (e.g. "rank"; default: `name`).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Sequence[R]],
        config: BatcherConfig,
        metrics: BatcherMetrics | None = None,
        step: str | None = None,
    ) -> None:
        self.name = name
        self._step = step or name
        self._batches = 0  # batch ids for traces (worker thread only)
        self._run_batch = run_batch
        self._config = config
        self._delay_s = config.max_queue_delay_us / 1e6
        self._metrics = metrics or ServerMetrics().for_batcher("", name)
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._service_time = ServiceTime()  # written by the worker, read by submit (lock held)
        self._full_batch_s = 0.0  # its estimate for a full batch, kept with it (`_observe`)
        self._running_until = 0.0  # expected end (monotonic) of the batch running now, or 0
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def calibrate(self, items: list[T]) -> None:
        """Time `run_batch` on the first item alone and on all `items`, before `start`.

        Admission then knows both the fixed cost of a batch and the cost per item from the
        first call on. Learnt only from traffic, a burst would be judged on batches of one
        (all of their time taken as per item: a full batch looks `max_batch_size` times
        dearer than it is) and mostly refused until the first full batch had run.
        """
        for batch in (items[:1], items[: self._config.max_batch_size]):
            start = time.monotonic()
            self._run_batch(batch)
            took_s = time.monotonic() - start
            with self._cond:
                self._observe(len(batch), took_s)

    def submit(self, item: T, deadline_s: float) -> Future[R]:
        """Queue one item; its future resolves with the result or a `ServiceError`.

        Args:
            item: one validated unit of work.
            deadline_s: `time.monotonic()` value after which the item is dropped, not computed.

        Raises:
            ResourceExhausted: the queue holds `max_queue_size` items already.
            NotReady: the batcher is closed (shutting down).
        """
        future: Future[R] = Future()
        now = time.monotonic()
        pending = _Pending(item, future, deadline_s, now, capture())
        with self._cond:
            if self._closed:
                raise NotReady(f"{self.name} is shutting down")
            self._admit(deadline_s, now)
            self._queue.append(pending)
            depth = len(self._queue)
            # Wake the worker only when it has something new to decide on: the first item of a
            # window, or a full batch. Waking it per item costs a GIL hand-off each.
            if depth == 1 or depth == self._config.max_batch_size:
                self._cond.notify()
        self._metrics.queue_depth.set(depth)
        return future

    def expected_wait_s(self) -> float:
        """Seconds a call submitted now would wait for its result (0.0 until a batch ran)."""
        with self._cond:
            return self._expected_wait_s(time.monotonic())

    def _admit(self, deadline_s: float, now: float) -> None:
        """Raise unless an item due at `deadline_s` may join the queue (lock held)."""
        if deadline_s <= now:
            self._metrics.dropped_expired.inc()
            raise DeadlineExceeded(f"deadline passed before the call reached the {self.name}")
        if len(self._queue) >= self._config.max_queue_size:
            self._purge_dead(now)
        if len(self._queue) >= self._config.max_queue_size:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"{self.name} queue is full ({self._config.max_queue_size} items); retry later"
            )
        if not self._config.shed or not self._service_time.known:
            return
        left_s = (deadline_s - now) * ADMIT_WITHIN
        bound_s = expected_wait_bound_s(
            self._full_batch_s, len(self._queue), self._config.max_batch_size,
            self._running_until - now, self._delay_s,
        )  # fmt: skip
        if left_s >= bound_s:  # most calls have time to spare: no full estimate for them
            return
        wait_s = self._expected_wait_s(now)
        if wait_s > left_s:  # maybe only because of callers that left: count live work only
            self._purge_dead(now)
            wait_s = self._expected_wait_s(now)
        if wait_s > left_s:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"{self.name} is overloaded: expected wait {wait_s * 1e3:.0f} ms "
                f"({len(self._queue)} queued) does not fit the call's remaining "
                f"{(deadline_s - now) * 1e3:.0f} ms; retry later or with a longer deadline"
            )

    def _observe(self, size: int, took_s: float) -> None:
        """Record a batch's run time (lock held)."""
        self._service_time.observe(size, took_s)
        self._full_batch_s = self._service_time.batch_s(self._config.max_batch_size)

    def _expected_wait_s(self, now: float) -> float:
        """Expected wait of an item queued now behind the current queue (lock held)."""
        running_left = max(self._running_until - now, 0.0)
        if self._queue:
            window_left = max(self._queue[0].enqueued_s + self._delay_s - now, 0.0)
        else:
            window_left = self._delay_s
        if len(self._queue) >= self._config.max_batch_size:
            window_left = 0.0
        return expected_wait_s(
            self._service_time, len(self._queue), self._config.max_batch_size,
            running_left, window_left,
        )  # fmt: skip

    def close(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Refuse new items, then finish (`drain`) or fail the queued ones and stop the worker."""
        with self._cond:
            self._closed = True
            stranded = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for pending in stranded:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(NotReady(f"{self.name} shut down"))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _purge_dead(self, now: float) -> None:
        """Free the slots of callers that left or ran out of time (lock held)."""
        kept: deque[_Pending[T, R]] = deque()
        for pending in self._queue:
            if not self._resolve_dead(pending, now):
                kept.append(pending)
        self._queue = kept

    def _resolve_dead(self, pending: _Pending[T, R], now: float, due_s: float = 0.0) -> bool:
        """Count and resolve an item nobody waits for any more; False if it is still wanted.

        With `due_s` (when the batch being formed is expected to finish), an item whose
        deadline comes before that is dropped too: computing it would answer nobody.
        """
        if pending.future.cancelled():
            self._metrics.dropped_cancelled.inc()
            return True
        if pending.deadline_s <= max(now, due_s):
            self._metrics.dropped_expired.inc()
            if pending.future.set_running_or_notify_cancel():
                when = "passed" if pending.deadline_s <= now else "would pass"
                pending.future.set_exception(
                    DeadlineExceeded(f"deadline {when} before the {self.name} could run the call")
                )
            return True
        return False

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running_until = 0.0

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Block for the first item, then fill the batch until it is full or the window ends."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            flush_at = self._queue[0].enqueued_s + self._delay_s
            while len(self._queue) < self._config.max_batch_size and not self._closed:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._take_live(time.monotonic())
            depth = len(self._queue)
            if batch:
                self._running_until = time.monotonic() + self._service_time.batch_s(len(batch))
        self._metrics.queue_depth.set(depth)
        return batch

    def _take_live(self, now: float) -> list[_Pending[T, R]]:
        """Pop up to a batch of items, skipping those nobody waits for (lock held).

        With shedding on, an item that would expire before the batch is expected to finish is
        skipped too (under overload such items would otherwise take a share of every batch).
        """
        size = min(len(self._queue), self._config.max_batch_size)
        due_s = now + self._service_time.batch_s(size) if self._config.shed else 0.0
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self._config.max_batch_size:
            pending = self._queue.popleft()
            if not self._resolve_dead(pending, now, due_s):
                batch.append(pending)
        return batch

    def _live(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """Drop items whose caller is gone or whose deadline passed; mark the rest running."""
        now = time.monotonic()
        live = []
        for pending in batch:
            if not pending.future.set_running_or_notify_cancel():
                self._metrics.dropped_cancelled.inc()
            elif pending.deadline_s <= now:
                self._metrics.dropped_expired.inc()
                pending.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for the {self.name}")
                )
            else:
                self._metrics.queue_wait_s.observe(now - pending.enqueued_s)
                live.append(pending)
        return live

    def _run(self, batch: list[_Pending[T, R]]) -> None:
        started_ns = time.time_ns() if tracing_anywhere() else 0
        live = self._live(batch)
        if not live:
            return
        self._batches += 1
        traced = [p.traced for p in live if p.traced is not None] if started_ns else []
        run_ns = (0, 0)
        try:
            start = time.monotonic()
            run_started_ns = time.time_ns() if traced else 0
            results = self._run_batch([p.item for p in live])
            took_s = time.monotonic() - start
            run_ns = (run_started_ns, time.time_ns() if traced else 0)
            self._metrics.inference_s.observe(took_s)
            with self._cond:
                self._observe(len(live), took_s)
            self._metrics.batch_size.observe(len(live))
            if len(results) != len(live):
                raise RuntimeError(f"{len(results)} results for {len(live)} items")
            if traced:
                self._trace(traced, len(live), started_ns, run_ns)
            for pending, result in zip(live, results, strict=True):
                pending.future.set_result(result)
        except BaseException as exc:
            log.exception("%s batch of %d failed", self.name, len(live))
            self._metrics.failed_batches.inc()
            error = InternalError(f"{self.name} batch failed: {exc!r}")
            error.__cause__ = exc
            if traced:
                self._trace(traced, len(live), started_ns, run_ns, exc)
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(error)

    def _trace(
        self,
        traced: list[Traced],
        size: int,
        started_ns: int,
        run_ns: tuple[int, int],
        error: BaseException | None = None,
    ) -> None:
        """Record this batch's spans in each traced call (never fails the batch)."""
        ended_ns = time.time_ns()
        run_started_ns, run_ended_ns = run_ns if run_ns[0] else (ended_ns, ended_ns)
        times = BatchTimes(
            self._batches, size, started_ns, run_started_ns, run_ended_ns or ended_ns, ended_ns,
            error,
        )  # fmt: skip
        try:
            record_batch(traced, self.name, self._step, times)
        except Exception:
            log.exception("%s: recording trace spans failed", self.name)
