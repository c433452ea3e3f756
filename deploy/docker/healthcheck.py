"""Container HEALTHCHECK: exit 0 only if grpc.health.v1 reports SERVING for the whole server.

Used instead of grpc_health_probe (no registry ships it). Reads the same BERTREC_GRPC_PORT the
server reads, so a port changed by environment is probed where the server listens.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("BERTREC_GRPC_PORT", "50051")
    target = sys.argv[1] if len(sys.argv) > 1 else f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {target}: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
