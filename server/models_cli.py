"""`bertrec models list|load|unload`: a server's model versions, over the Open Inference
Protocol's model-repository extension (the same calls tritonclient makes).

    bertrec models list   --target HOST:PORT [--ready]
    bertrec models load   --target HOST:PORT [--model NAME] [--version N]
    bertrec models unload --target HOST:PORT [--model NAME] --version N

Each takes the client security flags (`--tls`/`--tls-ca FILE`, `--tls-cert/--tls-key` for mTLS,
`--server-name`, `--token-file FILE` or $BERTREC_TOKEN; `bertrec.client.cli_security`): loading
and unloading need a token with the `admin` role, listing one with `read`.

`load --version N` loads version N if needed, serves it and pins it (a rollback, or a jump
ahead); `load` without a version un-pins, so the server's version policy decides again.
The version travels as the request parameter "version" (int64). Only the light client's
dependencies (grpcio, protobuf) are needed: no model is loaded here, and grpc itself is
imported only when the subcommand runs (every `bertrec` command registers this one).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bertrec.cli import DEFAULT_TARGET, positive_int
from bertrec.client.cli_security import add_flags as add_security_flags
from bertrec.client.cli_security import from_args as security_from_args
from bertrec.errors import BertrecError

if TYPE_CHECKING:
    import grpc

VERSION_PARAMETER = "version"  # RepositoryModelLoad/Unload: which version (int64 or string)


@dataclass(frozen=True)
class IndexEntry:
    """One model version as the server's repository index reports it."""

    name: str
    version: str
    state: str
    reason: str


class ModelsClient:
    """The model-repository calls on one channel.

    Args:
        channel: a gRPC channel to the server.
        timeout_s: deadline per call (a load verifies hashes and warms up: allow for it).
        metadata: sent with every call (the bearer token of a server with --auth-file).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        timeout_s: float = 120.0,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        from bertrec.oip.v2 import grpc_service_pb2_grpc as pb_grpc

        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._timeout_s = timeout_s
        self._metadata = metadata

    def __repr__(self) -> str:
        return f"ModelsClient(timeout_s={self._timeout_s:g})"  # never the metadata (a token)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version the server knows, with its state (READY, LOADING, UNAVAILABLE)."""
        from bertrec.oip.v2 import grpc_service_pb2 as pb

        response = self._stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=ready_only),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
        return [IndexEntry(m.name, m.version, m.state, m.reason) for m in response.models]

    def load(self, model: str, version: int | None = None) -> None:
        """Load and serve `version` (pinned), or follow the version policy again (None)."""
        from bertrec.oip.v2 import grpc_service_pb2 as pb

        request = pb.RepositoryModelLoadRequest(model_name=model)
        if version is not None:
            request.parameters[VERSION_PARAMETER].int64_param = version
        self._stub.RepositoryModelLoad(request, timeout=self._timeout_s, metadata=self._metadata)

    def unload(self, model: str, version: int) -> None:
        """Unload `version`; the server refuses to unload the only version it has loaded."""
        from bertrec.oip.v2 import grpc_service_pb2 as pb

        request = pb.RepositoryModelUnloadRequest(model_name=model)
        request.parameters[VERSION_PARAMETER].int64_param = version
        self._stub.RepositoryModelUnload(request, timeout=self._timeout_s, metadata=self._metadata)

    def model_name(self) -> str:
        """The name of the one model the server has (the `--model` default)."""
        names = sorted({e.name for e in self.index()})
        if len(names) != 1:
            raise BertrecError(f"the server has models {names or 'none'}: pass --model")
        return names[0]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `models` subcommand (grpc loads only when it runs)."""
    parser = sub.add_parser(
        "models",
        help="list, load (roll out or back) and unload a server's model versions",
        description=(
            "List, load and unload the model versions of a running server over the Open "
            "Inference Protocol's model-repository extension. `load --version N` serves N and "
            "pins it (rollback); `load` alone un-pins and follows the server's version policy."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the versions the server knows and their state")
    listing.add_argument("--ready", action="store_true", help="only versions ready to serve")
    load = actions.add_parser("load", help="load and serve a version (pinned), or un-pin")
    load.add_argument("--version", type=positive_int, default=None, help="version to serve")
    unload = actions.add_parser("unload", help="unload a version that is not the only one")
    unload.add_argument("--version", type=positive_int, required=True, help="version to unload")
    for action in (listing, load, unload):
        action.add_argument("--target", default=DEFAULT_TARGET, help="host:port (%(default)s)")
        action.add_argument("--timeout-s", type=float, default=120.0, help="deadline per call")
        add_security_flags(action)
    for action in (load, unload):
        action.add_argument("--model", default=None, help="model name (default: the only one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run one action; a failed call becomes a one-line error (exit code 2)."""
    import grpc

    security = security_from_args(args)
    with security.channel(args.target) as channel:
        client = ModelsClient(channel, args.timeout_s, security.metadata)
        try:
            return _act(client, args)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise BertrecError(f"{args.target}: {code}: {details}") from None


def _act(client: ModelsClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        print(_table(client.index(args.ready)))
        return 0
    model = args.model or client.model_name()
    if args.action == "load":
        client.load(model, args.version)
        what = f"version {args.version} (pinned)" if args.version else "the policy's versions"
    else:
        client.unload(model, args.version)
        what = f"version {args.version} unloaded"
    serving = [e.version for e in client.index() if e.name == model and e.reason == "serving"]
    print(f"{model}: {what}; serving {', '.join(serving) or 'nothing'}")
    return 0


def _table(entries: list[IndexEntry]) -> str:
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    rows += [(e.name, e.version, e.state, e.reason) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(row[i].ljust(w) for i, w in enumerate(widths)), row[3]]) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
