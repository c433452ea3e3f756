"""The OIP model-repository calls over a real VersionWatcher with a fake repository."""

from __future__ import annotations

import json

import grpc
import pytest
from test_model_slot import FakeVersion, close
from test_version_watcher import FakeRepo

from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.server.errors import InvalidArgument, NotFound
from bertrec.server.model_slot import ModelSlot, OnlyVersion
from bertrec.server.oip.repository import ControlDisabled, RepositoryControl
from bertrec.server.version_watcher import VersionWatcher


def make(
    control: str = "explicit", *versions: int
) -> tuple[RepositoryControl, ModelSlot[FakeVersion], FakeRepo]:
    repo = FakeRepo(*(versions or (1, 2, 3)))
    slot: ModelSlot[FakeVersion] = ModelSlot(close, close_in_background=False)
    watcher = VersionWatcher(repo, slot, repo.load, interval_s=0)
    watcher.load_initial()
    return RepositoryControl(watcher, "tiny", control), slot, repo


def load_request(name: str = "tiny", **params: object) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=name)
    for key, value in params.items():
        if isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


def test_index_lists_every_version_under_the_repository_name() -> None:
    control, _, _ = make()
    index = control.index(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("tiny", "1", "UNAVAILABLE", "not selected by policy latest"),
        ("tiny", "2", "UNAVAILABLE", "not selected by policy latest"),
        ("tiny", "3", "READY", "serving"),
    ]
    ready = control.index(pb.RepositoryIndexRequest(ready=True))
    assert [m.version for m in ready.models] == ["3"]


def test_load_with_a_version_rolls_back_and_without_follows_the_policy() -> None:
    control, slot, _ = make()
    control.load(load_request(version=1))
    assert slot.serving == 1
    control.load(load_request("tiny-ranker"))
    assert slot.serving == 3
    control.load(load_request("tiny-encoder", version="2"))  # a decimal string works too
    assert slot.serving == 2


def test_load_takes_tritons_config_version_policy() -> None:
    control, slot, _ = make()
    specific = {"version_policy": {"specific": {"versions": [1]}}}
    control.load(load_request(config=json.dumps(specific)))
    assert slot.serving == 1
    control.load(load_request(config=json.dumps({"version_policy": {"latest": {}}})))
    assert slot.serving == 3
    camel = {"versionPolicy": {"specific": {"versions": ["2"]}}, "maxBatchSize": 8}
    control.load(load_request(config=json.dumps(camel)))  # proto JSON names; rest ignored
    assert slot.serving == 2


@pytest.mark.parametrize(
    "config",
    ["not json", "[]", "3", '{"max_batch_size": 8}', '{"version_policy": {"all": {}}}',
     "[" * 100_000 + "]" * 100_000,
     '{"version_policy": {"specific": {"versions": [' + "9" * 5000 + "]}}}",
     '{"version_policy": {"specific": {"versions": ["\u00b2"]}}}',
     '{"version_policy": {"specific": {"versions": [true]}}}',
     '{"version_policy": {"specific": {"versions": [1, 2]}}}',
     '{"version_policy": {"specific": 3}}'],
)  # fmt: skip
def test_other_configs_are_invalid(config: str) -> None:
    control, slot, _ = make()
    with pytest.raises(InvalidArgument):
        control.load(load_request(config=config))
    assert slot.serving == 3


@pytest.mark.parametrize("version", [0, -2, "x", "1.5", "\u00b2", "\u0663", "9" * 5000, "0"])
def test_bad_version_parameters_are_invalid(version: object) -> None:
    control, _, _ = make()
    with pytest.raises(InvalidArgument):
        control.load(load_request(version=version))


def test_unload_needs_a_version_and_never_unloads_the_only_one() -> None:
    control, slot, _ = make()
    unload = pb.RepositoryModelUnloadRequest(model_name="tiny")
    with pytest.raises(ControlDisabled, match="name the version to unload"):
        control.unload(unload)
    unload.parameters["version"].int64_param = 3
    with pytest.raises(OnlyVersion):
        control.unload(unload)
    assert slot.serving == 3


def test_unknown_models_are_not_found() -> None:
    control, _, _ = make()
    with pytest.raises(NotFound, match="unknown model 'other'"):
        control.load(load_request("other"))


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_need_explicit_model_control(mode: str) -> None:
    control, slot, _ = make(mode)
    with pytest.raises(ControlDisabled, match=f"model_control='{mode}'") as raised:
        control.load(load_request(version=1))
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ControlDisabled):
        control.unload(pb.RepositoryModelUnloadRequest(model_name="tiny"))
    assert slot.serving == 3
    assert len(control.index(pb.RepositoryIndexRequest()).models) == 3  # reading is allowed
