"""Readiness: the grpc.health.v1 status and the gate in front of the recommender.

NOT_SERVING from the moment the port is bound until the model is loaded and warmed up, SERVING
then, and NOT_SERVING for good once shutdown begins. The overall status ("") and each served
API's own name (RecommenderService, the Open Inference Protocol's GRPCInferenceService, whose
ServerReady/ModelReady read it) move together, so probes may ask for any of them.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from bertrec.server.engine import Recommender
from bertrec.server.errors import NotReady
from bertrec.server.oip import SERVICE_NAME as OIP_SERVICE_NAME
from bertrec.v1 import recommender_pb2

SERVICE_NAME: str = recommender_pb2.DESCRIPTOR.services_by_name["RecommenderService"].full_name
HEALTH_SERVICE_NAME: str = health.SERVICE_NAME
_REPORTED = ("", SERVICE_NAME, OIP_SERVICE_NAME)  # the names whose status this class sets


class Lifecycle:
    """Owns the health servicer and hands out the recommender only once it is ready."""

    def __init__(self) -> None:
        self.health = health.HealthServicer()
        self._engine: Recommender | None = None
        self._shutting_down = False
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def engine(self) -> Recommender:
        """The ready recommender. Raises NotReady (FAILED_PRECONDITION) before that."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return engine

    def serving(self) -> bool:
        """Whether the model is loaded and warmed up and shutdown has not begun (SERVING)."""
        return self._engine is not None and not self._shutting_down

    def ready(self, engine: Recommender) -> None:
        """Serve calls with `engine` and report SERVING."""
        self._engine = engine
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def shutting_down(self) -> None:
        """Report NOT_SERVING from now on (later `set` calls are ignored)."""
        self._shutting_down = True
        self.health.enter_graceful_shutdown()

    def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in _REPORTED:
            self.health.set(name, status)
