"""`bertrec serve`: serve a model's versions over gRPC until SIGTERM/SIGINT/SIGHUP."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bertrec.server.config import ServerConfig


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

    config = load_config(flags_from_args(args), config_file=args.config)
    configure_logs(config)
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


def configure_logs(config: ServerConfig) -> None:
    """Apply the config's logging, replacing the CLI's `basicConfig`."""
    from bertrec.server.logs import configure

    # `bertrec -v serve` asks for debug whatever --log-level says.
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    configure(config.log_format, "debug" if verbose else config.log_level)
