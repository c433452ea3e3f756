"""Container HEALTHCHECK: exit 0 only if grpc.health.v1 reports SERVING for the whole server.

Used instead of grpc_health_probe (no registry ships it). Probes, in plaintext, the server's
health-only port when BERTREC_HEALTH_PORT is set (the images set 8081), which answers the same
health as the gRPC port but never needs TLS or a token, so the check works whatever the
gRPC port's security; otherwise the gRPC port (BERTREC_GRPC_PORT), which must then be
plaintext. A target on the command line (host:port) overrides both.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def target() -> str:
    """Where to probe: argv[1], else the health-only port, else the (plaintext) gRPC port.

    Raises:
        ValueError: only the gRPC port is left and it speaks TLS (BERTREC_TLS_CERT is set).
    """
    if len(sys.argv) > 1:
        return sys.argv[1]
    health_port = os.environ.get("BERTREC_HEALTH_PORT", "").strip()
    if health_port:
        return f"127.0.0.1:{health_port}"
    if os.environ.get("BERTREC_TLS_CERT"):
        raise ValueError("the gRPC port needs TLS: set BERTREC_HEALTH_PORT (e.g. 8081)")
    return f"127.0.0.1:{os.environ.get('BERTREC_GRPC_PORT', '50051')}"


def main() -> int:
    try:
        where = target()
    except ValueError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    try:
        with grpc.insecure_channel(where) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {where}: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"unhealthy: {where}: {status}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
