"""Recommend / RecommendForText with explain=true over real gRPC, against an independent
numpy decomposition of the exported arrays (np.load, no server code)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fakes import make_trained_output
from server_harness import MODEL, Reference, ServerProcess, serving

from bertrec.client import AsyncRecommenderClient, ExplainedItem, RecommenderClient
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

USERS = ("u0000", "u0007", "u0039")
TEXT = "a quiet story about a lighthouse keeper and letters from the sea"


class Decomposition:
    """The score split and rated-item attribution written out from their definitions."""

    def __init__(self, version_dir: Path) -> None:
        def load(name: str) -> np.ndarray:
            return np.load(version_dir / name, allow_pickle=False)

        self.item_ids = [str(i) for i in load("item_ids.npy")]
        self.user_ids = [str(u) for u in load("user_ids.npy")]
        self.users = load("user_factors.npy").astype(np.float64)
        self.items = load("item_factors.npy").astype(np.float64)
        self.text = load("item_text_factors.npy").astype(np.float64)
        self.bias = load("item_rank_bias.npy").astype(np.float64)
        self.gram = load("rank_gramian.npy").astype(np.float64)
        self.conf = load("rated_confidence.npy").astype(np.float64)
        self.indptr = load("rated_indptr.npy")
        self.indices = load("rated_indices.npy")

    def parts(self, vector: np.ndarray, item_id: str) -> tuple[float, float, float]:
        i = self.item_ids.index(item_id)
        text = float(self.text[i] @ vector)
        return float(self.bias[i]), float(self.items[i] @ vector) - text, text

    def contributions(self, user_id: str, item_id: str) -> dict[str, float]:
        """c_j y_i^T W y_j, W = (G + sum_j (c_j - 1) y_j y_j^T)^-1, for every rated item j."""
        u = self.user_ids.index(user_id)
        span = range(int(self.indptr[u]), int(self.indptr[u + 1]))
        system = self.gram.copy()
        for n in span:
            y = self.items[self.indices[n]]
            system += (self.conf[n] - 1.0) * np.outer(y, y)
        w = np.linalg.inv(system)
        y_i = self.items[self.item_ids.index(item_id)]
        return {
            self.item_ids[self.indices[n]]: float(
                self.conf[n] * y_i @ w @ self.items[self.indices[n]]
            )
            for n in span
        }


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """Version 1 of a fake model exported with the arrays explanations read."""
    from bertrec.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("explain")
    trained = make_trained_output(root / "trained", tiny_bert_dir, explanation_arrays=True)
    export_model(trained, root / "repo", MODEL)
    return root / "repo" / MODEL / "1"


@pytest.fixture(scope="module")
def server(version_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(version_dir.parent.parent, tmp_path_factory.mktemp("logs")) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[RecommenderClient]:
    with RecommenderClient(server.target, timeout_s=10.0) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def ref(version_dir: Path) -> Reference:
    return Reference(version_dir)


@pytest.fixture(scope="module")
def dec(version_dir: Path) -> Decomposition:
    return Decomposition(version_dir)


def check_user(items: list, dec: Decomposition, user_id: str) -> None:
    vector = dec.users[dec.user_ids.index(user_id)]
    for item in items:
        assert isinstance(item, ExplainedItem) and item.explanation is not None
        e = item.explanation
        assert abs(e.bias_part + e.collaborative_part + e.text_part - item.score) < 1e-4
        np.testing.assert_allclose(
            (e.bias_part, e.collaborative_part, e.text_part),
            dec.parts(vector, item.item_id),
            atol=1e-5,
        )
        expected = dec.contributions(user_id, item.item_id)
        top = sorted(expected.items(), key=lambda kv: -kv[1])[:3]
        assert [c.item_id for c in e.contributions] == [k for k, _ in top]
        np.testing.assert_allclose(
            [c.contribution for c in e.contributions], [v for _, v in top], rtol=1e-4, atol=1e-5
        )
        assert e.contributions_total == pytest.approx(sum(expected.values()), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("user_id", USERS)
def test_recommend_explains_every_item(client: RecommenderClient, dec, user_id: str) -> None:
    plain = client.recommend(user_id, k=10)
    explained = client.recommend(user_id, k=10, explain=True)
    assert explained.item_ids == plain.item_ids
    assert [i.score for i in explained.items] == [i.score for i in plain.items]
    check_user(explained.items, dec, user_id)


def test_explain_with_filters_and_rated_items(client: RecommenderClient, dec) -> None:
    result = client.recommend("u0003", k=50, exclude_rated=False, explain=True)
    assert len(result.items) == 50
    check_user(result.items, dec, "u0003")


def test_no_explanation_unless_asked(channel: grpc.Channel, client: RecommenderClient) -> None:
    stub = pb_grpc.RecommenderServiceStub(channel)
    response = stub.Recommend(pb.RecommendRequest(user_id="u0001", k=5), timeout=10)
    assert not any(i.HasField("explanation") for i in response.items)
    assert not any(isinstance(i, ExplainedItem) for i in client.recommend("u0001", k=5).items)
    text = stub.RecommendForText(pb.RecommendForTextRequest(text=TEXT, k=5), timeout=10)
    assert not any(i.HasField("explanation") for i in text.items)


def test_recommend_for_text_explains_with_the_folded_vector(
    client: RecommenderClient, ref, dec
) -> None:
    result = client.recommend_for_text(TEXT, k=10, explain=True)
    encoder_file = client.model_info().encoder_file
    vector = ref.text_to_user @ ref.encode([TEXT], encoder_file)[0]
    for item in result.items:
        assert isinstance(item, ExplainedItem) and item.explanation is not None
        e = item.explanation
        assert abs(e.bias_part + e.collaborative_part + e.text_part - item.score) < 1e-4
        np.testing.assert_allclose(
            (e.bias_part, e.collaborative_part, e.text_part),
            dec.parts(vector, item.item_id),
            atol=1e-3,  # the server's encoder run vs onnxruntime here: float32 noise
        )
        assert e.contributions == () and e.contributions_total is None


def test_async_client_explains(server, dec) -> None:
    async def call() -> list:
        async with AsyncRecommenderClient(server.target, timeout_s=10.0) as c:
            return (await c.recommend("u0007", k=5, explain=True)).items

    check_user(asyncio.run(call()), dec, "u0007")


def _ranker_request(explain: int | None, outputs: tuple[str, ...] = ()) -> oip.ModelInferRequest:
    Input = oip.ModelInferRequest.InferInputTensor
    Contents = oip.InferTensorContents
    inputs = [
        Input(name="user_id", datatype="BYTES", shape=[len(USERS)],
              contents=Contents(bytes_contents=[u.encode() for u in USERS])),
        Input(name="k", datatype="INT32", shape=[1], contents=Contents(int_contents=[4])),
    ]  # fmt: skip
    if explain is not None:
        contents = Contents(int_contents=[explain])
        inputs.append(Input(name="explain", datatype="INT32", shape=[1], contents=contents))
    requested = [oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs]
    return oip.ModelInferRequest(model_name=f"{MODEL}-ranker", inputs=inputs, outputs=requested)


def _outputs(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for t in response.outputs:
        values = t.contents.bytes_contents if t.datatype == "BYTES" else t.contents.fp32_contents
        out[t.name] = np.array(list(values), dtype=object if t.datatype == "BYTES" else np.float32)
        out[t.name] = out[t.name].reshape(list(t.shape))
    return out


def test_oip_ranker_explanation_outputs(channel: grpc.Channel, dec) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    out = _outputs(stub.ModelInfer(_ranker_request(1)))
    assert set(out) == {"item_ids", "scores", "bias_part", "collaborative_part", "text_part",
                        "contributions_total", "top_contributors"}  # fmt: skip
    parts = out["bias_part"] + out["collaborative_part"] + out["text_part"]
    np.testing.assert_allclose(parts, out["scores"], atol=1e-4)
    for row, user in enumerate(USERS):
        vector = dec.users[dec.user_ids.index(user)]
        for col, item in enumerate(i.decode() for i in out["item_ids"][row]):
            got = [out[n][row, col] for n in ("bias_part", "collaborative_part", "text_part")]
            np.testing.assert_allclose(got, dec.parts(vector, item), atol=1e-5)
            expected = dec.contributions(user, item)
            top = json.loads(out["top_contributors"][row, col])
            best = sorted(expected, key=lambda j: -expected[j])[:3]
            assert [c["item_id"] for c in top] == best
            total = out["contributions_total"][row, col]
            assert total == pytest.approx(sum(expected.values()), rel=1e-4, abs=1e-5)


def test_oip_ranker_explains_only_when_asked(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    for explain in (None, 0):
        response = stub.ModelInfer(_ranker_request(explain))
        assert [o.name for o in response.outputs] == ["item_ids", "scores"]
    one = stub.ModelInfer(_ranker_request(1, ("text_part",)))
    assert [o.name for o in one.outputs] == ["text_part"]
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(_ranker_request(0, ("scores", "text_part")))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "explain" in (failed.value.details() or "")
