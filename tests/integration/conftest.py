"""Session fixtures: a tiny exported model, and the real server serving it on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_harness import MODEL, SHARED_FLAGS, Reference, ServerProcess, serving

from bertrec.client import RecommenderClient


@pytest.fixture(scope="session")
def version_dir(model_repo: Path) -> Path:
    return model_repo / MODEL / "1"


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server (run with -X importtime so its imports can be audited)."""
    with serving(
        model_repo, tmp_path_factory.mktemp("logs"), *SHARED_FLAGS, import_time=True
    ) as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[RecommenderClient]:
    with RecommenderClient(server.target, timeout_s=10.0) as c:
        yield c


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def ref(version_dir: Path) -> Reference:
    return Reference(version_dir)
