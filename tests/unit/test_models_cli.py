"""`bertrec models` against a fake model-repository servicer on a loopback gRPC port."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bertrec.errors import BertrecError
from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from bertrec.server import models_cli


class FakeRepositoryService(pb_grpc.GRPCInferenceServiceServicer):
    """Versions 1..3 of "tiny", 2 serving; records the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, int]]] = []
        self.serving = 2

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        models = [
            pb.RepositoryIndexResponse.ModelIndex(
                name="tiny",
                version=str(v),
                state="READY" if v == self.serving else "UNAVAILABLE",
                reason="serving" if v == self.serving else "not selected by policy latest",
            )
            for v in (1, 2, 3)
        ]
        return pb.RepositoryIndexResponse(
            models=[m for m in models if m.state == "READY" or not request.ready]
        )

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        params = {k: v.int64_param for k, v in request.parameters.items()}
        self.requests.append(("load", request.model_name, params))
        self.serving = params.get("version", 3)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        params = {k: v.int64_param for k, v in request.parameters.items()}
        self.requests.append(("unload", request.model_name, params))
        if params["version"] == self.serving:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the only version loaded")
        return pb.RepositoryModelUnloadResponse()


@pytest.fixture
def fake() -> Iterator[tuple[FakeRepositoryService, str]]:
    service = FakeRepositoryService()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    return int(args.func(args))


def test_list_prints_every_version_with_its_state(
    fake: tuple[FakeRepositoryService, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, target = fake
    assert run("list", "--target", target) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert lines[2].split() == ["tiny", "2", "READY", "serving"]
    assert len(lines) == 4
    run("list", "--target", target, "--ready")
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_load_with_a_version_sends_it_and_names_the_model_from_the_index(
    fake: tuple[FakeRepositoryService, str], capsys: pytest.CaptureFixture[str]
) -> None:
    service, target = fake
    assert run("load", "--target", target, "--version", "1") == 0
    assert service.requests == [("load", "tiny", {"version": 1})]
    assert capsys.readouterr().out.strip() == "tiny: version 1 (pinned); serving 1"


def test_load_without_a_version_sends_none(fake: tuple[FakeRepositoryService, str]) -> None:
    service, target = fake
    run("load", "--target", target, "--model", "tiny")
    assert service.requests == [("load", "tiny", {})]


def test_a_refused_unload_is_a_one_line_error(fake: tuple[FakeRepositoryService, str]) -> None:
    service, target = fake
    with pytest.raises(BertrecError, match="FAILED_PRECONDITION: the only version loaded"):
        run("unload", "--target", target, "--version", "2")
    run("unload", "--target", target, "--version", "1")
    assert service.requests[-1] == ("unload", "tiny", {"version": 1})


def test_versions_must_be_positive(fake: tuple[FakeRepositoryService, str]) -> None:
    with pytest.raises(SystemExit):
        run("unload", "--target", fake[1], "--version", "0")
