"""`inference.GRPCInferenceService` (the Open Inference Protocol) over the `Recommender`.

Served on the same port as bertrec's own API, through the same interceptor (so its calls are
in `grpc_server_*` and errors map to status codes the same way). Readiness is the health
status of this service's name, which follows the model lifecycle: NOT_SERVING until the model
is loaded and warmed up, and again once shutdown begins.

Each call takes a lease on one model version (`model_version`, or the serving version when
empty) and finishes on it, even if another version is swapped in meanwhile. The
model-repository extension (`repository.py`) lists, loads and unloads versions.

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
from bertrec.server.model_slot import Lease
from bertrec.server.oip.models import EncoderModel, RankerModel, TensorSpec, V2Model
from bertrec.server.oip.repository import RepositoryControl
from bertrec.server.oip.tensors import Tensor, read_inputs, write_outputs

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "bertrec"
EXTENSION_MODEL_REPOSITORY = "model_repository"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's health, metadata and inference calls for `<model>-encoder/-ranker`.

    Args:
        lease: a lease on the serving (None) or a named version's `Recommender`; raises
            `NotReady` before the model is loaded, `NotFound` for a version not loaded.
        loaded: the versions loaded now.
        health: the server's health servicer; this service's status there is its readiness.
        model_name: the served model's name, the prefix of the two protocol model names.
        request_timeout_s: deadline for calls that set none (or a longer one).
        repository: the model-repository extension's calls.
    """

    def __init__(
        self,
        lease: Callable[[int | None], Lease[Recommender]],
        loaded: Callable[[], tuple[int, ...]],
        health: health.HealthServicer,
        model_name: str,
        request_timeout_s: float,
        repository: RepositoryControl,
    ) -> None:
        self._lease = lease
        self._loaded = loaded
        self._repository = repository
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
        ready = known and request.version in ("", *(str(v) for v in self._loaded()))
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="bertrec", version=__version__, extensions=[EXTENSION_MODEL_REPOSITORY]
        )

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        lease, model = self._resolve(request.name, request.version)
        with lease:
            outputs = model.outputs(lease.value)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self._loaded()],
            platform=PLATFORM,
            inputs=[_metadata(s) for s in model.inputs],
            outputs=[_metadata(s) for s in outputs],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        lease, model = self._resolve(request.model_name, request.model_version)
        with lease:
            engine = lease.value
            decoded = read_inputs(request)
            wanted = _wanted_outputs(model, engine, [o.name for o in request.outputs])
            inputs = _match_inputs(model, decoded.tensors)
            results = model.infer(engine, inputs, self._call(context))
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=str(lease.version), id=request.id
        )
        write_outputs(response, _computed(wanted, results, bool(request.outputs)), decoded.raw)
        return response

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return self._repository.index(request)

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        return self._repository.load(request)

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        return self._repository.unload(request)

    def _ready(self, context: grpc.ServicerContext) -> bool:
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return self._health.Check(check, context).status == health_pb2.HealthCheckResponse.SERVING

    def _resolve(self, name: str, version: str) -> tuple[Lease[Recommender], V2Model]:
        """The protocol model and a lease on the version asked for ("" = the serving one)."""
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models))
            raise NotFound(f"unknown model {name!r}; this server has {known}")
        if not version:
            return self._lease(None), model
        loaded = self._loaded()  # empty while loading: then the lease says NotReady
        if not (version.isascii() and version.isdigit()) or (loaded and int(version) not in loaded):
            listed = ", ".join(str(v) for v in loaded)
            raise NotFound(f"model {name!r} has no version {version!r} loaded (loaded: {listed})")
        return self._lease(int(version)), model

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


def _computed(wanted: list[str], results: dict[str, Tensor], named: bool) -> list[Tensor]:
    """The wanted outputs the model computed; some only on request (the ranker's explanation
    outputs need input `explain`): left out unless named, then INVALID_ARGUMENT."""
    missing = [name for name in wanted if name not in results]
    if named and missing:
        raise InvalidArgument(
            f"output(s) {', '.join(missing)} are computed only when input 'explain' is 1"
        )
    return [results[name] for name in wanted if name in results]
