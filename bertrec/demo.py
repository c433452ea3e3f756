"""`bertrec demo`: the whole product on the embedded data, in one command.

generate -> train -> export -> serve -> query -> feedback over gRPC, all under one work folder,
printing the evaluation table and real recommendations with their item texts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

MODEL = "bertrec"
TEXT_QUERY = "a haunted house full of ghosts, vampires and screams"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bertrec.train.cli import add_synthetic_args, add_training_args

    p = sub.add_parser(
        "demo",
        help="generate -> train -> export -> serve -> query -> feedback on the embedded data",
        description="Run the whole pipeline on the embedded synthetic catalogue and query the "
        "live gRPC server. Everything is written under --workdir.",
    )
    p.add_argument("--workdir", type=Path, default=Path("bertrec-demo"), help="./bertrec-demo")
    p.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="metrics port (default: free)")
    add_synthetic_args(p)
    add_training_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bertrec.export.onnx_export import export_model
    from bertrec.repository.artifacts import MANIFEST
    from bertrec.train.cli import synthetic_config, training_config
    from bertrec.train.loaders import load_dataset
    from bertrec.train.pipeline import metrics_table, train
    from bertrec.train.split import split_dataset
    from bertrec.train.synthetic import generate
    from bertrec.train.writers import write_dataset

    started = time.monotonic()
    stages: dict[str, float] = {}
    work: Path = args.workdir
    _step(f"1/4 generate the synthetic catalogue -> {work / 'data'}")
    ratings_csv, items_csv = write_dataset(generate(synthetic_config(args))[0], work / "data")
    dataset = load_dataset(ratings_csv, items_csv)
    stages["generate"] = _lap(started, stages)

    trained = work / "trained"
    shutil.rmtree(trained, ignore_errors=True)  # the demo's own scratch output
    _step(f"2/4 train (fine-tune encoder, ranking and rating heads, baselines) -> {trained}")
    split = split_dataset(dataset, args.test_fraction, args.cold_fraction, seed=args.split_seed)
    result = train(dataset, split, training_config(args), trained)
    print(metrics_table(result.metrics))
    stages["train"] = _lap(started, stages)

    _step(f"3/4 export to the model repository {work / 'models'}")
    version_dir = export_model(trained, work / "models", MODEL)
    manifest = json.loads((version_dir / MANIFEST).read_text())
    print(f"exported {version_dir}")
    print("encoder parity: " + json.dumps(manifest.get("encoder", {}).get("variants", {}))[:600])
    stages["export"] = _lap(started, stages)

    _step("4/4 serve and query over gRPC")
    _serve_and_query(args, work / "models", int(version_dir.name), split.cold_items)
    stages["serve_and_query"] = _lap(started, stages)
    print("\nstage timings (s): " + json.dumps(stages))
    return 0


def _serve_and_query(
    args: argparse.Namespace, repo: Path, version: int, cold_items: frozenset[str]
) -> None:
    import signal

    from bertrec.client import RecommenderClient
    from bertrec.server.app import Server
    from bertrec.server.config import load_config

    config = load_config(
        {
            "model_repo": repo,
            "model": MODEL,
            "version": version,
            "host": "127.0.0.1",
            "grpc_port": args.port,
            "metrics_port": args.metrics_port,
            "feedback_store": f"sqlite://{repo.parent.resolve() / 'feedback.db'}",
            # The demo serves from this process (a few calls on a small catalogue): one worker,
            # whatever the CPU count or BERTREC_WORKERS says.
            "workers": 1,
        }
    )
    server = Server(config)
    server.start()
    try:
        server.load()
        target = f"127.0.0.1:{server.port}"
        print(
            f"server ready: grpc {target}, metrics http://127.0.0.1:{server.metrics_port}/metrics"
        )
        with RecommenderClient(target, timeout_s=10.0) as client:
            _query(client, repo / MODEL / str(version), cold_items)
        if args.keep:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: server.request_stop())
            print(f"\nserving on {target} until Ctrl-C (try: grpcurl -plaintext {target} list)")
            server.wait()
    finally:
        server.stop()
    print("server stopped cleanly")


def _query(client: Any, version_dir: Path, cold_items: frozenset[str]) -> None:
    import numpy as np

    from bertrec.repository.artifacts import RATED_INDPTR, USER_IDS

    texts = _item_texts(version_dir)
    user_ids = np.load(version_dir / USER_IDS)
    indptr = np.load(version_dir / RATED_INDPTR)
    user = str(user_ids[int(np.argmax(np.diff(indptr)))])  # the most active user
    info = client.model_info()
    print(
        f"\nmodel {info.model.name} v{info.model.version}: {info.user_count} users, "
        f"{info.item_count} items, dim {info.dim}, provider {info.execution_provider}"
    )

    recs = client.recommend(user, k=5)
    print(f"\nRecommend(user={user!r}, k=5):")
    for item in recs.items:
        print(
            f"  {item.rank}. {item.item_id} score {item.score:.3f} "
            f"predicted {item.predicted_rating:.2f}  {_short(texts, item.item_id, cold_items)}"
        )

    top = client.recommend(user, k=1, explain=True).items[0]
    why = top.explanation
    print(
        f"\nwhy {top.item_id} (score {top.score:.3f} = bias {why.bias_part:.3f} + collaborative "
        f"{why.collaborative_part:.3f} + text {why.text_part:.3f}); rated items that pulled most:"
    )
    for c in why.contributions:
        print(f"  {c.item_id} {c.contribution:+.3f}  {_short(texts, c.item_id, cold_items)}")

    found = client.recommend_for_text(TEXT_QUERY, k=5)
    print(f"\nRecommendForText({TEXT_QUERY!r}, k=5):")
    for item in found.items:
        print(
            f"  {item.rank}. {item.item_id} score {item.score:.3f}  "
            f"{_short(texts, item.item_id, cold_items)}"
        )

    _feedback(client, texts, cold_items, [i.item_id for i in found.items[:2]])

    anchor = recs.items[0].item_id
    similar = client.similar_items(anchor, k=3)
    print(f"\nSimilarItems({anchor!r}, k=3):  {_short(texts, anchor, cold_items)}")
    for item in similar.items:
        print(
            f"  {item.item_id} cosine {item.similarity:.3f}  "
            f"{_short(texts, item.item_id, cold_items)}"
        )


def _feedback(client: Any, texts: dict[str, str], cold: frozenset[str], liked: list[str]) -> None:
    """A new user rates two items: stored durably, folded in, and their next answer uses it."""
    from bertrec.client import Feedback, RecommenderError

    user = "demo-newcomer"
    client.forget_user(user)  # a rerun with --workdir starts this user afresh
    try:
        client.recommend(user, k=3)
    except RecommenderError as exc:
        print(f"\nRecommend(user={user!r}) before any feedback: {exc.code.name}")
    recorded = client.record_feedback([Feedback(user, i, "rating", 5.0) for i in liked])
    print(f"RecordFeedback: {user} rated {', '.join(liked)} 5/5 -> accepted {recorded.accepted}")
    print(f"Recommend(user={user!r}, k=3), folded in from those two ratings:")
    for item in client.recommend(user, k=3).items:
        print(
            f"  {item.rank}. {item.item_id} score {item.score:.3f} "
            f"predicted {item.predicted_rating:.2f}  {_short(texts, item.item_id, cold)}"
        )


def _item_texts(version_dir: Path) -> dict[str, str]:
    import numpy as np

    from bertrec.repository.artifacts import ITEM_IDS, ITEM_TEXTS, load_item_texts

    ids = [str(i) for i in np.load(version_dir / ITEM_IDS).tolist()]
    return dict(zip(ids, load_item_texts(version_dir / ITEM_TEXTS), strict=True))


def _short(texts: dict[str, str], item_id: str, cold: frozenset[str]) -> str:
    tag = "[cold: no ratings] " if item_id in cold else ""
    text = texts.get(item_id, "")
    return tag + (text if len(text) <= 90 else text[:87] + "...")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _lap(started: float, stages: dict[str, float]) -> float:
    return round(time.monotonic() - started - sum(stages.values()), 1)
