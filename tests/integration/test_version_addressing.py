"""Calls that name a version, on a server keeping two (`--version-policy "latest 2"`): the
native API through the requests' `model` field or `bertrec-model-version` metadata, the Open
Inference Protocol through
`model_version`; with `--model-control none` the repository can be read but not changed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_harness import MODEL, Reference, ServerProcess, serving

from bertrec.bench.versions import publish_variant
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

USER, K = "u0005", 5
VERSION_KEY = "bertrec-model-version"


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-versions") / "repo"
    shutil.copytree(model_repo / MODEL / "1", root / MODEL / "1")
    publish_variant(root, MODEL, 1, seed=11, version=2)
    return root


@pytest.fixture(scope="module")
def two(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    flags = ("--version-policy", "latest 2", "--model-control", "none")
    with serving(repo, tmp_path_factory.mktemp("two-logs"), *flags) as server:
        yield server


@pytest.fixture(scope="module")
def channel(two: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(two.target) as ch:
        yield ch


def recommend(channel: grpc.Channel, version: str | None) -> pb.RecommendResponse:
    metadata = (("bertrec-model-version", version),) if version is not None else ()
    stub = pb_grpc.RecommenderServiceStub(channel)
    return stub.Recommend(pb.RecommendRequest(user_id=USER, k=K), metadata=metadata, timeout=10)


@pytest.mark.parametrize(("asked", "answered"), [(None, 2), ("2", 2), ("1", 1)])
def test_native_calls_name_their_version(
    channel: grpc.Channel, repo: Path, asked: str | None, answered: int
) -> None:
    response = recommend(channel, asked)
    assert response.model.version == answered
    ref = Reference(repo / MODEL / str(answered))
    assert [i.item_id for i in response.items] == [i for i, _ in ref.recommend(USER, K)]


@pytest.mark.parametrize(
    ("version", "code"),
    [("3", grpc.StatusCode.NOT_FOUND), ("x", grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_a_version_not_loaded_or_not_a_number_is_refused(
    channel: grpc.Channel, version: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        recommend(channel, version)
    assert raised.value.code() == code


@pytest.mark.parametrize("version", [1, 2])
def test_native_requests_name_their_version_in_the_model_field(
    channel: grpc.Channel, repo: Path, version: int
) -> None:
    stub = pb_grpc.RecommenderServiceStub(channel)
    wanted = pb.ModelRef(name=MODEL, version=version)
    response = stub.Recommend(pb.RecommendRequest(user_id=USER, k=K, model=wanted), timeout=10)
    assert response.model.version == version
    ref = Reference(repo / MODEL / str(version))
    assert [i.item_id for i in response.items] == [i for i, _ in ref.recommend(USER, K)]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=wanted), timeout=10)
    assert info.model.version == version


@pytest.mark.parametrize(
    ("wanted", "metadata", "code"),
    [
        (pb.ModelRef(version=3), (), grpc.StatusCode.NOT_FOUND),
        (pb.ModelRef(name="other", version=1), (), grpc.StatusCode.NOT_FOUND),
        (pb.ModelRef(version=-1), (), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.ModelRef(version=1),
            (("bertrec-model-version", "2"),),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_a_model_field_naming_no_loaded_version_is_refused(
    channel: grpc.Channel, wanted: pb.ModelRef, metadata: tuple, code: grpc.StatusCode
) -> None:
    stub = pb_grpc.RecommenderServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Recommend(
            pb.RecommendRequest(user_id=USER, k=K, model=wanted), metadata=metadata, timeout=10
        )
    assert raised.value.code() == code


def test_oip_calls_name_their_version(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    ranker = f"{MODEL}-ranker"
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=ranker))
    assert list(metadata.versions) == ["1", "2"]
    ready = [stub.ModelReady(oip.ModelReadyRequest(name=ranker, version=v)).ready
             for v in ("1", "2", "3")]  # fmt: skip
    assert ready == [True, True, False]
    request = oip.ModelInferRequest(model_name=ranker, model_version="1")
    tensor = request.inputs.add(name="user_id", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(USER.encode())
    response = stub.ModelInfer(request, timeout=10)
    assert response.model_version == "1"
    native = recommend(channel, "1")
    ids = [e.decode() for e in response.outputs[0].contents.bytes_contents]
    assert ids[:K] == [i.item_id for i in native.items]


def test_model_control_none_lists_but_does_not_change(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest())
    assert [(m.version, m.state, m.reason) for m in index.models] == [
        ("1", "READY", ""),
        ("2", "READY", "serving"),
    ]
    request = oip.RepositoryModelLoadRequest(model_name=MODEL)
    request.parameters["version"].int64_param = 1
    with pytest.raises(grpc.RpcError) as raised:
        stub.RepositoryModelLoad(request)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control explicit" in (raised.value.details() or "")
