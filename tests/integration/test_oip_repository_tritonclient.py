"""tritonclient's model-repository calls (`get_model_repository_index`, `load_model`,
`unload_model`) against a server with `--model-control explicit`, in the tritonclient venv
(see test_oip_tritonclient.py for why it is a subprocess, and how a missing venv is handled).

The server serves a private copy of the session model as version 1 plus a perturbed version 2
(polling off, so only these calls move it). tritonclient names no version itself: a rollback
goes through `load_model(config=...)` with Triton's version policy, as a Triton user would
write it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import MODEL, ServerProcess, serving
from test_oip_tritonclient import triton_python

from bertrec.bench.versions import publish_variant

CLIENT = r"""
import json, sys
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, model = sys.argv[1], sys.argv[2]
client = tc.InferenceServerClient(target)


def index():
    return [[m.name, m.version, m.state, m.reason]
            for m in client.get_model_repository_index().models]


def status(call):
    try:
        call()
        return "OK"
    except InferenceServerException as exc:
        return exc.status()


out = {"index": index()}
rollback = json.dumps({"version_policy": {"specific": {"versions": [1]}}})
out["rollback"] = status(lambda: client.load_model(model, config=rollback))
out["after_rollback"] = [client.is_model_ready(model + "-ranker", v) for v in ("1", "2")]
out["unload_model"] = status(lambda: client.unload_model(model))
out["forward"] = status(lambda: client.load_model(model))
out["after_forward"] = index()
out["unknown"] = status(lambda: client.load_model("nope"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def explicit_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("triton-repo") / "repo"
    shutil.copytree(model_repo / MODEL / "1", repo / MODEL / "1")
    publish_variant(repo, MODEL, 1, seed=2, version=2)
    flags = ("--model-control", "explicit", "--poll-interval-s", "0")
    with serving(repo, tmp_path_factory.mktemp("triton-logs"), *flags) as server:
        yield server


@pytest.fixture(scope="module")
def triton(explicit_server: ServerProcess) -> dict[str, Any]:
    python = triton_python()
    done = subprocess.run(
        [python, "-c", CLIENT, explicit_server.target, MODEL],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"tritonclient script failed:\n{done.stderr}"
    return json.loads(done.stdout)


def test_the_index_lists_both_versions(triton: dict[str, Any]) -> None:
    assert triton["index"] == [
        [MODEL, "1", "UNAVAILABLE", "not selected by policy latest"],
        [MODEL, "2", "READY", "serving"],
    ]


def test_load_model_with_a_version_policy_rolls_back(triton: dict[str, Any]) -> None:
    assert triton["rollback"] == "OK"
    assert triton["after_rollback"] == [True, False]


def test_unload_model_without_a_version_keeps_serving(triton: dict[str, Any]) -> None:
    assert triton["unload_model"] == "StatusCode.FAILED_PRECONDITION"


def test_load_model_without_config_follows_the_policy_again(triton: dict[str, Any]) -> None:
    assert triton["forward"] == "OK"
    assert [MODEL, "2", "READY", "serving"] in triton["after_forward"]
    assert triton["unknown"] == "StatusCode.NOT_FOUND"
