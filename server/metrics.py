"""Every Prometheus series the server exports, on one per-server `CollectorRegistry`.

The `grpc_server_*` series follow the names and labels of go-grpc-prometheus / py-grpc-prometheus
so standard dashboards work; they are recorded only by the interceptor in `interceptor.py`.
The `bertrec_*` series are recorded by the batchers and the model loader. Nothing here is
global: each server owns a `ServerMetrics`, so tests need no registry reset.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
BATCH_LABELS = ("model", "batcher")

# Latency buckets from 100 us to 10 s: batched calls on a small catalogue finish in well under a
# millisecond, while a large catalogue or a long text under load can take seconds.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class BatcherMetrics:
    """The series one batcher writes, already bound to its `model` and `batcher` labels."""

    batch_size: Histogram
    queue_wait_s: Histogram
    inference_s: Histogram
    queue_depth: Gauge
    dropped_expired: Counter
    dropped_cancelled: Counter
    rejected: Counter
    failed_batches: Counter


class ServerMetrics:
    """The Prometheus objects of one server, registered on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_handling_s = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to finishing it, in seconds.",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "bertrec_in_flight_requests", "RPCs being handled right now.", registry=r
        )
        self.rejected_rpcs = Counter(
            "bertrec_rejected_rpcs_total",
            "RPCs refused with RESOURCE_EXHAUSTED at admission: too many unary calls "
            "(reason=calls), too many request bytes in flight (reason=bytes) or too many open "
            "streams (reason=streams). Also counted in grpc_server_handled_total.",
            ("reason",),
            registry=r,
        )
        self.in_flight_request_bytes = Gauge(
            "bertrec_in_flight_request_bytes",
            "Serialized request bytes of the unary calls being handled right now.",
            registry=r,
        )
        self.batch_size = Histogram(
            "bertrec_batch_size",
            "Items per executed batch.",
            BATCH_LABELS,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_wait_s = Histogram(
            "bertrec_queue_wait_seconds",
            "Time an item waited in a batcher queue before its batch ran, in seconds.",
            BATCH_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_s = Histogram(
            "bertrec_inference_seconds",
            "Time to run one batch, in seconds.",
            BATCH_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "bertrec_queue_depth", "Items waiting in a batcher queue.", BATCH_LABELS, registry=r
        )
        self.dropped = Counter(
            "bertrec_dropped_total",
            "Queued items dropped before computing because the caller's deadline passed "
            "(reason=expired) or the caller went away (reason=cancelled).",
            (*BATCH_LABELS, "reason"),
            registry=r,
        )
        self.rejected = Counter(
            "bertrec_rejected_total",
            "Items refused at once (RESOURCE_EXHAUSTED): the batcher queue was full, or its "
            "expected wait did not fit the caller's remaining time.",
            BATCH_LABELS,
            registry=r,
        )
        self.failed_batches = Counter(
            "bertrec_failed_batches_total",
            "Batches whose computation raised; all their callers got INTERNAL.",
            BATCH_LABELS,
            registry=r,
        )
        self.catalogue_items = Gauge(
            "bertrec_catalogue_items", "Items in the served catalogue.", ("model",), registry=r
        )
        self.users = Gauge("bertrec_users", "Users with factors.", ("model",), registry=r)
        self.model_info = Gauge(
            "bertrec_model_info",
            "The model being served (value 1), with its version, encoder execution provider "
            "and encoder graph file.",
            ("model", "version", "provider", "encoder_file"),
            registry=r,
        )

    def for_batcher(self, model: str, batcher: str) -> BatcherMetrics:
        """The batcher series bound to one model and batcher name (e.g. "ranker")."""
        labels = {"model": model, "batcher": batcher}
        return BatcherMetrics(
            batch_size=self.batch_size.labels(**labels),
            queue_wait_s=self.queue_wait_s.labels(**labels),
            inference_s=self.inference_s.labels(**labels),
            queue_depth=self.queue_depth.labels(**labels),
            dropped_expired=self.dropped.labels(**labels, reason="expired"),
            dropped_cancelled=self.dropped.labels(**labels, reason="cancelled"),
            rejected=self.rejected.labels(**labels),
            failed_batches=self.failed_batches.labels(**labels),
        )

    def set_model(
        self, model: str, version: int, provider: str, encoder_file: str, n_items: int, n_users: int
    ) -> None:
        """Record the loaded model's identity and size."""
        self.model_info.labels(
            model=model, version=str(version), provider=provider, encoder_file=encoder_file
        ).set(1)
        self.catalogue_items.labels(model=model).set(n_items)
        self.users.labels(model=model).set(n_users)
