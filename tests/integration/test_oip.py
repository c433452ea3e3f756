"""The Open Inference Protocol (inference.GRPCInferenceService) on the shared server, raw stubs.

Answers are compared with the native API on the same server; every error path is checked for
its status code, and ModelInfer for its metrics (the interceptor's and the batchers').
"""

from __future__ import annotations

import signal
import struct
import time
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from server_harness import MODEL, start_server

from bertrec.client import RecommenderClient
from bertrec.export.verify import measure_parity
from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from bertrec.server.oip.explain import EXPLANATION_PARTS

SERVICE = "inference.GRPCInferenceService"
ENCODER, RANKER = f"{MODEL}-encoder", f"{MODEL}-ranker"
TEXTS = ["a quiet film about the sea", "space battles with robots", "a cookbook of soups"]
USERS = ["u0001", "u0007"]
Input = pb.ModelInferRequest.InferInputTensor
Contents = pb.InferTensorContents
Requested = pb.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def raw_bytes(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def text_input(texts: list[str], shape: list[int] | None = None) -> Input:
    contents = Contents(bytes_contents=[t.encode() for t in texts])
    return Input(name="text", datatype="BYTES", shape=shape or [len(texts)], contents=contents)


def user_input(users: list[str]) -> Input:
    contents = Contents(bytes_contents=[u.encode() for u in users])
    return Input(name="user_id", datatype="BYTES", shape=[len(users)], contents=contents)


def k_input(k: int, datatype: str = "INT64", shape: tuple[int, ...] = (1,)) -> Input:
    field = {"INT64": "int64_contents", "INT32": "int_contents", "FP32": "fp32_contents"}
    contents = Contents(**{field[datatype]: [k] * int(np.prod(shape))})
    return Input(name="k", datatype=datatype, shape=list(shape), contents=contents)


def output(response: pb.ModelInferResponse, name: str) -> tuple[list[int], np.ndarray]:
    """The named output's shape and elements (typed or raw), as numpy."""
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    if response.raw_output_contents:
        raw = response.raw_output_contents[index]
        if tensor.datatype == "BYTES":
            values, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                values.append(raw[offset + 4 : offset + 4 + n])
                offset += 4 + n
            array = np.array(values, dtype=object)
        else:
            array = np.frombuffer(raw, dtype="<f4")
    elif tensor.datatype == "BYTES":
        array = np.array(list(tensor.contents.bytes_contents), dtype=object)
    else:
        array = np.array(tensor.contents.fp32_contents, dtype=np.float32)
    return list(tensor.shape), array.reshape(list(tensor.shape))


def test_health_readiness_and_server_metadata(
    stub: pb_grpc.GRPCInferenceServiceStub, channel: grpc.Channel
) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    for name in (ENCODER, RANKER):
        assert stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=name, version="1")).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name, version="2")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "bertrec" and meta.version
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_inference_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in set(database.get_services())
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip


def test_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub, client: RecommenderClient) -> None:
    dim = client.model_info().dim

    def tensors(ts) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in ts]

    encoder = stub.ModelMetadata(pb.ModelMetadataRequest(name=ENCODER))
    assert (encoder.name, list(encoder.versions), encoder.platform) == (ENCODER, ["1"], "bertrec")
    assert tensors(encoder.inputs) == [("text", "BYTES", [-1])]
    assert tensors(encoder.outputs) == [("embedding", "FP32", [-1, dim])]
    ranker = stub.ModelMetadata(pb.ModelMetadataRequest(name=RANKER, version="1"))
    assert tensors(ranker.inputs) == [
        ("user_id", "BYTES", [-1]),
        ("k", "INT32", [1]),
        ("explain", "INT32", [1]),
    ]
    assert tensors(ranker.outputs) == [
        ("item_ids", "BYTES", [-1, -1]),
        ("scores", "FP32", [-1, -1]),
        *((name, "FP32", [-1, -1]) for name in EXPLANATION_PARTS),
        ("top_contributors", "BYTES", [-1, -1]),
    ]


def test_encoder_typed_and_raw_match_embed_text(
    stub: pb_grpc.GRPCInferenceServiceStub, client: RecommenderClient
) -> None:
    native = client.embed_text(TEXTS).vectors
    typed = stub.ModelInfer(pb.ModelInferRequest(
        model_name=ENCODER, id="req-1", inputs=[text_input(TEXTS)]
    ))  # fmt: skip
    assert (typed.model_name, typed.model_version, typed.id) == (ENCODER, "1", "req-1")
    assert not typed.raw_output_contents  # typed request -> typed answer
    shape, vectors = output(typed, "embedding")
    assert shape == list(native.shape)
    # INT8 activations are quantised per batch, so batch company can move values a hair.
    assert measure_parity(vectors, native).cos_min >= 0.999

    raw = stub.ModelInfer(pb.ModelInferRequest(
        model_name=ENCODER,
        inputs=[Input(name="text", datatype="BYTES", shape=[3])],
        raw_input_contents=[raw_bytes(*(t.encode() for t in TEXTS))],
    ))  # fmt: skip
    assert len(raw.raw_output_contents) == 1 and not raw.outputs[0].HasField("contents")
    shape, vectors = output(raw, "embedding")
    assert shape == list(native.shape)
    assert measure_parity(vectors, native).cos_min >= 0.999


def test_ranker_typed_matches_recommend(
    stub: pb_grpc.GRPCInferenceServiceStub, client: RecommenderClient
) -> None:
    response = stub.ModelInfer(pb.ModelInferRequest(
        model_name=RANKER, inputs=[user_input(USERS), k_input(5)]
    ))  # fmt: skip
    assert [o.name for o in response.outputs] == ["item_ids", "scores"]
    ids_shape, ids = output(response, "item_ids")
    _, scores = output(response, "scores")
    assert ids_shape == [2, 5]
    for row, user in enumerate(USERS):
        native = client.recommend(user, k=5)
        assert [i.decode() for i in ids[row]] == native.item_ids
        np.testing.assert_allclose(scores[row], [i.score for i in native.items], rtol=1e-6)


def test_ranker_raw_int32_k_and_one_requested_output(
    stub: pb_grpc.GRPCInferenceServiceStub, client: RecommenderClient
) -> None:
    response = stub.ModelInfer(pb.ModelInferRequest(
        model_name=RANKER,
        inputs=[Input(name="user_id", datatype="BYTES", shape=[2]),
                Input(name="k", datatype="INT32", shape=[1])],
        outputs=[Requested(name="scores")],
        raw_input_contents=[raw_bytes(*(u.encode() for u in USERS)),
                            np.array([3], "<i4").tobytes()],
    ))  # fmt: skip
    assert [o.name for o in response.outputs] == ["scores"]
    shape, scores = output(response, "scores")
    assert shape == [2, 3]
    for row, user in enumerate(USERS):
        expected = [i.score for i in client.recommend(user, k=3).items]
        np.testing.assert_allclose(scores[row], expected, rtol=1e-6)


def test_ranker_default_k(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    default = stub.ModelInfer(
        pb.ModelInferRequest(model_name=RANKER, inputs=[user_input(["u0001"])])
    )
    assert output(default, "item_ids")[0] == [1, 10]


def test_ranker_pads_rows_with_fewer_than_k_items() -> None:
    # The shared catalogue always has k candidates (60 items, max_k 50, few ratings per user),
    # so a short list is produced by a stand-in engine.
    from bertrec.results import ModelRef, RankedItem, Recommendations
    from bertrec.server.engine import Call
    from bertrec.server.oip.models import RankerModel
    from bertrec.server.oip.tensors import Tensor

    class ShortLists:
        config = SimpleNamespace(max_k=50, ranker_max_batch_size=8)

        def resolve_k(self, k: int) -> int:
            return k

        def recommend_users(
            self, users: list[str], k: int, call: Call, explain: bool = False
        ) -> list[Recommendations]:
            lists = []
            for user in users:
                n = {"a": 3, "b": 1}[user]
                items = [RankedItem(f"{user}{r}", 1.0 - r, 0.0, r) for r in range(1, n + 1)]
                lists.append(Recommendations(items, ModelRef(MODEL, 1)))
            return lists

    users = Tensor("user_id", "BYTES", (2,), [b"a", b"b"])
    k = Tensor("k", "INT32", (1,), np.array([3], np.int32))
    out = RankerModel(RANKER).infer(ShortLists(), {"user_id": users, "k": k},  # type: ignore[arg-type]
                                    Call(time.monotonic() + 5))  # fmt: skip
    assert out["item_ids"].shape == (2, 3)
    assert out["item_ids"].data == [b"a1", b"a2", b"a3", b"b1", b"", b""]
    assert out["scores"].data.tolist() == [[0.0, -1.0, -2.0], [0.0, -np.inf, -np.inf]]


def bad(**changes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=ENCODER, inputs=[text_input(["fine"])])
    for key, value in changes.items():
        request.ClearField(key)
        if isinstance(value, str):
            setattr(request, key, value)
        else:
            getattr(request, key).extend(value)
    return request


NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
truncated = Input(name="text", datatype="BYTES", shape=[1])


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (bad(model_name="nope"), NOT_FOUND, "unknown model 'nope'"),
        (bad(model_version="7"), NOT_FOUND, "has no version '7'"),
        (bad(model_name=RANKER, inputs=[user_input(["u0001", "ghost"])]), NOT_FOUND, "ghost"),
        (bad(inputs=[Input(name="text", datatype="INT32", shape=[1],
                           contents=Contents(int_contents=[1]))]), INVALID, "must be BYTES"),
        (bad(model_name=RANKER, inputs=[user_input(["u0001"]), k_input(3, "FP32")]),
         INVALID, "'k' must be INT32 or INT64, got FP32"),
        (bad(inputs=[Input(name="text", datatype="FP16", shape=[1])]), INVALID, "'FP16'"),
        (bad(inputs=[text_input(["a", "b"], shape=[2, 1])]), INVALID, "must have shape [-1]"),
        (bad(model_name=RANKER, inputs=[user_input(["u0001"]), k_input(3, shape=(2,))]),
         INVALID, "must have shape [1]"),
        (bad(inputs=[text_input(["a", "b"], shape=[3])]), INVALID, "3 elements) but 2"),
        (bad(inputs=[text_input(["a"], shape=[-1])]), INVALID, "negative dimension"),
        (bad(inputs=[text_input([], shape=[0])]), INVALID, "input 'text' is empty"),
        (bad(inputs=[text_input(["a"]), text_input(["b"])]), INVALID, "more than once"),
        (bad(inputs=[Input(name="query", datatype="BYTES", shape=[1],
                           contents=Contents(bytes_contents=[b"a"]))]),
         INVALID, "no input 'query'"),
        (bad(model_name=RANKER, inputs=[k_input(3)]), INVALID, "needs input(s) user_id"),
        (bad(model_name=RANKER, inputs=[user_input(["u0001"]), k_input(-1)]),
         INVALID, "k must be in 1..50, got -1"),
        (bad(inputs=[Input(name="text", datatype="BYTES", shape=[1],
                           contents=Contents(bytes_contents=[b"\xff\xfe"]))]), INVALID, "UTF-8"),
        (bad(outputs=[Requested(name="vector")]), INVALID, "no output 'vector'"),
        (bad(raw_input_contents=[raw_bytes(b"a")]), INVALID, "sets contents"),
        (bad(inputs=[truncated], raw_input_contents=[raw_bytes(b"a"), b""]),
         INVALID, "2 entries for 1 inputs"),
        (bad(inputs=[truncated], raw_input_contents=[struct.pack("<I", 9) + b"abc"]),
         INVALID, "claims 9 bytes"),
    ],
)  # fmt: skip
def test_model_infer_errors(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_: pb.ModelInferRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()


def test_model_metadata_of_unknown_model_is_not_found(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == NOT_FOUND


def scrape(url: str) -> Callable[..., float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return lambda name, **labels: samples.get((name, frozenset(labels.items())), 0.0)


def test_model_infer_is_in_rpc_and_batcher_metrics(
    stub: pb_grpc.GRPCInferenceServiceStub, server
) -> None:
    before = scrape(server.metrics_url)
    stub.ModelInfer(pb.ModelInferRequest(model_name=RANKER, inputs=[user_input(USERS)]))
    stub.ModelInfer(pb.ModelInferRequest(model_name=ENCODER, inputs=[text_input(TEXTS)]))
    for request in (bad(model_name="nope"), bad(inputs=[text_input(["a"], shape=[2])])):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request)
    after = scrape(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    rpc = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "ModelInfer"}
    assert delta("grpc_server_started_total", **rpc) == 4
    assert delta("grpc_server_handled_total", **rpc, grpc_code="OK") == 2
    assert delta("grpc_server_handled_total", **rpc, grpc_code="NotFound") == 1
    assert delta("grpc_server_handled_total", **rpc, grpc_code="InvalidArgument") == 1
    assert delta("grpc_server_handling_seconds_count", **rpc) == 4
    # The request's users are queued together (one batch unless the 2 ms window closes
    # between them on a busy machine); the texts went through the encoder batcher.
    ranker = {"model": MODEL, "batcher": "ranker"}
    assert delta("bertrec_batch_size_count", **ranker) in (1, 2)
    assert delta("bertrec_batch_size_sum", **ranker) == 2
    assert delta("bertrec_batch_size_sum", model=MODEL, batcher="encoder") == 3
    assert after("bertrec_in_flight_requests") == 0


def test_readiness_follows_the_lifecycle(model_repo, tmp_path) -> None:
    server = start_server(model_repo, tmp_path, "--warmup-iterations", "300")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=120
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name=RANKER), timeout=5).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(bad(), timeout=5)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert stub.ModelReady(pb.ModelReadyRequest(name=RANKER), timeout=5).ready
            server.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert server.proc.wait(30) == 0
    finally:
        server.terminate()


def test_not_ready_once_draining() -> None:
    # Over the network a draining server refuses new calls, so ask the servicer directly.
    from bertrec.server.lifecycle import Lifecycle
    from bertrec.server.model_slot import ModelSlot
    from bertrec.server.oip import SERVICE_NAME, InferenceServicer

    lifecycle = Lifecycle(ModelSlot(lambda engine: None))
    servicer = InferenceServicer(lifecycle.lease, lifecycle.loaded, lifecycle.health, MODEL, 5.0,
                                 None)  # type: ignore[arg-type]  # fmt: skip
    lifecycle.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert servicer.ServerReady(pb.ServerReadyRequest(), None).ready  # type: ignore[arg-type]
    lifecycle.shutting_down()
    assert not servicer.ServerReady(pb.ServerReadyRequest(), None).ready  # type: ignore[arg-type]
    assert not servicer.ModelReady(pb.ModelReadyRequest(name=RANKER), None).ready  # type: ignore[arg-type]
