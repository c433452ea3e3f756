"""`inference.GRPCInferenceService` (the Open Inference Protocol) over the `Recommender`.

Served on the same port as bertrec's own API, through the same interceptor (so its calls are
in `grpc_server_*` and errors map to status codes the same way). Readiness is the health
status of this service's name, which follows the model lifecycle: NOT_SERVING until the model
is loaded and warmed up, and again once shutdown begins.

Status codes: NOT_FOUND for an unknown model or version (and unknown user ids);
INVALID_ARGUMENT for unknown, missing or duplicate inputs or outputs, wrong datatypes or
shapes; FAILED_PRECONDITION while the model is loading; the rest as for the native API.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from bertrec import __version__
from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from bertrec.server.engine import Call, Recommender
from bertrec.server.errors import InvalidArgument, NotFound
from bertrec.server.oip.models import EncoderModel, RankerModel, TensorSpec, V2Model
from bertrec.server.oip.tensors import Tensor, read_inputs, write_outputs

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "bertrec"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's health, metadata and inference calls for `<model>-encoder/-ranker`.

    Args:
        engine: returns the ready `Recommender`, or raises `NotReady`.
        health: the server's health servicer; this service's status there is its readiness.
        model_name: the served model's name, the prefix of the two protocol model names.
        request_timeout_s: deadline for calls that set none (or a longer one).
    """

    def __init__(
        self,
        engine: Callable[[], Recommender],
        health: health.HealthServicer,
        model_name: str,
        request_timeout_s: float,
    ) -> None:
        self._engine = engine
        self._health = health
        self._timeout_s = request_timeout_s
        models: tuple[V2Model, ...] = (
            EncoderModel(f"{model_name}-encoder"),
            RankerModel(f"{model_name}-ranker"),
        )
        self._models = {m.name: m for m in models}

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready(context))

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        known = request.name in self._models and self._ready(context)
        ready = known and request.version in ("", str(self._engine().ref.version))
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bertrec", version=__version__)

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        engine, model = self._resolve(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(engine.ref.version)],
            platform=PLATFORM,
            inputs=[_metadata(s) for s in model.inputs],
            outputs=[_metadata(s) for s in model.outputs(engine)],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        engine, model = self._resolve(request.model_name, request.model_version)
        decoded = read_inputs(request)
        wanted = _wanted_outputs(model, engine, [o.name for o in request.outputs])
        results = model.infer(engine, _match_inputs(model, decoded.tensors), self._call(context))
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=str(engine.ref.version), id=request.id
        )
        write_outputs(response, [results[name] for name in wanted], decoded.raw)
        return response

    def _ready(self, context: grpc.ServicerContext) -> bool:
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return self._health.Check(check, context).status == health_pb2.HealthCheckResponse.SERVING

    def _resolve(self, name: str, version: str) -> tuple[Recommender, V2Model]:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models))
            raise NotFound(f"unknown model {name!r}; this server has {known}")
        engine = self._engine()
        if version not in ("", str(engine.ref.version)):
            raise NotFound(
                f"model {name!r} has no version {version!r}; serving {engine.ref.version}"
            )
        return engine, model

    def _call(self, context: grpc.ServicerContext) -> Call:
        return Call.from_context(context, self._timeout_s)


def _metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatypes[0], shape=spec.shape
    )


def _match_inputs(model: V2Model, tensors: list[Tensor]) -> dict[str, Tensor]:
    """The inputs by name, checked against the model's specs (names, datatypes, shapes)."""
    specs = {s.name: s for s in model.inputs}
    found: dict[str, Tensor] = {}
    for tensor in tensors:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"model {model.name!r} has no input {tensor.name!r}; inputs: {', '.join(specs)}"
            )
        if tensor.name in found:
            raise InvalidArgument(f"input {tensor.name!r} is given more than once")
        if tensor.datatype not in spec.datatypes:
            raise InvalidArgument(
                f"input {tensor.name!r} must be {' or '.join(spec.datatypes)}, "
                f"got {tensor.datatype}"
            )
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            raise InvalidArgument(
                f"input {tensor.name!r} must have shape {list(spec.shape)}, "
                f"got {list(tensor.shape)}"
            )
        found[tensor.name] = tensor
    missing = [s.name for s in model.inputs if not s.optional and s.name not in found]
    if missing:
        raise InvalidArgument(f"model {model.name!r} needs input(s) {', '.join(missing)}")
    return found


def _wanted_outputs(model: V2Model, engine: Recommender, names: list[str]) -> list[str]:
    """The requested output names in request order, or all outputs when none are named."""
    available = [s.name for s in model.outputs(engine)]
    if not names:
        return available
    for name in names:
        if name not in available:
            raise InvalidArgument(
                f"model {model.name!r} has no output {name!r}; outputs: {', '.join(available)}"
            )
    if len(set(names)) != len(names):
        raise InvalidArgument("an output is requested more than once")
    return names
