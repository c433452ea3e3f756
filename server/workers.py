"""`bertrec serve --workers N`: N server processes on one gRPC port, supervised by a parent.

Why processes: one interpreter's lock bounds the Python work per call (issue 14), and grpc's
guidance for Python is one server process per core sharing the port with `SO_REUSEPORT`, the
kernel spreading new connections over the listening processes by a hash of their addresses. A
single channel is one connection and so one worker: the spread needs several connections.

The parent binds no gRPC listener. It reserves the port (a bound, never listening socket with
`SO_REUSEPORT`, so port 0 resolves once and every worker gets the same number), starts N
`python -m bertrec.server.workers RUN_DIR SLOT` processes each running the whole `Server`
(its own batchers and version watcher; the memory-mapped arrays, and what each version
derives from them, are shared through the page cache: `shared_layout`), and serves the one
metrics/probe endpoint:
- `/metrics` sums every worker's series: workers write them to files under
  `PROMETHEUS_MULTIPROC_DIR` (set in their environment before they import prometheus_client)
  and the parent reads them with `MultiProcessCollector`, plus its own
  `bertrec_worker_restarts_total` and `bertrec_workers_ready`;
- `/readyz` is 200 once every worker has reported SERVING, and then while at least one does.
  A worker binds the port only once it serves, first start or restart: the kernel hands each
  new connection to any listener, so a worker listening while it loads would take about one in
  N connections (and probes) and refuse their calls. Meanwhile every new connection goes to a
  sibling that answers (on fewer cores; `bertrec_workers_ready` says how many), and before the
  first worker serves, connections are refused (UNAVAILABLE, which clients retry).
A worker tells the parent its state through a small JSON file in the run folder (pid, its own
metrics port, started/ready). A worker that dies is restarted (at once, then with a back-off if
it keeps dying before it has served for `YOUNG_S`) and counted; SIGTERM/SIGINT/SIGHUP to the
parent are forwarded to every worker, which drains as a single server does, and the parent
exits 0 once they have (also when the signal comes while the workers still load).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from bertrec.errors import BertrecError
from bertrec.server.config import ConfigError, ServerConfig
from bertrec.server.environment import usable_cpus, worker_cpus
from bertrec.server.http_endpoints import HttpEndpoints
from bertrec.server.shared_layout import LAYOUT_DIR_ENV
from bertrec.server.thread_placement import pin_every_thread
from bertrec.server.tls import TlsFiles

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
POLL_S = 0.1
YOUNG_S = 10.0  # a worker that dies before serving this long is restarted after a back-off
MAX_BACKOFF_S = 30.0
STOP_MARGIN_S = 10.0  # past the grace period, before a worker that has not exited is killed


class WorkerError(BertrecError):
    """A worker exited before it first served (its own error is in the log above)."""


@dataclass
class _Slot:
    """One worker position: the process now filling it and its restart history."""

    index: int
    cpus: set[int] | None = None  # the CPUs its worker runs on (`pin_workers`), None: any
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    served_at: float = 0.0  # when the running worker first reported SERVING (0: not yet)
    young_deaths: int = 0
    restart_at: float = 0.0
    announced_pid: int = 0


class Supervisor:
    """Starts, watches, restarts and drains the worker processes; serves the merged metrics.

    Use like `Server`: `start()` (workers bound the port), `load()` (all of them SERVING),
    `wait()` (until `request_stop()`, restarting crashed workers), `stop()` (drain all).
    """

    def __init__(self, config: ServerConfig, python: str = sys.executable) -> None:
        self.config = config
        self._python = python
        # The port first: a port in use fails before anything is created on disk.
        self._reservation = _reserve_port(config.host, config.grpc_port)
        self.port = int(self._reservation.getsockname()[1])
        self._health_reservation: socket.socket | None = None
        if config.health_port:  # every worker joins it too: refused if anything holds it
            try:
                self._health_reservation = _reserve_port(
                    config.host, config.health_port, "the health port"
                )
            except ConfigError:
                self._reservation.close()
                raise
        self._run_dir = Path(tempfile.mkdtemp(prefix="bertrec-workers-"))
        self._metrics_dir = self._run_dir / "metrics"
        self._metrics_dir.mkdir()
        # Derived arrays (Ranker layout, id indexes) every worker maps instead of building its
        # own heap copy (`shared_layout`); removed with the run folder when the parent exits.
        self._layout_dir = self._run_dir / "layouts"
        self._layout_dir.mkdir(mode=0o700)
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cpus = worker_cpus(config.workers, config.pin_workers, usable_cpus(), affinity)
        self._slots = [_Slot(i, None if cpus is None else cpus[i]) for i in range(config.workers)]
        if cpus is not None:
            log.info("workers pinned to CPUs %s", " | ".join(_cpu_list(c) for c in cpus))
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(self._metrics_dir))
        self._restarts = Counter(
            "bertrec_worker_restarts_total",
            "Worker processes restarted after they exited unasked (crash, OOM kill).",
            registry=self.registry,
        )
        self._ready_gauge = Gauge(
            "bertrec_workers_ready", "Worker processes reporting SERVING.", registry=self.registry
        )
        self._ready_gauge.set_function(lambda: sum(self._ready_pids().values()))
        self._http: HttpEndpoints | None = None
        self.metrics_port = 0
        self._stop_requested = threading.Event()
        self._stopping = False
        self._all_served = False  # set once every first worker has served (`ready`)

    def start(self) -> None:
        """Serve the metrics port, start every worker, return once all have read their config
        (they bind the gRPC port only when they serve, `load`).

        Raises:
            WorkerError: a worker exited first (e.g. no version to serve, a bad TLS file).
            ConfigError: the metrics port cannot be bound.
        """
        # The metrics port first: a port in use fails before any worker loads a model.
        self._http = _http(self.config, self.registry, self.ready)
        self.metrics_port = self._http.port
        self._http.start()
        worker_config = replace(self.config, grpc_port=self.port, metrics_port=0)
        (self._run_dir / "config.pickle").write_bytes(pickle.dumps(worker_config))
        for slot in self._slots:
            self._spawn(slot)
        self._wait_all("started")

    def load(self) -> None:
        """Block until every worker reports SERVING.

        Raises:
            WorkerError: a worker exited before it served.
        """
        self._wait_all("ready")
        self._all_served = self._all_served or not self._stop_requested.is_set()
        self._announce_new_workers()

    def ready(self) -> bool:
        """`/readyz`: no drain has begun, and every worker is SERVING, or, once all have been,
        at least one is (a replacement listens only when it serves, so it refuses nothing)."""
        if self._stopping:
            return False
        ready = self._ready_pids()
        if self._all_served:
            return any(ready.values())
        return len(ready) == len(self._slots) and all(ready.values())

    def request_stop(self) -> None:
        """Ask `wait` to drain every worker. Safe to call from a signal handler."""
        self._stop_requested.set()

    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def wait(self) -> None:
        """Restart workers that exit, until `request_stop`; then drain them all."""
        while not self._stop_requested.wait(POLL_S):
            for slot in self._slots:
                self._watch(slot)
            self._announce_new_workers()
        self.stop()

    def stop(self) -> None:
        """Forward SIGTERM to every worker, wait for their drains, clean up. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        running = [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period_s + STOP_MARGIN_S
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not drain in time: killed", proc.pid)
                proc.kill()
                proc.wait()
        if self._http is not None:
            self._http.stop()
        self._reservation.close()
        if self._health_reservation is not None:
            self._health_reservation.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        log.info("all %d workers stopped", len(self._slots))

    def _spawn(self, slot: _Slot) -> None:
        _state_file(self._run_dir, slot.index).unlink(missing_ok=True)
        _error_file(self._run_dir, slot.index).unlink(missing_ok=True)
        env = dict(os.environ, **{MULTIPROC_ENV: str(self._metrics_dir),
                                  LAYOUT_DIR_ENV: str(self._layout_dir)})  # fmt: skip
        # The worker checks from its first line that this process is still its parent: one
        # orphaned while it imported must not go on to serve on its own.
        command = [self._python, "-m", "bertrec.server.workers", str(self._run_dir),
                   str(slot.index), str(os.getpid())]  # fmt: skip
        if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
            command.append("--debug")
        if slot.cpus is not None:
            command.append(f"--cpus={_cpu_list(slot.cpus)}")
        # stdout is the parent's to announce ports on; a worker's output goes to the log.
        slot.proc = subprocess.Popen(command, env=env, stdout=sys.stderr)
        if slot.cpus is not None:  # at once, so the threads it starts inherit it (see --cpus)
            try:
                os.sched_setaffinity(slot.proc.pid, slot.cpus)
            except ProcessLookupError:  # it exited already: `_watch` will see
                pass
            except OSError as exc:  # e.g. the CPU went offline: it runs unpinned
                log.warning("worker %d: cannot pin to CPUs %s: %s", slot.index,
                            _cpu_list(slot.cpus), exc)  # fmt: skip
        slot.started_at, slot.served_at = time.monotonic(), 0.0

    def _watch(self, slot: _Slot) -> None:
        """Restart the slot's worker if it exited, after its back-off."""
        proc = slot.proc
        now = time.monotonic()
        if proc is not None:
            code = proc.poll()
            if code is None:
                if not slot.served_at and self._ready_pids().get(slot.index):
                    slot.served_at = now
                if slot.served_at and now - slot.served_at > YOUNG_S:
                    slot.young_deaths = 0
                return
            mark_process_dead(proc.pid, str(self._metrics_dir))  # its live gauges go
            # Young: it never served, or served less than YOUNG_S (a load that takes longer
            # than YOUNG_S and then dies, e.g. killed for memory, is young however old).
            young = not slot.served_at or now - slot.served_at < YOUNG_S
            slot.young_deaths += 1 if young else 0
            backoff = min(MAX_BACKOFF_S, 2.0 ** (slot.young_deaths - 1)) if slot.young_deaths else 0
            slot.restart_at = now + backoff
            log.error("worker %d (pid %d) exited with %d; restarting in %.0f s",
                      slot.index, proc.pid, code, backoff)  # fmt: skip
            slot.proc = None
        if now >= slot.restart_at:
            self._restarts.inc()
            self._spawn(slot)

    def _wait_all(self, state: str) -> None:
        """Until every worker has reached `state`, or a stop was asked (Ctrl-C while loading:
        `wait` then drains what has started, and `bertrec serve` exits 0)."""
        while not self._stop_requested.is_set():
            states = {s.index: _read_state(self._run_dir, s) for s in self._slots}
            if all(st is not None and _reached(st, state) for st in states.values()):
                return
            for slot in self._slots:
                assert slot.proc is not None
                code = slot.proc.poll()
                if code is not None:
                    error = _error_file(self._run_dir, slot.index)
                    why = f": {error.read_text()}" if error.is_file() else ""
                    self.stop()
                    raise WorkerError(f"worker {slot.index} exited with {code} before serving{why}")
            time.sleep(POLL_S)

    def _ready_pids(self) -> dict[int, bool]:
        """Slot -> SERVING, for the slots whose state file belongs to the running worker."""
        states = {s.index: _read_state(self._run_dir, s) for s in self._slots}
        return {i: st.state == "ready" for i, st in states.items() if st is not None}

    def _announce_new_workers(self) -> None:
        """Print each worker's pid and metrics port once it serves (for operators and tests)."""
        for slot in self._slots:
            st = _read_state(self._run_dir, slot)
            if st is not None and st.state == "ready" and st.pid != slot.announced_pid:
                slot.announced_pid = st.pid
                print(f"bertrec serve: worker {slot.index} pid {st.pid} serving, its own "
                      f"metrics on {self.config.host}:{st.metrics_port}", flush=True)  # fmt: skip


def serve_workers(config: ServerConfig) -> int:
    """`bertrec serve` with `workers > 1`: supervise until a stop signal; exit code 0."""
    from bertrec.server.drain import on_stop_signals

    supervisor = Supervisor(config)
    on_stop_signals(supervisor.request_stop)
    try:
        supervisor.start()
        print(f"bertrec serve: grpc {config.host}:{supervisor.port} metrics {config.host}:"
              f"{supervisor.metrics_port} ({config.workers} workers)", flush=True)  # fmt: skip
        supervisor.load()
        if not supervisor.stop_requested():
            print(f"bertrec serve: ready on port {supervisor.port}", flush=True)
        supervisor.wait()
    finally:
        supervisor.stop()
    return 0


def _reserve_port(host: str, port: int, what: str = "gRPC") -> socket.socket:
    """Bind (never listen) host:port with SO_REUSEPORT: resolves port 0 once for all workers,
    and keeps a process without SO_REUSEPORT off the port between worker restarts.

    A fixed port that a socket already holds is refused, as a single server refuses it: the
    kernel would let another SO_REUSEPORT server of the same user (a second supervisor, a stale
    deployment) join the port and split the connections between two servers. The probe binds
    with SO_REUSEADDR alone, as grpc's listeners do, so connections of an earlier run left in
    TIME_WAIT do not count as holding the port.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if port:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        # SO_REUSEADDR for the bind only (TIME_WAIT of a server without SO_REUSEPORT would
        # refuse it otherwise); off afterwards, so a later SO_REUSEADDR-only bind conflicts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {what} to {host}:{port}: {exc}") from exc
    return sock


def _http(
    config: ServerConfig, registry: CollectorRegistry, ready: Callable[[], bool]
) -> HttpEndpoints:
    tls = None
    if config.metrics_tls:
        ca = Path(config.tls_client_ca) if config.tls_client_ca else None
        tls = TlsFiles(Path(config.tls_cert), Path(config.tls_key), ca)
    try:
        return HttpEndpoints(config.host, config.metrics_port, registry, ready,
                             config.http_timeout_s, tls=tls)  # fmt: skip
    except OSError as exc:
        where = f"{config.host}:{config.metrics_port}"
        raise ConfigError(f"cannot serve metrics on {where}: {exc}") from exc


def _state_file(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.json"


@dataclass(frozen=True)
class _State:
    """What a worker last reported: its pid, "started" (port bound) or "ready", metrics port."""

    pid: int
    state: str
    metrics_port: int


def _read_state(run_dir: Path, slot: _Slot) -> _State | None:
    """The slot's state, or None if absent or written by a worker that is no longer running."""
    try:
        state = _State(**json.loads(_state_file(run_dir, slot.index).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    proc = slot.proc
    return state if proc is not None and proc.poll() is None and state.pid == proc.pid else None


def _reached(state: _State, wanted: str) -> bool:
    return state.state == wanted or (wanted == "started" and state.state == "ready")


def _write_state(run_dir: Path, index: int, state: str, metrics_port: int) -> bool:
    """Replace the slot's state file atomically (the parent never reads half a file).

    False if the run folder is gone: the supervisor was killed and an orphaned sibling
    removed it, so nobody reads the state and this worker must stop.
    """
    path = _state_file(run_dir, index)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "state": state,
                                   "metrics_port": metrics_port}))  # fmt: skip
        tmp.replace(path)
    except FileNotFoundError:
        log.error("worker %d: the run folder %s is gone: stopping", index, run_dir)
        return False
    return True


def _exit_with_parent(parent: int, request_stop: Callable[[], None]) -> None:
    """Drain if the parent disappears (killed -9): a worker must not outlive its supervisor."""
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: draining", parent)
    request_stop()


def worker_main(
    run_dir: Path, index: int, parent: int, debug: bool = False, cpus: set[int] | None = None
) -> int:
    """One worker: the full server on the shared port, reporting its state to the parent.

    It binds the port only once it serves (see the module's docstring), and drains as soon as
    `parent` (the supervisor's pid, from its command line) is no longer its parent: also when
    the supervisor died while this process was still starting. With `cpus` it runs on those
    CPUs alone, set before it starts any thread (every thread inherits it).
    """
    if os.getppid() != parent:  # orphaned before it even started: serve nobody
        shutil.rmtree(run_dir, ignore_errors=True)
        return 1
    if cpus is not None:
        pin_every_thread(cpus)
    from bertrec.server.app import Server
    from bertrec.server.cli import configure_logs
    from bertrec.server.drain import on_stop_signals

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO)
    config: ServerConfig = pickle.loads((run_dir / "config.pickle").read_bytes())
    configure_logs(config)
    try:
        server = Server(config)  # reads the TLS and auth files: their errors are the user's
    except BertrecError as exc:
        return _failed(run_dir, index, exc)
    on_stop_signals(server.request_stop)
    threading.Thread(
        target=_exit_with_parent, args=(parent, server.request_stop), name="parent-watch",
        daemon=True,
    ).start()  # fmt: skip
    try:
        server.start(listen=False)
        _write_state(run_dir, index, "started", server.metrics_port)
        server.load()
        # A stop that came while it loaded (a signal, the supervisor gone): never bind the
        # port, where a new server on it would find this one in its SO_REUSEPORT group.
        if not server.stop_requested():
            server.listen()
            if _write_state(run_dir, index, "ready", server.metrics_port):
                log.info("worker %d (pid %d) serving on port %d", index, os.getpid(),
                         server.port)  # fmt: skip
                server.wait()
    except BertrecError as exc:
        return _failed(run_dir, index, exc)
    finally:
        server.stop()
        if os.getppid() != parent:
            # The supervisor was killed and cannot remove the run folder; its shared layouts
            # are hundreds of MB at 1M items. Every orphan tries; the files vanish from the
            # folder while mapped pages stay valid for any worker still draining.
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _error_file(run_dir: Path, index: int) -> Path:
    return run_dir / f"error-{index}"


def _failed(run_dir: Path, index: int, exc: BertrecError) -> int:
    """Report a worker's start error, in its log and to the parent, whose own error (the last
    line `bertrec serve` prints) then says what a single process would have said."""
    print(f"bertrec serve: worker {index}: error: {exc}", file=sys.stderr)
    _error_file(run_dir, index).write_text(str(exc))
    return 2


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group; the supervisor forwards the stop as SIGTERM,
    # which a worker drains on, so a worker still starting must not die of the SIGINT itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    flags = sys.argv[4:]
    pinned = [f.removeprefix("--cpus=") for f in flags if f.startswith("--cpus=")]
    sys.exit(
        worker_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "--debug" in flags,
                    {int(c) for c in pinned[0].split(",")} if pinned else None)
    )  # fmt: skip
