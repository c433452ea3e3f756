"""Real-data quality benchmark (issue 9): bertrec as exported next to its tuned peers, one split.

    python -m bertrec.bench.quality --ratings ../shared/data/ml-latest-small \\
        [--items FILE] [--out bench/results/quality.json]

Two tables, every model on the same rows (bench/quality_protocol.py):
- warm: the per-user 20% holdout (seed 0); peers tuned on a validation split cut from train
  (seed 1) and refit on the whole train (bench/quality_peers.py); bertrec trained on train
  with its defaults, which were chosen on that same validation split (train/ials.py,
  train/rating_head.py), then exported, loaded as the server loads it and scored through the
  loaded Model (bench/quality_bertrec.py);
- cold items: a seeded 10% of the items with text lose every rating to test, and each model
  ranks only those items for the users who rated one >= 4: text-free peers (with the
  hyper-parameters they chose on the warm split) have nothing to go on, bertrec has the text.
Prints both as markdown and writes everything, with timings, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.quality_bertrec import ExportedModel, train_and_load
from bertrec.bench.quality_models import fit_ease, fit_implicit_als, fit_popularity
from bertrec.bench.quality_peers import default_peers, json_value, run_peers
from bertrec.bench.quality_protocol import (
    HoldoutSplit,
    Quality,
    QualityData,
    cold_item_split,
    evaluate,
    holdout_split,
    load_quality_data,
    ranking_metrics,
    rating_metrics,
    relative_gain_interval,
)
from bertrec.train.pipeline import TrainConfig

log = logging.getLogger(__name__)
BERTREC = "bertrec (as exported)"
RANKING_PEERS = ("implicit ALS", "EASE")  # the ranking targets
RATING_PEER = "surprise SVD++"  # the rating target
TARGETS = {"rmse_below_svdpp": 0.01, "ndcg_above_best": 0.03, "recall_above_best": 0.03}


def run_warm(
    data: QualityData,
    split: HoldoutSplit,
    workdir: Path,
    cfg: TrainConfig,
    threads: int,
    svdpp_grid: bool,
) -> tuple[dict[str, Quality], dict[str, dict[str, Any]]]:
    """Every model on the warm split: (name -> Quality, name -> extra JSON fields)."""
    results: dict[str, Quality] = {}
    extra: dict[str, dict[str, Any]] = {}
    trained = train_and_load(data, split.train, workdir / "warm", cfg)
    results[BERTREC] = evaluate(ExportedModel(trained.model, data), split.train, split.test)
    extra[BERTREC] = {"seconds": trained.seconds, "chosen": "defaults (validation-tuned)"}
    log.info("%s: %s", BERTREC, results[BERTREC].row())
    for run in run_peers(split, default_peers(threads, svdpp_grid=svdpp_grid)):
        row = run.row()
        results[row.pop("model")] = run.quality
        extra[run.tuned.name] = {k: v for k, v in row.items() if k not in run.quality.row()}
    return results, extra


def run_cold(
    data: QualityData,
    workdir: Path,
    cfg: TrainConfig,
    chosen: dict[str, dict[str, Any]],
    threads: int,
) -> dict[str, Any]:
    """The cold-item table: bertrec from text, text-free peers with their warm choices."""
    cold = cold_item_split(data.ratings, data.has_text)
    trained = train_and_load(
        data, cold.train, workdir / "cold", cfg, cold.cold_test, cold.cold_items
    )
    models: dict[str, Any] = {
        BERTREC: ExportedModel(trained.model, data, allow=cold.cold_items),
        "popularity": fit_popularity(cold.train, {}),
        "EASE": fit_ease(cold.train, chosen["EASE"], threads),
        "implicit ALS": fit_implicit_als(cold.train, chosen["implicit ALS"], threads),
    }
    rows = {}
    for name, model in models.items():
        ranking = ranking_metrics(model, cold.train, cold.cold_test, candidates=cold.cold_items)
        rating = rating_metrics(model, cold.cold_test)
        rows[name] = {
            "rmse": None if rating is None else rating.rmse,
            "ndcg@10": ranking.ndcg,
            "recall@10": ranking.recall,
            "n_users": ranking.n_users,
        }
    rows[BERTREC]["seconds"] = trained.seconds
    return {
        "n_cold_items": len(cold.cold_items),
        "n_cold_ratings": len(cold.cold_test),
        "models": rows,
    }


def verdict(results: dict[str, Quality]) -> dict[str, Any]:
    """The issue's three targets, each with the measured gain and a paired 95% interval."""
    ours = results[BERTREC]
    svdpp = results[RATING_PEER].rating
    best = max(RANKING_PEERS, key=lambda n: results[n].ranking.ndcg)
    theirs = results[best].ranking
    out: dict[str, Any] = {"best_ranking_peer": best}
    if ours.rating is not None and svdpp is not None:
        gain = 1.0 - ours.rating.rmse / svdpp.rmse
        out["rmse_below_svdpp"] = {"gain": gain, "met": gain >= TARGETS["rmse_below_svdpp"]}
    for metric, key in (("ndcg", "ndcg_above_best"), ("recall", "recall_above_best")):
        mine = ours.ranking.ndcg if metric == "ndcg" else ours.ranking.recall
        base = theirs.ndcg if metric == "ndcg" else theirs.recall
        low, high = relative_gain_interval(ours.ranking, theirs, metric)
        gain = mine / base - 1.0
        out[key] = {"gain": gain, "interval_95": [low, high], "met": gain >= TARGETS[key]}
    return out


def markdown(rows: dict[str, dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table: one row per model, `columns` of numbers (or "-")."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its JSON; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratings", type=Path, required=True, help="MovieLens folder or file")
    parser.add_argument("--items", type=Path, help="item texts file (optional)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    parser.add_argument("--threads", type=int, default=2, help="threads for the peers (2)")
    parser.add_argument("--svdpp-fixed", action="store_true", help="one SVD++ point, no grid")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-item table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    data = load_quality_data(args.ratings, args.items)
    split = holdout_split(data.ratings)
    cfg = TrainConfig(baselines=False, progress=False)
    with tempfile.TemporaryDirectory(prefix="bertrec-quality-") as tmp:
        results, extra = run_warm(data, split, Path(tmp), cfg, args.threads, not args.svdpp_fixed)
        chosen = {name: extra[name]["chosen"] for name in RANKING_PEERS}
        cold = None if args.no_cold else run_cold(data, Path(tmp), cfg, chosen, args.threads)
    warm = {name: {**q.row(), **extra[name]} for name, q in results.items()}
    report = {
        "data": str(args.ratings),
        "n_users": data.ratings.n_users,
        "n_items": data.ratings.n_items,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "total_s": round(time.monotonic() - start, 1),
        "warm": warm,
        "verdict": verdict(results),
        "cold": cold,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=json_value) + "\n")
    print(markdown(warm, ["rmse", "mae", "ndcg@10", "recall@10"]))
    if cold is not None:
        print("\ncold items (ranking only the held-out items, from text):")
        print(markdown(cold["models"], ["rmse", "ndcg@10", "recall@10"]))
    print("\n" + json.dumps(report["verdict"], indent=2, default=json_value))


if __name__ == "__main__":
    main()
