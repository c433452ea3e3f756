"""The real `tritonclient[grpc]` against the shared server's Open Inference Protocol service.

tritonclient needs protobuf < 7 and the project uses 7, so it lives in its own venv
(.ci-venv/triton, made by scripts/ci-deps.sh) and runs as a subprocess: `CLIENT` below makes
the calls and prints what it got as JSON; the comparisons with the native API happen here.
Without that venv the test fails naming the script, unless BERTREC_SKIP_DEPLOY_TOOLS=1 makes it
a skip (the convention of tests/deploy).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor
from server_harness import MODEL

from bertrec.client import RecommenderClient
from bertrec.export.verify import measure_parity
from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.server.oip.explain import EXPLANATION_PARTS

ROOT = Path(__file__).resolve().parents[2]
CI_VENV = Path(os.environ.get("BERTREC_CI_VENV", ROOT / ".ci-venv"))
TEXTS = ["a quiet film about the sea", "space battles with robots", "a cookbook of soups"]
USERS = ["u0003", "u0011"]
K = 4

# Runs in the tritonclient venv: argv[1] target, argv[2] JSON {texts, users, k, model, schema}.
CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

target, args = sys.argv[1], json.loads(sys.argv[2])
encoder, ranker = args["model"] + "-encoder", args["model"] + "-ranker"
client = tc.InferenceServerClient(target)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "models_ready": [client.is_model_ready(m) for m in (encoder, ranker)],
    "server": client.get_server_metadata().name,
    "metadata": {},
}
for name in (encoder, ranker):
    m = client.get_model_metadata(name)
    out["metadata"][name] = {
        "versions": list(m.versions),
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in m.inputs],
        "outputs": [[t.name, t.datatype, list(t.shape)] for t in m.outputs],
    }

text = tc.InferInput("text", [len(args["texts"])], "BYTES")
text.set_data_from_numpy(np.array([t.encode() for t in args["texts"]], dtype=np.object_))
result = client.infer(encoder, [text], outputs=[tc.InferRequestedOutput("embedding")])
out["embedding"] = result.as_numpy("embedding").tolist()

users = tc.InferInput("user_id", [len(args["users"])], "BYTES")
users.set_data_from_numpy(np.array([u.encode() for u in args["users"]], dtype=np.object_))
k = tc.InferInput("k", [1], "INT32")
k.set_data_from_numpy(np.array([args["k"]], dtype=np.int32))
result = client.infer(ranker, [users, k], request_id="r-1")
out["item_ids"] = [[i.decode() for i in row] for row in result.as_numpy("item_ids")]
out["scores"] = result.as_numpy("scores").tolist()
out["response_id"] = result.get_response().id

try:
    client.infer("nope", [text])
    out["unknown_model"] = "answered"
except InferenceServerException as exc:
    out["unknown_model"] = exc.status()


def fields(d):
    got = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type
                    else ""] for f in d.fields}
    return {"fields": got, "nested": {n.name: fields(n) for n in d.nested_types}}


service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["schema"] = {
    "package": service_pb2.DESCRIPTOR.package,
    "messages": {n: fields(service_pb2.DESCRIPTOR.message_types_by_name[n])
                 for n in args["schema"]["messages"]},
    "methods": {m: [service.methods_by_name[m].input_type.full_name,
                    service.methods_by_name[m].output_type.full_name]
                for m in args["schema"]["methods"]},
}
print(json.dumps(out))
"""


def triton_python() -> str:
    """The tritonclient venv's python; fails (or skips, see module doc) when it is missing."""
    python = CI_VENV / "triton" / "bin" / "python"
    if python.is_file():
        check = subprocess.run([python, "-c", "import tritonclient.grpc"], capture_output=True)
        if check.returncode == 0:
            return str(python)
    message = f"tritonclient[grpc] not found in {CI_VENV}/triton: run scripts/ci-deps.sh"
    if os.environ.get("BERTREC_SKIP_DEPLOY_TOOLS") == "1":
        pytest.skip(message + " (skipped: BERTREC_SKIP_DEPLOY_TOOLS=1)")
    pytest.fail(message, pytrace=False)


def fields(d: Descriptor) -> dict[str, Any]:
    """Each field's number, type, repetition and message type, and the same for nested types."""
    got = {
        f.name: [
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else "",
        ]
        for f in d.fields
    }
    return {"fields": got, "nested": {n.name: fields(n) for n in d.nested_types}}


def our_schema() -> dict[str, Any]:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {
        "package": pb.DESCRIPTOR.package,
        "messages": {n: fields(m) for n, m in pb.DESCRIPTOR.message_types_by_name.items()},
        "methods": {
            m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods
        },
    }


@pytest.fixture(scope="module")
def triton_venv_python() -> str:
    return triton_python()


@pytest.fixture(scope="module")
def triton(triton_venv_python: str, server) -> dict[str, Any]:
    """What tritonclient got from the shared server (the venv is checked before it starts)."""
    schema = our_schema()
    names = {"messages": list(schema["messages"]), "methods": list(schema["methods"])}
    args = {"texts": TEXTS, "users": USERS, "k": K, "model": MODEL, "schema": names}
    done = subprocess.run(
        [triton_venv_python, "-c", CLIENT, server.target, json.dumps(args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"tritonclient script failed:\n{done.stderr}"
    return json.loads(done.stdout)


def test_our_proto_matches_tritons_on_the_wire(triton: dict[str, Any]) -> None:
    assert triton["schema"] == our_schema()


def test_health_and_metadata(triton: dict[str, Any], client: RecommenderClient) -> None:
    assert triton["live"] and triton["ready"] and triton["models_ready"] == [True, True]
    assert triton["server"] == "bertrec"
    dim = client.model_info().dim
    assert triton["metadata"] == {
        f"{MODEL}-encoder": {
            "versions": ["1"],
            "inputs": [["text", "BYTES", [-1]]],
            "outputs": [["embedding", "FP32", [-1, dim]]],
        },
        f"{MODEL}-ranker": {
            "versions": ["1"],
            "inputs": [["user_id", "BYTES", [-1]], ["k", "INT32", [1]], ["explain", "INT32", [1]]],
            "outputs": [
                ["item_ids", "BYTES", [-1, -1]],
                ["scores", "FP32", [-1, -1]],
                *([name, "FP32", [-1, -1]] for name in EXPLANATION_PARTS),
                ["top_contributors", "BYTES", [-1, -1]],
            ],
        },
    }


def test_encoder_matches_embed_text(triton: dict[str, Any], client: RecommenderClient) -> None:
    got = np.array(triton["embedding"], dtype=np.float32)
    native = client.embed_text(TEXTS).vectors
    assert got.shape == native.shape
    # The INT8 encoder quantises activations per batch, so batch company can move values a hair.
    assert measure_parity(got, native).cos_min >= 0.999


def test_ranker_matches_recommend(triton: dict[str, Any], client: RecommenderClient) -> None:
    assert triton["response_id"] == "r-1"
    for row, user in enumerate(USERS):
        native = client.recommend(user, k=K)
        assert triton["item_ids"][row] == native.item_ids
        np.testing.assert_allclose(
            triton["scores"][row], [i.score for i in native.items], rtol=1e-6
        )


def test_unknown_model_is_not_found(triton: dict[str, Any]) -> None:
    assert triton["unknown_model"] == "StatusCode.NOT_FOUND"
