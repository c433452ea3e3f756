"""The Open Inference Protocol's model-repository extension over the `VersionWatcher`.

- RepositoryIndex: every version of the model in the repository (or loaded), under the
  repository's model name, with Triton's states: READY (reason "serving" for the version that
  answers calls naming none), LOADING, or UNAVAILABLE with the reason (not selected by the
  version policy, unloaded, or why its load failed). Allowed in every `model_control` mode.
- RepositoryModelLoad: with the parameter "version" (int64, or a decimal string), load that
  version if needed, serve it and pin it (a rollback); without, un-pin and follow the version
  policy again. The "config" parameter, as tritonclient's `load_model(config=...)` sends it,
  may carry Triton's `{"version_policy": {"specific": {"versions": [N]}}}` (the same as
  "version" = N) or `{"version_policy": {"latest": {...}}}` (un-pin); other model-config keys
  are ignored (bertrec's model configuration is its manifest).
- RepositoryModelUnload: the parameter "version" names the version to unload; the only loaded
  version is never unloaded (FAILED_PRECONDITION), and neither is "the model" as a whole.

Load and unload are admin operations: they are refused (FAILED_PRECONDITION) unless the server
runs with `model_control = "explicit"`. The model may be named by its repository name or by
either protocol model name (`<model>-encoder`, `<model>-ranker`): both serve the same versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc

from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.server.errors import InvalidArgument, NotFound, ServiceError
from bertrec.server.models_cli import VERSION_PARAMETER
from bertrec.server.version_watcher import READY, VersionWatcher

CONFIG_PARAMETER = "config"
MAX_VERSION = 2**63 - 1  # versions travel as int64
EXPLICIT = "explicit"


class ControlDisabled(ServiceError):
    """A load or unload while the server does not accept explicit model control."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RepositoryControl:
    """The three repository calls, as typed requests to the watcher.

    Args:
        watcher: the server's version watcher.
        model_name: the repository's model name.
        model_control: "none", "poll" or "explicit"; only "explicit" allows load and unload.
    """

    def __init__(self, watcher: VersionWatcher[Any], model_name: str, model_control: str) -> None:
        self._watcher = watcher
        self._model = model_name
        self._control = model_control
        self._names = {model_name, f"{model_name}-encoder", f"{model_name}-ranker"}

    def index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entries = [
            pb.RepositoryIndexResponse.ModelIndex(
                name=self._model, version=str(s.version), state=s.state, reason=s.reason
            )
            for s in self._watcher.states()
            if s.state == READY or not request.ready
        ]
        return pb.RepositoryIndexResponse(models=entries)

    def load(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        self._check(request.model_name, "load")
        self._watcher.load(_requested_version(request.parameters))
        return pb.RepositoryModelLoadResponse()

    def unload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        self._check(request.model_name, "unload")
        version = _version_parameter(request.parameters)
        if version is None:
            raise ControlDisabled(
                f"bertrec keeps {self._model!r} serving: name the version to unload "
                f"(parameter {VERSION_PARAMETER!r}); the only loaded version stays"
            )
        self._watcher.unload(version)
        return pb.RepositoryModelUnloadResponse()

    def _check(self, name: str, action: str) -> None:
        if self._control != EXPLICIT:
            raise ControlDisabled(
                f"cannot {action} models: the server runs with model_control={self._control!r} "
                "(start it with --model-control explicit)"
            )
        if name not in self._names:
            raise NotFound(f"unknown model {name!r}; this server has {self._model!r}")


def _requested_version(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> int | None:
    """The version a load asks for: "version", else a Triton "config" version policy."""
    version = _version_parameter(parameters)
    if version is not None or CONFIG_PARAMETER not in parameters:
        return version
    return _version_from_config(parameters[CONFIG_PARAMETER].string_param)


def _version_parameter(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> int | None:
    if VERSION_PARAMETER not in parameters:
        return None
    param = parameters[VERSION_PARAMETER]
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        version = _version_number(param.int64_param)
    elif kind == "string_param":
        version = _version_number(param.string_param)
    else:
        version = None
    if version is None:
        raise InvalidArgument(
            f"parameter {VERSION_PARAMETER!r} must be a version number (int64 or decimal "
            f"string, 1..{MAX_VERSION})"
        )
    return version


def _version_number(value: object) -> int | None:
    """`value` as a version number: an int (not a bool) or ASCII decimal digits, in range."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)  # isdigit alone takes "²" and "٣"; 18 digits keep int() cheap
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION:
        return value
    return None


def _version_from_config(text: str) -> int | None:
    """Triton's model-config `version_policy`: specific with one version, or latest."""
    try:
        config = json.loads(text)
        policy = config.get("version_policy", config.get("versionPolicy"))  # proto JSON: both
    except (ValueError, RecursionError, AttributeError):  # bad JSON, 5000 digits, deep nesting
        policy = None
    if policy is None:
        raise InvalidArgument(
            'parameter "config" must be JSON with a "version_policy" (the only setting '
            "bertrec takes at load)"
        )
    if isinstance(policy, dict) and set(policy) == {"latest"}:
        return None
    specific = policy.get("specific") if isinstance(policy, dict) else None
    versions = specific.get("versions") if isinstance(specific, dict) else None
    if isinstance(versions, list) and len(versions) == 1:
        version = _version_number(versions[0])
        if version is not None:
            return version
    raise InvalidArgument(
        'config "version_policy" must be {"specific": {"versions": [N]}} or {"latest": {}}'
    )
