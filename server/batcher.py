"""Dynamic batching: calls that arrive within a short window run as one batch.

One worker thread owns the queue (the server is a sync grpcio server, see `app.py`; request
threads hand work over and wait on a `concurrent.futures.Future`). The worker waits for the
first item, then for at most `max_queue_delay_us` measured from that item's arrival
(`time.monotonic`), or until `max_batch_size` items are queued, and runs them as one batch.
Inference therefore never runs on a request thread, and numpy/ONNX Runtime release the GIL while
they compute, so request threads keep accepting work meanwhile.

Before computing, items whose caller went away (cancelled future) or whose deadline passed are
dropped and counted. The queue is bounded: `submit` raises `ResourceExhausted` at once when it
is full. A batch that raises fails every one of its callers; no future is ever left pending.
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

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatcherConfig:
    """Batching window and admission limit of one batcher."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    deadline_s: float  # time.monotonic() value after which the result is useless
    enqueued_s: float


class Batcher(Generic[T, R]):
    """Runs `run_batch` over items submitted from many threads, a batch at a time.

    Args:
        name: label for logs, the worker thread and metrics (e.g. "ranker").
        run_batch: computes results for a list of items, one result per item, in order.
        config: batch size, queue delay and queue bound.
        metrics: the series to record into (a private registry when omitted).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Sequence[R]],
        config: BatcherConfig,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._config = config
        self._delay_s = config.max_queue_delay_us / 1e6
        self._metrics = metrics or ServerMetrics().for_batcher("", name)
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
        pending = _Pending(item, future, deadline_s, time.monotonic())
        with self._cond:
            if self._closed:
                raise NotReady(f"{self.name} is shutting down")
            if len(self._queue) >= self._config.max_queue_size:
                self._purge_cancelled()
            if len(self._queue) >= self._config.max_queue_size:
                self._metrics.rejected.inc()
                raise ResourceExhausted(
                    f"{self.name} queue is full ({self._config.max_queue_size} items); retry later"
                )
            self._queue.append(pending)
            depth = len(self._queue)
            # Wake the worker only when it has something new to decide on: the first item of a
            # window, or a full batch. Waking it per item costs a GIL hand-off each.
            if depth == 1 or depth == self._config.max_batch_size:
                self._cond.notify()
        self._metrics.queue_depth.set(depth)
        return future

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

    def _purge_cancelled(self) -> None:
        """Free the slots of callers that left (called with the lock held, on a full queue)."""
        kept = [p for p in self._queue if not p.future.cancelled()]
        self._metrics.dropped_cancelled.inc(len(self._queue) - len(kept))
        self._queue = deque(kept)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

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
            n = min(len(self._queue), self._config.max_batch_size)
            batch = [self._queue.popleft() for _ in range(n)]
            depth = len(self._queue)
        self._metrics.queue_depth.set(depth)
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
        live = self._live(batch)
        if not live:
            return
        try:
            start = time.monotonic()
            results = self._run_batch([p.item for p in live])
            self._metrics.inference_s.observe(time.monotonic() - start)
            self._metrics.batch_size.observe(len(live))
            if len(results) != len(live):
                raise RuntimeError(f"{len(results)} results for {len(live)} items")
            for pending, result in zip(live, results, strict=True):
                pending.future.set_result(result)
        except BaseException as exc:
            log.exception("%s batch of %d failed", self.name, len(live))
            self._metrics.failed_batches.inc()
            error = InternalError(f"{self.name} batch failed: {exc!r}")
            error.__cause__ = exc
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(error)
