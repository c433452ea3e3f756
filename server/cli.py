"""`bertrec serve`: serve a model's versions over gRPC until SIGTERM/SIGINT/SIGHUP."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bertrec.server.config import ServerConfig
    from bertrec.server.environment import UsableCpus

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `serve` subcommand (no heavy imports until it runs)."""
    from bertrec.server.config import add_flags

    parser = sub.add_parser(
        "serve",
        help="serve a model's versions over gRPC",
        description=(
            "Serve the model versions the version policy selects over gRPC (RecommenderService, "
            "the Open Inference Protocol, grpc.health.v1, reflection), with Prometheus metrics "
            "over HTTP. Every flag can also be set with a BERTREC_<NAME> environment variable or "
            "in a TOML file (--config); flags win over the environment, which wins over the file."
        ),
    )
    add_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start, print the bound ports, load the model, serve until a signal; exit code 0."""
    from bertrec.server.app import Server
    from bertrec.server.config import flags_from_args, load_config
    from bertrec.server.drain import on_stop_signals
    from bertrec.server.environment import usable_cpus
    from bertrec.server.thread_placement import schedule_every_thread

    config = load_config(flags_from_args(args), config_file=args.config)
    configure_logs(config)
    config = size_processes(config, usable_cpus())
    schedule_every_thread(config.thread_scheduling)  # before any worker or server thread starts
    if config.workers > 1:
        from bertrec.server.workers import serve_workers

        return serve_workers(config)  # N processes on one port, one metrics endpoint
    server = Server(config)
    on_stop_signals(server.request_stop)  # SIGTERM, SIGINT, SIGHUP: drain, then exit 0
    try:
        server.start()
        print(
            f"bertrec serve: grpc {config.host}:{server.port} metrics {config.host}:"
            f"{server.metrics_port}",
            flush=True,
        )
        server.load()
        print(f"bertrec serve: ready on port {server.port}", flush=True)
        server.wait()
    finally:
        server.stop()  # also flushes the spans of the last calls
    return 0


def size_processes(config: ServerConfig, cpus: UsableCpus) -> ServerConfig:
    """Resolve `workers` 0 (auto) to the usable CPUs, and share the CPUs among the workers.

    `ranker_threads` and `intra_op_threads` 0 mean one ONNX Runtime thread per CPU, which is
    right for one process; N workers each starting one per CPU would run N x N threads on N
    CPUs, spinning against each other (ONNX Runtime's threads spin between runs). With more
    than one worker, 0 therefore becomes each worker's share, max(1, cpus // workers): every
    CPU keeps one thread of one worker busy and none is asked for two, and a worker still gets
    at least one thread when the workers outnumber the CPUs. Set values are kept (the operator
    chose them); with one worker 0 stays ONNX Runtime's own default. The numbers are logged.

    Args:
        config: the loaded config (`workers` may be 0).
        cpus: the CPUs this process may use (`environment.usable_cpus()`).
    Returns:
        The config the server (or each worker) runs with: `workers` >= 1.
    """
    workers = config.workers or cpus.count
    share = max(1, cpus.count // workers) if workers > 1 else 0
    sized = replace(
        config,
        workers=workers,
        ranker_threads=config.ranker_threads or share,
        intra_op_threads=config.intra_op_threads or share,
    )
    quota = "none" if cpus.quota is None else f"{cpus.quota:g}"
    log.info(
        "workers %d%s; usable CPUs %d (affinity %d, cgroup CPU quota %s); per worker: "
        "ranker_threads %d, intra_op_threads %d (0: ONNX Runtime's default)",
        workers, "" if config.workers else " (auto)", cpus.count, cpus.affinity, quota,
        sized.ranker_threads, sized.intra_op_threads,
    )  # fmt: skip
    return sized


def configure_logs(config: ServerConfig) -> None:
    """Apply the config's logging, replacing the CLI's `basicConfig`."""
    from bertrec.server.logs import configure

    # `bertrec -v serve` asks for debug whatever --log-level says.
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    configure(config.log_format, "debug" if verbose else config.log_level)
