"""Live model versions on the real server: publish 2..6 under steady load with zero failed calls,
every answer from a complete version; a corrupted version refused; a killed export ignored;
rollback and un-pinning over the model-repository RPCs; the swap metrics.

One server (polling every 0.2 s, `--model-control explicit`) serves a private copy of the
session's tiny model repository, so the shared repository is never changed. Load comes from
plain gRPC stubs (no client retries that could hide a failure). Latency during swaps and in
steady state is printed for the record, never asserted (speed belongs in bench/swap.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_harness import MODEL, Reference, ServerProcess, start_server

from bertrec.bench.versions import publish_variant, write_variant
from bertrec.repository.artifacts import ITEM_FACTORS
from bertrec.repository.versions import publish_version
from bertrec.server.models_cli import ModelsClient
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

POLL_S = 0.2
USERS = ["u0001", "u0007", "u0013", "u0021", "u0033"]
TEXTS = ["a quiet film about the sea", "space battles with robots"]
K = 5
WAIT_S = 60.0


@dataclass(frozen=True)
class Answer:
    """One call of the load generator: what was asked, which version answered, what it said."""

    rpc: str
    query: str
    version: int
    items: tuple[str, ...]
    scores: tuple[float, ...]
    start_s: float
    end_s: float
    error: str = ""


class LoadGenerator:
    """Threads calling Recommend and RecommendForText back to back (with a short pause)."""

    def __init__(self, target: str, threads: int = 3, pause_s: float = 0.01) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.RecommenderServiceStub(self._channel)
        self._stop = threading.Event()
        self._pause_s = pause_s
        self.answers: list[Answer] = []
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._channel.close()

    def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            n += 1
            self.answers.append(self._one(n))
            time.sleep(self._pause_s)

    def _one(self, n: int) -> Answer:
        start = time.monotonic()
        if n % 3 == 0:
            rpc, query = "text", TEXTS[n % len(TEXTS)]
            call = lambda: self._stub.RecommendForText(  # noqa: E731
                pb.RecommendForTextRequest(text=query, k=K), timeout=10
            )
        else:
            rpc, query = "user", USERS[n % len(USERS)]
            call = lambda: self._stub.Recommend(  # noqa: E731
                pb.RecommendRequest(user_id=query, k=K), timeout=10
            )
        try:
            response = call()
        except grpc.RpcError as exc:
            return Answer(rpc, query, 0, (), (), start, time.monotonic(), str(exc.code()))
        items = tuple(i.item_id for i in response.items)
        scores = tuple(i.score for i in response.items)
        return Answer(rpc, query, response.model.version, items, scores, start, time.monotonic())


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private repository holding a copy of the session model's version 1."""
    root = tmp_path_factory.mktemp("live") / "repo"
    shutil.copytree(model_repo / MODEL / "1", root / MODEL / "1")
    return root


@pytest.fixture(scope="module")
def live(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    flags = ("--model-control", "explicit", "--poll-interval-s", str(POLL_S),
             "--encoder-variant", "fp32")  # fmt: skip
    server = start_server(repo, tmp_path_factory.mktemp("live-logs"), *flags)
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


def serving_version(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.RecommenderServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        return int(info.model.version)


def wait_until(condition: object, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def text_vectors(target: str) -> dict[str, np.ndarray]:
    """The server's encoder vectors (the encoder is the same in every version)."""
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.RecommenderServiceStub(channel).EmbedText(
            pb.EmbedTextRequest(texts=TEXTS)
        )
    vectors = [np.array(e.values, np.float64) for e in response.embeddings]
    return dict(zip(TEXTS, vectors, strict=True))


def expected(ref: Reference, answer: Answer, vectors: dict[str, np.ndarray]) -> list[str]:
    if answer.rpc == "user":
        return [i for i, _ in ref.recommend(answer.query, K)]
    return [i for i, _ in ref.top(ref.text_to_user @ vectors[answer.query], K)]


def p99_ms(answers: list[Answer]) -> float:
    return float(np.percentile([(a.end_s - a.start_s) * 1000 for a in answers], 99))


def test_versions_2_to_6_under_load_with_zero_failures(live: ServerProcess, repo: Path) -> None:
    vectors = text_vectors(live.target)
    swaps: list[tuple[float, float]] = []  # publish started .. new version seen serving
    with LoadGenerator(live.target) as load:
        time.sleep(1.0)  # steady state first
        for version in range(2, 7):
            published = time.monotonic()
            publish_variant(repo, MODEL, 1, seed=version, version=version)
            wait_until(lambda v=version: serving_version(live.target) == v, f"version {version}")
            swaps.append((published, time.monotonic()))
            time.sleep(0.5)  # some steady state between swaps
        time.sleep(1.0)
    answers = load.answers
    failed = [a for a in answers if a.error]
    assert failed == [], f"{len(failed)} of {len(answers)} calls failed: {failed[:3]}"
    refs = {v: Reference(repo / MODEL / str(v)) for v in range(1, 7)}
    for a in answers:
        assert a.version in refs, f"answer from an unknown version {a.version}"
        assert list(a.items) == expected(refs[a.version], a, vectors), a
    versions = [a.version for a in sorted(answers, key=lambda a: a.end_s)]
    assert versions[-1] == 6 and set(versions) >= {1, 6}
    near = [
        a for a in answers if any(a.start_s <= end and a.end_s >= start for start, end in swaps)
    ]
    steady = [a for a in answers if a not in near]
    print(
        f"\n{len(answers)} calls, 0 failed; p99 steady {p99_ms(steady):.1f} ms ({len(steady)} "
        f"calls), during swaps {p99_ms(near):.1f} ms ({len(near)} calls)"
    )


def test_a_corrupted_version_is_refused_and_the_old_one_keeps_serving(
    live: ServerProcess, repo: Path
) -> None:
    wait_until(lambda: serving_version(live.target) == 6, "version 6")

    def corrupted(out: Path) -> None:
        write_variant(repo / MODEL / "1", out, 7, seed=7)
        data = bytearray((out / ITEM_FACTORS).read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes: only the hash can tell
        (out / ITEM_FACTORS).write_bytes(bytes(data))

    publish_version(repo, MODEL, corrupted, 7)
    with grpc.insecure_channel(live.target) as channel:
        models = ModelsClient(channel)
        wait_until(
            lambda: any(e.version == "7" and e.state == "UNAVAILABLE" and "SHA-256" in e.reason
                        for e in models.index()),
            "version 7 refused",
        )  # fmt: skip
    assert serving_version(live.target) == 6
    metrics = _metrics(live)
    assert 'bertrec_model_load_failures_total{model="tiny"} 1.0' in metrics


def test_an_export_killed_midway_leaves_nothing_to_pick_up(live: ServerProcess, repo: Path) -> None:
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from bertrec.repository.versions import publish_version\n"
        "def build(out):\n"
        "    (out / 'item_factors.npy').write_bytes(b'half')\n"
        "    print('building', flush=True)\n"
        "    sys.stdin.read()  # holds the build open until the test kills it\n"
        "publish_version(Path(sys.argv[1]), sys.argv[2], build, 8)\n"
    )
    exporter = subprocess.Popen(
        [sys.executable, "-c", script, str(repo), MODEL],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert exporter.stdout is not None and exporter.stdout.readline() == "building\n"
        os.kill(exporter.pid, signal.SIGKILL)
        exporter.wait(10)
    finally:
        if exporter.poll() is None:
            exporter.kill()
    assert any(p.name.startswith(".tmp-8-") for p in (repo / MODEL).iterdir())
    time.sleep(5 * POLL_S)  # several polls see the dead export's folder
    with grpc.insecure_channel(live.target) as channel:
        assert "8" not in {e.version for e in ModelsClient(channel).index()}
    assert serving_version(live.target) == 6


def test_rollback_to_4_then_follow_the_policy_again(live: ServerProcess, repo: Path) -> None:
    with grpc.insecure_channel(live.target) as channel:
        models = ModelsClient(channel)
        models.load(MODEL, 4)
        assert serving_version(live.target) == 4
        ref = Reference(repo / MODEL / "4")
        request = pb.RecommendRequest(user_id="u0001", k=K)
        got = pb_grpc.RecommenderServiceStub(channel).Recommend(request)
        assert [i.item_id for i in got.items] == [i for i, _ in ref.recommend("u0001", K)]
        publish_variant(repo, MODEL, 1, seed=9, version=9)
        time.sleep(5 * POLL_S)
        assert serving_version(live.target) == 4  # pinned: polls do not move it
        models.load(MODEL)  # un-pin: the policy (latest) decides again
        assert serving_version(live.target) == 9
        index = {e.version: e for e in models.index()}
        assert index["9"].state == "READY" and index["9"].reason == "serving"
        assert index["4"].state == "UNAVAILABLE"


def test_swap_metrics_and_old_series_removed(live: ServerProcess) -> None:
    def info() -> list[str]:
        return [line for line in _metrics(live).splitlines()
                if line.startswith("bertrec_model_info{")]  # fmt: skip

    # An unloaded version's series goes once its last call is over and it is closed.
    wait_until(lambda: len(info()) == 1, "only one bertrec_model_info series")
    assert 'version="9"' in info()[0]
    text = _metrics(live)
    swaps = [line for line in text.splitlines() if line.startswith("bertrec_model_swaps_total")]
    assert swaps and float(swaps[0].split()[-1]) >= 7
    assert "bertrec_model_load_seconds_count" in text
    assert 'bertrec_model_serving_version{model="tiny"} 9.0' in text


def _metrics(server: ServerProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return response.read().decode()
