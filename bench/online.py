"""Online evaluation (issue 11): does folding feedback in make the next recommendations better?

    python -m bertrec.bench.online --ratings ../shared/data/ml-latest-small \\
        [--users N] [--max-events N] [--seed S] [--out bench/results/online.json]

1. Time split (bench/online_protocol.py): each user's latest 20% of ratings are held out.
   bertrec is trained on the rest with the quality benchmark's pipeline and defaults and
   exported (bench/online_model.py; the export is cached, keyed by a hash of its inputs).
2. Two real servers on loopback serve that one export: A with a SQLite feedback store
   (fold-in), B with none (frozen).
3. The held-out events are replayed in global time order. Before each event (u, i, r):
   Recommend(u, k=10) on both; on B with `exclude_item_ids` = the items u already streamed,
   so the frozen model is not penalised for re-recommending what u has just rated (A leaves
   them out by itself: its rated items include the folded ones; the run counts any that come
   back). Hit@10 and NDCG@10 of i are recorded for both. Then RecordFeedback(u, i, r,
   occurred_at = the rating's timestamp) on A only; its latency and that of A's Recommends
   are the fold-in's cost.
4. Reports hit rate and NDCG@10 of both (all events, and only events rated >= 4), the lift
   with bootstrap 95% intervals that resample users, and latency percentiles; JSON to --out.

`--users N` replays a seeded sample of whole users, `--max-events N` the first N events of the
stream; the JSON says what ran. Caveat: the split is per user, not global, so the model has
seen other users' ratings made after some replayed events (the usual per-user leave-last-out).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.online_protocol import (
    paired_lift,
    relevant,
    stream_order,
    target_metrics,
    time_holdout,
)

log = logging.getLogger(__name__)
K = 10
PERCENTILES = (50, 90, 99)
PRIOR_BUCKETS = ((1, 4), (5, 19), (20, 99), (100, 100_000))  # the lift as feedback accumulates
CODE_FOLDERS = ("train", "export", "repository", "server", "feedback")


@dataclass(frozen=True)
class StreamEvent:
    """One held-out rating, in external ids, as replayed."""

    user_id: str
    item_id: str
    rating: float
    timestamp: int
    key: str  # idempotency key: the rating's row in the ratings file


@dataclass
class Replayed:
    """Per-event measurements of one replay, aligned with the events."""

    hit_a: np.ndarray
    ndcg_a: np.ndarray
    hit_b: np.ndarray
    ndcg_b: np.ndarray
    feedback_s: np.ndarray  # RecordFeedback on A
    recommend_a_s: np.ndarray
    recommend_b_s: np.ndarray
    prior: np.ndarray  # int: events of u streamed before this one (0: A is not folded yet)
    a_returned_streamed: int  # A's lists that held an item the user had already streamed
    first_lists_differ: int  # events before u's first feedback where A's list != B's

    @classmethod
    def empty(cls, n: int) -> Replayed:
        z = np.zeros
        return cls(z(n), z(n), z(n), z(n), z(n), z(n), z(n), z(n, np.int64), 0, 0)

    @property
    def folded(self) -> np.ndarray:
        """Events whose user had sent feedback before: A ranks with a folded vector."""
        return self.prior > 0


def stream_events(data: Any, test: Any, order: np.ndarray) -> list[StreamEvent]:
    """The replayed events in external ids (`data`: QualityData, `test`: RatingArrays)."""
    return [
        StreamEvent(
            str(data.user_ids[test.users[n]]),
            str(data.item_ids[test.items[n]]),
            float(test.ratings[n]),
            int(test.timestamps[n]),
            f"ml-row-{int(test.rows[n])}",
        )
        for n in order.tolist()
    ]


def replay(a_target: str, b_target: str, events: Sequence[StreamEvent]) -> Replayed:
    """Stream `events` through both servers (see the module docstring, step 3).

    Raises:
        grpc.RpcError: any call failed (the run is void: nothing is skipped silently).
        RuntimeError: A did not accept an event exactly once.
    """
    import grpc

    from bertrec.v1 import recommender_pb2 as pb
    from bertrec.v1 import recommender_pb2_grpc as pb_grpc

    out = Replayed.empty(len(events))
    streamed: dict[str, list[str]] = {}
    with grpc.insecure_channel(a_target) as ca, grpc.insecure_channel(b_target) as cb:
        a, b = pb_grpc.RecommenderServiceStub(ca), pb_grpc.RecommenderServiceStub(cb)
        started = time.monotonic()
        for n, e in enumerate(events):
            seen = streamed.setdefault(e.user_id, [])
            out.prior[n] = len(seen)
            ids_a, out.recommend_a_s[n] = _recommend(a, pb.RecommendRequest(user_id=e.user_id, k=K))
            request_b = pb.RecommendRequest(user_id=e.user_id, k=K, exclude_item_ids=seen)
            ids_b, out.recommend_b_s[n] = _recommend(b, request_b)
            out.hit_a[n], out.ndcg_a[n] = target_metrics(ids_a, e.item_id, K)
            out.hit_b[n], out.ndcg_b[n] = target_metrics(ids_b, e.item_id, K)
            out.a_returned_streamed += bool(set(ids_a).intersection(seen))
            out.first_lists_differ += not seen and ids_a != ids_b
            t0 = time.perf_counter()
            answer = a.RecordFeedback(_feedback(pb, e), timeout=30)
            out.feedback_s[n] = time.perf_counter() - t0
            if answer.accepted != 1:
                raise RuntimeError(f"event {n} ({e}): A answered {answer}")
            seen.append(e.item_id)
            if (n + 1) % 1000 == 0:
                log.info("%d/%d events, %.0f s", n + 1, len(events), time.monotonic() - started)
    return out


def _recommend(stub: Any, request: Any) -> tuple[list[str], float]:
    """The ranked item ids of one Recommend call, and its latency in seconds."""
    t0 = time.perf_counter()
    answer = stub.Recommend(request, timeout=30)
    took = time.perf_counter() - t0
    return [item.item_id for item in answer.items], took


def _feedback(pb: Any, e: StreamEvent) -> Any:
    event = pb.FeedbackEvent(
        user_id=e.user_id,
        item_id=e.item_id,
        kind=pb.FEEDBACK_KIND_RATING,
        rating=e.rating,
        idempotency_key=e.key,
    )
    event.occurred_at.seconds = e.timestamp
    return pb.RecordFeedbackRequest(events=[event])


def latency_ms(seconds: np.ndarray) -> dict[str, float]:
    """Percentiles and mean of call latencies, in milliseconds."""
    if len(seconds) == 0:
        return {}
    values = np.percentile(seconds * 1e3, PERCENTILES)
    out = {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, values, strict=True)}
    return out | {"mean": round(float(seconds.mean() * 1e3), 3), "n": len(seconds)}


def summarize(done: Replayed, events: Sequence[StreamEvent]) -> dict[str, Any]:
    """Quality (all events, and events rated >= 4) with paired lifts, and the costs."""
    users = np.asarray([e.user_id for e in events])
    liked = relevant(np.asarray([e.rating for e in events]))
    subsets = {
        "all": np.ones(len(events), bool),
        "rating>=4": liked,
        "after_feedback": done.folded,  # the user had streamed >= 1 event: A has folded
        **{f"after_{low}-{high}_events": (done.prior >= low) & (done.prior <= high)
           for low, high in PRIOR_BUCKETS},
    }  # fmt: skip
    quality = {}
    for name, mask in subsets.items():
        if not mask.any():  # a small sample may leave a bucket empty
            continue
        quality[name] = {
            metric: asdict(paired_lift(ours[mask], base[mask], users[mask]))
            for metric, ours, base in (
                ("hit@10", done.hit_a, done.hit_b),
                ("ndcg@10", done.ndcg_a, done.ndcg_b),
            )
        }
    return {
        "quality": quality,
        "latency_ms": {
            "record_feedback_a": latency_ms(done.feedback_s),
            "recommend_a_folded": latency_ms(done.recommend_a_s[done.folded]),
            "recommend_a_first": latency_ms(done.recommend_a_s[~done.folded]),
            "recommend_b_frozen": latency_ms(done.recommend_b_s),
        },
        "checks": {
            # Before a user's first feedback A and B hold the same vector and exclusions.
            "first_events_where_a_and_b_lists_differ": done.first_lists_differ,
            "a_lists_with_an_already_streamed_item": done.a_returned_streamed,
        },
    }


def table(summary: dict[str, Any]) -> str:
    """The README's markdown: quality side by side, then the fold-in's cost."""
    from bertrec.bench.common import markdown_table

    rows = []
    for subset, metrics in summary["quality"].items():
        for metric, lift in metrics.items():
            rows.append([
                subset, metric, lift["n_events"], f"{lift['base']:.4f}", f"{lift['ours']:.4f}",
                f"{lift['relative']:+.1%}",
                f"[{lift['relative_95'][0]:+.1%}, {lift['relative_95'][1]:+.1%}]",
            ])  # fmt: skip
    quality = markdown_table(
        ["events", "metric", "n", "frozen", "fold-in", "lift", "95% CI (users)"], rows
    )
    lat = summary["latency_ms"]
    cost = markdown_table(
        ["call", "p50 ms", "p90 ms", "p99 ms", "n"],
        [[name, v["p50"], v["p90"], v["p99"], v["n"]] for name, v in lat.items() if v],
    )
    return f"{quality}\n\n{cost}"


def code_state() -> dict[str, Any]:
    """The commit measured, and any uncommitted change to the code that trains or serves."""
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, check=False)
        return done.stdout.rstrip()

    changed = git("status", "--porcelain", "--", *CODE_FOLDERS).splitlines()
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": changed}


def serve_argv(repo: Path, store_url: str | None) -> list[str]:
    """`bertrec serve` on loopback for the exported model; `store_url` None: no feedback."""
    argv = [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model",
        "bertrec", "--model-control", "none", "--host", "127.0.0.1", "--grpc-port", "0",
        "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--max-item-ids", "5000",
        "--workers", "1",
    ]  # fmt: skip
    return argv + (["--feedback-store", store_url] if store_url else [])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Split, train (or take the cached export), serve A and B, replay, summarize."""
    from bertrec.bench.common import environment, loadavg
    from bertrec.bench.online_model import cache_key, cached_repo
    from bertrec.bench.quality_protocol import load_quality_data
    from bertrec.bench.spawned import Spawned
    from bertrec.train.pipeline import TrainConfig

    start = time.monotonic()
    data = load_quality_data(args.ratings, args.items)
    split = time_holdout(data.ratings)
    cfg = TrainConfig(baselines=False, progress=False)
    repo, cached = cached_repo(data, split.train, cfg, args.cache_dir)
    order = stream_order(split.test, args.users, args.max_events, args.seed)
    events = stream_events(data, split.test, order)
    log.info("replaying %d of %d held-out events", len(events), len(split.test))
    with tempfile.TemporaryDirectory(prefix="bertrec-online-") as tmp:
        root = Path(tmp)
        a = Spawned("fold-in", serve_argv(repo, f"sqlite://{root / 'a.db'}"), root)
        b = Spawned("frozen", serve_argv(repo, None), root)
        try:
            a.wait_ready()
            b.wait_ready()
            replay_start = time.monotonic()
            done = replay(a.target, b.target, events)
            replay_s = time.monotonic() - replay_start
        finally:
            a.stop()
            b.stop()
    return {
        "command": shlex.join(["python", "-m", "bertrec.bench.online", *args.argv]),
        "data": str(args.ratings),
        "split": {
            "rule": "per user with >= 5 ratings, the latest 20% by timestamp held out",
            "n_train": len(split.train),
            "n_test": len(split.test),
            "n_test_users": len(np.unique(split.test.users)),
        },
        "replayed": {
            "events": len(events),
            "users": len({e.user_id for e in events}),
            "sample": {"users": args.users, "max_events": args.max_events, "seed": args.seed},
            "seconds": round(replay_s, 1),
        },
        "model": {"cache_key": cache_key(data, split.train, cfg), "from_cache": cached},
        "code": code_state(),
        "servers": {
            "a": "sqlite store (fold-in)",
            "b": "no store (frozen, exclude_item_ids = the user's streamed items)",
        },
        **summarize(done, events),
        "environment": environment(),
        "loadavg_end": loadavg(),
        "total_s": round(time.monotonic() - start, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation, write its JSON and print the tables; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratings", type=Path, required=True, help="MovieLens folder or file")
    parser.add_argument("--items", type=Path, help="item texts file (optional)")
    parser.add_argument("--users", type=int, help="replay a seeded sample of this many users")
    parser.add_argument("--max-events", type=int, help="replay only the first N events")
    parser.add_argument("--seed", type=int, default=0, help="the user sample's seed (0)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cached exports")
    parser.add_argument("--out", type=Path, default=Path("bench/results/online.json"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cache_dir is None:
        from bertrec.bench.online_model import DEFAULT_CACHE

        args.cache_dir = DEFAULT_CACHE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bertrec.bench.common import write_json

    report = run(args)
    write_json(args.out, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
