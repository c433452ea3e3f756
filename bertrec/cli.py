"""The `bertrec` console script: one entry point, one subcommand per job.

Each subsystem registers its own subcommand so that heavy imports (torch, onnxruntime)
happen only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from bertrec import __version__
from bertrec.errors import BertrecError

# Where the client-side commands (models, loadtest) look for a server: `bertrec serve`'s default
# gRPC port on this machine.
DEFAULT_TARGET = "127.0.0.1:50051"

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def positive_int(text: str) -> int:
    """An argparse type for version numbers and counts: one message for 0, -1 and "abc"."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _registrars() -> list[Register]:
    from bertrec import demo
    from bertrec.bench.loadtest import cli as loadtest_cli
    from bertrec.export import cli as export_cli
    from bertrec.server import auth_cli, models_cli
    from bertrec.server import cli as server_cli
    from bertrec.train import cli as train_cli

    return [
        demo.register,
        train_cli.register,
        export_cli.register,
        server_cli.register,
        models_cli.register,
        auth_cli.register,
        loadtest_cli.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertrec",
        description="Text-aware recommender: train, export and serve over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"bertrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(sub)
    for command in sub.choices.values():
        # Also after the subcommand (`bertrec serve -v`). SUPPRESS: a subcommand that is not
        # given -v must not reset the flag given before it (`bertrec -v serve`).
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except BertrecError as exc:
        print(f"bertrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
