"""The Recommend path's own CPU per call, in one thread, without gRPC or other threads.

    python -m bertrec.bench.request_path [--items 10000] [--out results/request_path.json]

`bench.server` measures what a call costs a running server (`server_cpu_us_per_call`, split by
thread role). This measures what bertrec's own code costs for the same call when nothing else
runs: for batches of B calls, in one thread, each step as the server runs it:

- `request`: parse the serialized RecommendRequest, validate it, look the user up, queue its
  ranking query (`Recommender.submit_recommend`);
- `rank`: run the batch exactly as the batcher thread does (`Batcher._run`: `Model.rank`, the
  scan in ONNX Runtime, predicted ratings, from WIRE_FROM calls on the responses encoded
  for the whole batch (`server.wire`), futures resolved), per call;
- `response`: what the handler thread does after it wakes: nothing where the batch encoded the
  response, else build the RecommendResponse from the ranked arrays and serialize it.

The difference between the two benches is what the serving loop adds: grpc's threads and
hand-offs between them, and waiting for the GIL (README, "Scaling").
Synthetic version: `--items` x 64, 10k users with 20 rated items each, k=10, rated items
excluded, random known users. Per batch size, the round of `--calls` calls with the least CPU
in all (best of `--rounds`, after one warm-up round).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.synthetic import MODEL, build_synthetic_repo

STEPS = ("request", "rank", "response")


def measure(repo: Path, batch_sizes: Sequence[int], calls: int, rounds: int) -> dict[str, Any]:
    """CPU us per call of each step, the best round per batch size."""
    from bertrec.server.config import ServerConfig
    from bertrec.server.engine import PendingRank, Recommender
    from bertrec.server.metrics import ServerMetrics
    from bertrec.server.model import load_model
    from bertrec.server.service import recommend_response
    from bertrec.v1 import recommender_pb2 as pb

    config = ServerConfig(
        model_repo=repo, model=MODEL, providers=("CPUExecutionProvider",), ranker_threads=1
    )
    engine = Recommender(load_model(config), config, ServerMetrics())  # batchers not started
    rng = np.random.default_rng(0)
    payloads = [
        pb.RecommendRequest(user_id=f"u{u:07d}", k=10).SerializeToString()
        for u in rng.integers(0, engine.model.arrays.user_factors.shape[0], 4096)
    ]

    def request(raws: list[bytes]) -> list[PendingRank]:
        pending = []
        for raw in raws:
            r = pb.RecommendRequest.FromString(raw)
            include, exclude = list(r.include_item_ids), list(r.exclude_item_ids)
            deadline_s = time.monotonic() + 60
            pending.append(engine.submit_recommend(r.user_id, r.k, True, include, exclude,
                                                   deadline_s, wire=True))  # fmt: skip
        return pending

    def rank() -> None:
        engine.ranker._run(engine.ranker._take_live(time.monotonic()))

    def response(pending: list[PendingRank]) -> None:
        for p in pending:
            result = p.future.result(timeout=0)  # resolved by rank()
            if result.wire is None:  # as the servicer: the batch's bytes, else protobuf
                recommend_response(engine.ranked_rows(p, result)).SerializeToString()

    out: dict[str, Any] = {}
    for size in batch_sizes:
        best = dict.fromkeys(STEPS, float("inf"))
        for round_ in range(rounds + 1):  # round 0 warms up
            spent = dict.fromkeys(STEPS, 0.0)
            done = 0
            while done < calls:
                raws = [payloads[(done + i) % len(payloads)] for i in range(size)]
                start = time.thread_time()
                pending = request(raws)
                queued = time.thread_time()
                rank()
                ranked = time.thread_time()
                response(pending)
                spent["request"] += queued - start
                spent["rank"] += ranked - queued
                spent["response"] += time.thread_time() - ranked
                done += size
            per_call = {s: spent[s] / done * 1e6 for s in STEPS}
            if round_ and sum(per_call.values()) < sum(best.values()):
                best = per_call  # the best round as a whole: its steps add up to its total
        out[str(size)] = {**{s: round(best[s], 1) for s in STEPS},
                          "total": round(sum(best.values()), 1)}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from bertrec.bench.common import environment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/request_path.json"))
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--calls", type=int, default=2048, help="per round and batch size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bertrec-bench-request-path-") as tmp:
        repo = build_synthetic_repo(Path(tmp), args.items, 10_000, 64)
        per_call = measure(repo, sizes, args.calls, args.rounds)
    result = {
        "environment": environment(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu_us_per_call": per_call,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(per_call, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
