"""Every Prometheus series the server exports, on one per-server `CollectorRegistry`.

Label convention: go-grpc-prometheus (github.com/grpc-ecosystem/go-grpc-prometheus), the one
most community dashboards and alerts are written for. The `grpc_server_*` series have its names
and labels, with its label values:
- `grpc_type`: `unary`, `client_stream`, `server_stream`, `bidi_stream`;
- `grpc_code`: Go's `codes.Code.String()`: `OK`, `Canceled`, `Unknown`, `InvalidArgument`,
  `DeadlineExceeded`, `NotFound`, `AlreadyExists`, `PermissionDenied`, `ResourceExhausted`,
  `FailedPrecondition`, `Aborted`, `OutOfRange`, `Unimplemented`, `Internal`, `Unavailable`,
  `DataLoss`, `Unauthenticated` (`code_label`);
- `grpc_service` (full name, `bertrec.v1.RecommenderService`) and `grpc_method` (`Recommend`).
They are recorded only by the interceptor in `interceptor.py`. Health checks and reflection are
counted too: dashboards filter them by `grpc_service`.

The `bertrec_*` series are recorded by the batchers and the model loader. Nothing here is
global: each server owns a `ServerMetrics`, so tests need no registry reset. The `_created`
series of counters and histograms are not exported (they double the series count and no
dashboard reads them); prometheus_client can only switch them off process-wide, which
`ServerMetrics` does.

With `--workers N` each worker process writes its series to files the supervisor sums
(prometheus_client's multiprocess mode, `workers.py`); every gauge therefore names how workers
combine: `livesum` for what is in flight or queued, `livemax` for the model's identity and size
(the same in every worker once a swap has reached them all). Dead workers' gauges drop out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from bertrec.server.feedback_metrics import FeedbackMetrics

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = (
    "unary", "client_stream", "server_stream", "bidi_stream",
)  # fmt: skip
# grpc.StatusCode -> Go's codes.Code.String() (note Go's spelling "Canceled")
_CODE_LABELS = {
    code: "Canceled"
    if code is grpc.StatusCode.CANCELLED
    else "".join(part.capitalize() for part in code.name.split("_"))
    for code in grpc.StatusCode
}
_CODE_LABELS[grpc.StatusCode.OK] = "OK"
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
BATCH_LABELS = ("model", "batcher")

# Latency buckets from 100 us to 10 s: batched calls on a small catalogue finish in well under a
# millisecond, while a large catalogue or a long text under load can take seconds.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A tiny test model loads in well under a second; a large catalogue with a big encoder in minutes.
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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


def code_label(code: grpc.StatusCode) -> str:
    """The `grpc_code` label value of a status code (go-grpc-prometheus: `InvalidArgument`)."""
    return _CODE_LABELS[code]


class ServerMetrics:
    """The Prometheus objects of one server, registered on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # process-wide in prometheus_client; see the module doc
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
            "bertrec_in_flight_requests",
            "RPCs being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
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
            multiprocess_mode="livesum",
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
            "bertrec_queue_depth",
            "Items waiting in a batcher queue.",
            BATCH_LABELS,
            registry=r,
            multiprocess_mode="livesum",
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
            "bertrec_catalogue_items",
            "Items in the served catalogue.",
            ("model",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.users = Gauge(
            "bertrec_users",
            "Users with factors.",
            ("model",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "bertrec_model_info",
            "The model being served (value 1), with its version, encoder execution provider "
            "and encoder graph file.",
            ("model", "version", "provider", "encoder_file"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.serving_version = Gauge(
            "bertrec_model_serving_version",
            "The version that answers calls naming none.",
            ("model",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_swaps = Counter(
            "bertrec_model_swaps_total",
            "Times the serving version changed (the first load included).",
            ("model",),
            registry=r,
        )
        self.model_load_s = Histogram(
            "bertrec_model_load_seconds",
            "Time to load a version (verify, map, create sessions, warm up), in seconds.",
            ("model",),
            buckets=LOAD_BUCKETS_S,
            registry=r,
        )
        self.model_load_failures = Counter(
            "bertrec_model_load_failures_total",
            "Versions that failed to load (verification, warm-up); never served.",
            ("model",),
            registry=r,
        )
        self.auth_failures = Counter(
            "bertrec_auth_failures_total",
            "Calls refused by authentication or authorisation, by reason: missing (no "
            "credential), invalid_token, malformed (not 'Bearer <token>'), forbidden (a valid "
            "credential without the method's role). Never labelled with a token or caller.",
            ("reason",),
            registry=r,
        )
        for reason in ("missing", "invalid_token", "malformed", "forbidden"):
            self.auth_failures.labels(reason=reason)
        self.feedback = FeedbackMetrics(r)
        self._info_labels: dict[tuple[str, int], tuple[str, str]] = {}
        self._info_lock = threading.Lock()

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
        """Record a loaded version's identity and size (one `bertrec_model_info` per version)."""
        self.model_info.labels(
            model=model, version=str(version), provider=provider, encoder_file=encoder_file
        ).set(1)
        with self._info_lock:
            self._info_labels[(model, version)] = (provider, encoder_file)
        self.catalogue_items.labels(model=model).set(n_items)
        self.users.labels(model=model).set(n_users)

    def remove_model(self, model: str, version: int) -> None:
        """Drop a closed version's `bertrec_model_info` series."""
        with self._info_lock:
            labels = self._info_labels.pop((model, version), None)
        if labels is not None:
            # Worker processes (`workers.py`) keep values in files that `remove` leaves alone:
            # 0 there marks the version gone (livemax of 0); a single process drops it anyway.
            self.model_info.labels(model, str(version), *labels).set(0)
            self.model_info.remove(model, str(version), *labels)

    def for_versions(self, model: str) -> VersionSeries:
        """The version events of one model (a `model_slot.VersionMetrics`)."""
        return VersionSeries(self, model)


class VersionSeries:
    """`ModelSlot`/`VersionWatcher` events -> the model series of one model."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self._swaps = metrics.model_swaps.labels(model=model)
        self._load_s = metrics.model_load_s.labels(model=model)
        self._failures = metrics.model_load_failures.labels(model=model)
        self._serving = metrics.serving_version.labels(model=model)

    def added(self, version: int) -> None:
        pass  # `bertrec_model_info` is set by the loader, which knows the provider and graph

    def removed(self, version: int) -> None:
        self._metrics.remove_model(self._model, version)

    def swapped(self, serving: int) -> None:
        self._swaps.inc()
        self._serving.set(serving)

    def load_finished(self, version: int, duration_s: float) -> None:
        self._load_s.observe(duration_s)

    def load_failed(self, version: int) -> None:
        self._failures.inc()
