"""Build, start, wait for and stop one bertrec server.

Server style: synchronous grpcio (a thread pool of handlers, one batcher thread per model
part of each loaded version), chosen by measuring both styles on this workload with
`python -m bertrec.bench.server` (Recommend, 100k x 64 catalogue, k=10, loopback, client on
the same 2 cores; bench/results/server.json, best of 2 interleaved rounds):

    q/s (p99 ms)                     c=1          c=16         c=64
    bare echo, sync grpcio          1419 (1.2)   3221 (9.3)   3357 (39)
    bare echo, grpc.aio             1322 (1.3)   2643 (9.7)   2540 (36)
    Recommend, sync, batching on     197 (6.2)    688 (43)    1085 (108)
    Recommend, aio,  batching on     198 (7.9)    710 (32)    1002 (107)
    Recommend, sync, batching off    203 (6.3)    652 (31)     573 (143)

Across runs the two styles tie on Recommend throughput (sync/aio at c=64 between 0.75 and 1.08),
while the bare sync transport is consistently faster (1.13-1.66x) and its CPU per call lower
(310 vs 429 us). On this workload the catalogue scan and the per-call Python path, not the
transport, take most of the CPU (~1.2 ms per call at c=64 against ~0.3 ms for a bare echo).
Sync wins the tie: the faster transport, and a simpler hand-off (handler threads block on a
`concurrent.futures.Future` that the batcher thread resolves; no event loop to keep free).
Blocked handler threads cost no CPU, so the unary pool is sized to the concurrency to batch
over (`grpc_max_workers`, or more: see below). Dynamic batching gave 1.9x at c=64 (batching off
scans the whole catalogue once per call).

Admission: grpc's own `maximum_concurrent_rpcs` is not used. The interceptor admits each call
against `max_concurrent_rpcs`, `max_inflight_request_bytes` and `max_streaming_rpcs` and refuses
the rest with a counted RESOURCE_EXHAUSTED; unary calls and streams run on separate pools, each
a few threads above its limit (`admission.py`).

Use:
    server = Server(config)
    server.start()        # checks a version to serve exists, then binds ports; NOT_SERVING
    server.load()         # loads, verifies and warms the version(s); SERVING; starts polling
    server.wait()         # after request_stop() (e.g. from a signal handler): drains, stops

`stop()` drains: NOT_SERVING, keep answering until the unary calls go quiet, then stop grpc with
what is left of the grace period (`drain.py`), and only then close the loaded versions.

Model versions: one `ModelSlot` owns the loaded versions (each a started `Recommender`); every
call leases one at entry. The `VersionWatcher` loads new versions in the background (policy,
polling, the model-repository RPCs) and swaps them in; see `live_versions.py`.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bertrec.errors import ArtifactError
from bertrec.feedback.store import open_store
from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from bertrec.repository.versions import resolve_version
from bertrec.server import thread_names
from bertrec.server.admission import Admission, AdmissionLimits, handler_pools
from bertrec.server.auth import Authorizer, CredentialsFile
from bertrec.server.config import ConfigError, ServerConfig
from bertrec.server.drain import drain_grpc, unary_activity
from bertrec.server.feedback import Feedback
from bertrec.server.http_endpoints import HttpEndpoints
from bertrec.server.interceptor import CallObserver, MetricsAndErrorsInterceptor
from bertrec.server.lifecycle import HEALTH_SERVICE_NAME, SERVICE_NAME, Lifecycle
from bertrec.server.live_versions import build_versions
from bertrec.server.metrics import ServerMetrics
from bertrec.server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from bertrec.server.oip import InferenceServicer
from bertrec.server.oip.repository import RepositoryControl
from bertrec.server.service import RecommenderServicer
from bertrec.server.tls import RotatingCredentials, TlsFiles
from bertrec.server.tracing import Tracing
from bertrec.server.version_watcher import RepositoryVersions
from bertrec.v1 import recommender_pb2_grpc

log = logging.getLogger(__name__)

# Calls grpc core may hold before the Python loop picks them up (at least; see _grpc_server).
MIN_PENDING_CALLS = 4096


class Server:
    """One gRPC server (recommender, Open Inference Protocol, health, reflection) + HTTP.

    The HTTP port serves /metrics, /healthz and /readyz (see `http_endpoints.py`).
    """

    def __init__(self, config: ServerConfig) -> None:
        thread_names.install()  # before any thread starts: `top -H` then shows each one's role
        self.config = config
        self.metrics = ServerMetrics()
        self.feedback = Feedback(
            open_store(config.feedback_store, self.metrics.feedback)
            if config.feedback_store else None,
            self.metrics.feedback,
            config.feedback_poll_interval_s,
        )  # fmt: skip
        self.slot, self.watcher = build_versions(config, self.metrics, self.feedback)
        self.lifecycle = Lifecycle(self.slot)
        self.tls = _tls_files(config)
        self._credentials = RotatingCredentials(self.tls) if self.tls is not None else None
        self.authorizer = Authorizer(
            CredentialsFile(Path(config.auth_file)) if config.auth_file else None,
            config.reflection,
            lambda reason: self.metrics.auth_failures.labels(reason=reason).inc(),
        )
        # Tracing and the access log, off unless configured (the OpenTelemetry SDK is imported
        # only for an OTLP endpoint); closed last on stop, flushing the last calls' spans.
        self.observer = CallObserver(Tracing.from_endpoint(config.otlp_endpoint), config.access_log)
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.Server | None = None
        self._grpc: grpc.Server | None = None
        self._listening = False
        self._http: HttpEndpoints | None = None
        self._stream_pool: ThreadPoolExecutor | None = None
        self._stop_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False

    def start(self, listen: bool = True) -> None:
        """Check that a version to serve exists, bind both ports and start serving.

        Health is NOT_SERVING until `load` finishes. A repository without a complete version
        the policy selects fails before any port is bound, so nothing is announced. With
        `listen=False` the gRPC (and health) ports are bound only by `listen()`: a restarted
        worker (`workers.py`) loads first, so the kernel never hands it a new connection whose
        calls it would refuse while its siblings could answer them.

        Raises:
            ArtifactError: no complete version of the model matches the version policy.
            ConfigError: a port cannot be bound.
        """
        c = self.config
        _check_versions(c)
        self._http = _http(c, self.metrics, self.lifecycle)
        self.metrics_port = self._http.port
        server = self._grpc_server()
        lifecycle = self.lifecycle
        recommender_pb2_grpc.add_RecommenderServiceServicer_to_server(
            RecommenderServicer(lifecycle.lease, c, self.feedback), server
        )
        health = lifecycle.health
        repository = RepositoryControl(self.watcher, c.model, c.model_control)
        oip = InferenceServicer(lifecycle.lease, lifecycle.loaded, health, c.model,
                                c.request_timeout_s, repository)  # fmt: skip
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(oip, server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if c.reflection != "off":
            reflection.enable_server_reflection(
                (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
                server,
            )
        self._grpc = server
        self._http.start()
        if listen:
            self.listen()

    def listen(self) -> None:
        """Bind the gRPC port (and the health-only port) and start answering calls.

        Raises:
            ConfigError: a port cannot be bound.
        """
        c, server = self.config, self._grpc
        assert server is not None, "start() first"
        creds = self._credentials.credentials if self._credentials is not None else None
        self.port = _bind(server, c.grpc_address, creds)
        if c.health_port is not None:
            self._health_server = _health_only_server(self.lifecycle.health, c.workers > 1)
            self.health_port = _bind(self._health_server, f"{c.host}:{c.health_port}", None)
            self._health_server.start()
        server.start()
        self._listening = True
        _warn_if_exposed(c)
        log.info(
            "gRPC%s on %s:%d, metrics%s on %s:%d, auth %s, reflection %s",
            " (TLS" + (", client certificates required)" if c.tls_client_ca else ")")
            if c.tls else " (plaintext)",
            c.host, self.port, " (TLS)" if c.metrics_tls else "", c.host, self.metrics_port,
            "on" if self.authorizer.enabled else "off", c.reflection,
        )  # fmt: skip

    def load(self) -> None:
        """Load, verify and warm up the policy's version(s), report SERVING, start polling.

        Raises:
            ArtifactError: no version could be loaded (each failure is named).
        """
        version = self.watcher.load_initial()
        self.feedback.start()
        self.lifecycle.ready()
        self.watcher.start()
        log.info(
            "serving %s version %d: health SERVING (policy %s, model control %s, poll %g s)",
            self.config.model, version, self.config.policy, self.config.model_control,
            self.config.poll_s,
        )  # fmt: skip

    def request_stop(self) -> None:
        """Ask `wait` to shut down gracefully. Safe to call from a signal handler."""
        self._stop_requested.set()

    def stop_requested(self) -> bool:
        """Whether `request_stop` was called (a signal, or a worker's lost supervisor)."""
        return self._stop_requested.is_set()

    def wait(self) -> None:
        """Block until `request_stop`, then shut down gracefully."""
        # A timeout keeps the main thread waking up, so signal handlers run promptly.
        while not self._stop_requested.wait(0.5):
            pass
        self.stop()

    def stop(self, grace_period_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight ones finish.

        Args:
            grace_period_s: how long in-flight calls may take (default: the config's).
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_period_s if grace_period_s is None else grace_period_s
        log.info("shutting down (grace period %.1f s)", grace)
        self.lifecycle.shutting_down()
        self.watcher.stop(grace)
        if self._grpc is not None and self._listening:
            drain_grpc(self._grpc, lambda: unary_activity(self.metrics.registry), grace)
        self.slot.shutdown(grace)  # in-flight calls are over: every version closes now
        self.feedback.close()
        if self._stream_pool is not None:
            self._stream_pool.shutdown(wait=False)
        if self._http is not None:
            self._http.stop()
        if self._health_server is not None:
            self._health_server.stop(0)
        self.observer.close()
        log.info("stopped")

    def _grpc_server(self) -> grpc.Server:
        """The gRPC server with admission in its interceptor (not grpc's uncounted limit)."""
        c = self.config
        limits = AdmissionLimits(
            max_calls=c.max_concurrent_rpcs,
            max_request_bytes=c.max_inflight_request_bytes,
            max_streams=c.max_streaming_rpcs,
        )
        admission = Admission(
            limits, self.metrics.rejected_rpcs, self.metrics.in_flight_request_bytes
        )
        calls_pool, self._stream_pool = handler_pools(limits, c.grpc_max_workers)
        interceptor = MetricsAndErrorsInterceptor(
            self.metrics, admission, self._stream_pool, self.authorizer, self.observer
        )
        # grpc core holds calls the Python loop has not picked up yet; past its default of
        # 1,000 such calls it cancels them (CANCELLED, invisible to the metrics). Let more wait
        # for the loop, which refuses them at once with a counted RESOURCE_EXHAUSTED.
        pending = max(MIN_PENDING_CALLS, 8 * (c.max_concurrent_rpcs + c.max_streaming_rpcs))
        options = [
            # --workers N: every worker listens on the same port (workers.py); alone, a second
            # server on the port must fail to bind rather than share its calls.
            ("grpc.so_reuseport", 1 if c.workers > 1 else 0),
            ("grpc.max_receive_message_length", c.max_request_bytes),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ]
        return grpc.server(calls_pool, interceptors=[interceptor], options=options)


def _check_versions(config: ServerConfig) -> None:
    """Fail before binding anything when no complete version matches the policy."""
    complete = RepositoryVersions(config.model_repo, config.model).complete_versions()
    if config.policy.select(complete):
        return
    resolve_version(config.model_repo, config.model, config.version)  # names what exists
    listed = ", ".join(str(v) for v in sorted(complete)) or "none"
    raise ArtifactError(
        f"{config.model_repo}: no complete version of {config.model!r} matches version "
        f"policy {config.policy} (complete versions: {listed})"
    )


def _tls_files(config: ServerConfig) -> TlsFiles | None:
    if not config.tls:
        return None
    ca = Path(config.tls_client_ca) if config.tls_client_ca else None
    return TlsFiles(Path(config.tls_cert), Path(config.tls_key), ca)


def _warn_if_exposed(config: ServerConfig) -> None:
    """A clear warning when calls (and tokens) would cross a network in plaintext."""
    if _loopback(config.host):
        return
    if not config.tls:
        log.warning(
            "gRPC listens on %s WITHOUT TLS: calls%s cross the network in clear. Set "
            "--tls-cert/--tls-key (or bind 127.0.0.1 behind a TLS-terminating proxy or mesh)",
            config.host, " and their bearer tokens" if config.auth_file else "",
        )  # fmt: skip
    if not config.metrics_tls:
        log.warning("metrics and probes on %s:%d are plaintext (--metrics-tls to encrypt them)",
                    config.host, config.metrics_port)  # fmt: skip


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _health_only_server(health: Any, shared: bool) -> grpc.Server:
    """A plaintext server with grpc.health.v1 alone: probes that cannot speak TLS use it.

    `shared`: every worker of `--workers N` listens on the port; alone, a second server must
    fail to bind it rather than answer the probes meant for this one (as for the gRPC port).
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 1 if shared else 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server


def _http(config: ServerConfig, metrics: ServerMetrics, lifecycle: Lifecycle) -> HttpEndpoints:
    tls = None
    if config.metrics_tls:
        tls = _tls_files(config)
    try:
        return HttpEndpoints(
            config.host, config.metrics_port, metrics.registry, lifecycle.serving,
            config.http_timeout_s, tls=tls,
        )  # fmt: skip
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}"
        ) from exc


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind gRPC to {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot bind gRPC to {address}")
    return port
