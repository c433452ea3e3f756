"""Readiness: the grpc.health.v1 status and the gate in front of the served model versions.

NOT_SERVING from the moment the port is bound until the model is loaded and warmed up, SERVING
then, and NOT_SERVING for good once shutdown begins. The overall status ("") and each served
API's own name (RecommenderService, the Open Inference Protocol's GRPCInferenceService, whose
ServerReady/ModelReady read it) move together, so probes may ask for any of them.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2

from bertrec.server.engine import Recommender
from bertrec.server.errors import NotReady
from bertrec.server.model_slot import Lease, ModelSlot
from bertrec.server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from bertrec.v1 import recommender_pb2

SERVICE_NAME: str = recommender_pb2.DESCRIPTOR.services_by_name["RecommenderService"].full_name
HEALTH_SERVICE_NAME: str = health.SERVICE_NAME
_REPORTED = ("", SERVICE_NAME, OIP_SERVICE_NAME)  # the names whose status this class sets


class _HealthServicer(health.HealthServicer):
    """grpc's health servicer plus `List`, which grpc.health.v1 gained in 2024 and
    grpcio-health-checking still answers UNIMPLEMENTED (reflection lists it, so callers try it)."""

    def List(self, request: Any, context: Any) -> health_pb2.HealthListResponse:
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={n: health_pb2.HealthCheckResponse(status=s) for n, s in statuses.items()}
        )


class Lifecycle:
    """Owns the health status, and hands out leases on the served model once it is ready.

    The `ModelSlot` owns the model versions; this class only gates it: no lease before the
    first version is loaded and warmed up (`ready`), whatever the slot holds.
    """

    def __init__(self, slot: ModelSlot[Recommender]) -> None:
        self.health = _HealthServicer()
        self._slot = slot
        self._ready = False
        self._shutting_down = False
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def lease(self, version: int | None = None) -> Lease[Recommender]:
        """A lease on the serving version (or on `version`) for one call.

        Raises:
            NotReady: (FAILED_PRECONDITION) before the model is loaded and warmed up.
            NotFound: `version` is not loaded.
        """
        if not self._ready:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return self._slot.acquire(version)

    def loaded(self) -> tuple[int, ...]:
        """The versions calls may name (none before `ready`)."""
        return self._slot.loaded() if self._ready else ()

    def serving(self) -> bool:
        """Whether the model is loaded and warmed up and shutdown has not begun (SERVING).

        Stays true across swaps: the slot is never empty once a version is in.
        """
        return self._ready and not self._shutting_down

    def ready(self) -> None:
        """Serve calls from the slot (which holds a warmed-up version now) and report SERVING."""
        self._ready = True
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def shutting_down(self) -> None:
        """Report NOT_SERVING from now on (later `set` calls are ignored)."""
        self._shutting_down = True
        self.health.enter_graceful_shutdown()

    def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in _REPORTED:
            self.health.set(name, status)
