"""The feedback series: events by kind and outcome, store commit latency (the fsync a caller
waits for), replay time, folded users, forgets and store failures."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bertrec.feedback.events import FeedbackEvent

# A local fsync takes 0.1-10 ms on SSDs and far more on network disks or a busy machine.
COMMIT_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
REPLAY_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
KINDS = ("rating", "click", "purchase", "skip")


class FeedbackMetrics:
    """Registered on the server's registry; also the store's `CommitObserver`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "bertrec_feedback_events_total",
            "Feedback events by kind and outcome: accepted (stored and folded in) or "
            "duplicate (idempotency key already stored). Rejected batches are counted in "
            "bertrec_feedback_rejected_batches_total.",
            ("kind", "outcome"),
            registry=r,
        )
        self.rejected_batches = Counter(
            "bertrec_feedback_rejected_batches_total",
            "RecordFeedback batches refused whole with INVALID_ARGUMENT (nothing stored).",
            registry=r,
        )
        self.commit_s = Histogram(
            "bertrec_feedback_commit_seconds",
            "Time of one durable write to the feedback store (one fsync, shared by every call "
            "in the group), in seconds.",
            buckets=COMMIT_BUCKETS_S,
            registry=r,
        )
        self.commit_calls = Histogram(
            "bertrec_feedback_commit_calls",
            "Calls sharing one durable write (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.replay_s = Histogram(
            "bertrec_feedback_replay_seconds",
            "Time to replay the store into a version being loaded, in seconds.",
            buckets=REPLAY_BUCKETS_S,
            registry=r,
        )
        self.folded = Gauge(
            "bertrec_feedback_folded_users",
            "Users whose vectors were re-solved from feedback, on the newest loaded version.",
            registry=r,
            multiprocess_mode="livemax",  # --workers: every worker folds the same users
        )
        self.forgotten = Counter(
            "bertrec_feedback_forgotten_users_total", "ForgetUser calls carried out.", registry=r
        )
        self.store_errors = Counter(
            "bertrec_feedback_store_errors_total",
            "Failed store operations (append, forget, follow): callers got UNAVAILABLE.",
            ("operation",),
            registry=r,
        )
        for kind in KINDS:
            for outcome in ("accepted", "duplicate"):
                self.events.labels(kind=kind, outcome=outcome)

    def committed(self, duration_s: float, events: int, calls: int) -> None:
        self.commit_s.observe(duration_s)
        self.commit_calls.observe(calls)

    def recorded(self, events: Sequence[FeedbackEvent], seqs: Sequence[int | None]) -> None:
        for event, seq in zip(events, seqs, strict=True):
            outcome = "accepted" if seq is not None else "duplicate"
            self.events.labels(kind=event.kind.value, outcome=outcome).inc()

    def rejected(self) -> None:
        self.rejected_batches.inc()

    def replayed(self, duration_s: float) -> None:
        self.replay_s.observe(duration_s)

    def forgot(self) -> None:
        self.forgotten.inc()

    def store_failed(self, operation: str) -> None:
        self.store_errors.labels(operation=operation).inc()
