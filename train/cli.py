"""`bertrec generate` and `bertrec train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bertrec.errors import BertrecError

if TYPE_CHECKING:
    from bertrec.train.pipeline import TrainConfig
    from bertrec.train.synthetic import SyntheticConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser(
        "generate",
        help="write the embedded synthetic dataset as CSV files",
        description="Write ratings.csv and items.csv of the synthetic catalogue.",
    )
    gen.add_argument("--out", type=Path, required=True, help="folder to write into")
    add_synthetic_args(gen)
    gen.set_defaults(func=run_generate)

    tr = sub.add_parser(
        "train",
        help="fine-tune the encoder, fit factors, evaluate",
        description="Train a hybrid text-aware recommender and evaluate it "
        "against popularity, biased MF and implicit ALS.",
    )
    tr.add_argument(
        "--ratings",
        type=Path,
        required=True,
        help="ratings file (csv/tsv/jsonl) or a MovieLens folder",
    )
    tr.add_argument("--items", type=Path, help="item texts file (csv/tsv/jsonl)")
    tr.add_argument(
        "--test", type=Path, help="evaluation ratings file (default: a seeded split of --ratings)"
    )
    tr.add_argument("--out", type=Path, required=True, help="training output folder (new)")
    tr.add_argument(
        "--feedback",
        metavar="STORE_URL",
        default=os.environ.get("BERTREC_TRAIN_FEEDBACK") or None,
        help="fold a feedback store (sqlite://PATH or redis://host:port/db) into the data: "
        "its ratings are added (the latest per user and item wins) and forgotten users are "
        "left out (default: $BERTREC_TRAIN_FEEDBACK, which keeps a Redis password off the "
        "command line)",
    )
    add_training_args(tr)
    tr.set_defaults(func=run_train)


def add_synthetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=1500, help="synthetic users (default 1500)")
    p.add_argument(
        "--items-count",
        type=int,
        default=1200,
        dest="items_count",
        help="synthetic items (default 1200)",
    )
    p.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", default="bertrec", help="model name (default bertrec)")
    p.add_argument(
        "--encoder",
        type=Path,
        help="local Hugging Face BERT checkpoint (default: packaged all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--dim", type=int, default=64, help="ranking factors and encoder output (default 64)"
    )
    p.add_argument("--rating-dim", type=int, default=32, help="rating head factors (default 32)")
    p.add_argument("--epochs", type=int, default=20, help="biased_mf baseline epochs (default 20)")
    p.add_argument(
        "--rank-weight",
        type=float,
        default=2.0,
        help=argparse.SUPPRESS,  # the old hybrid's BPR weight; kept so scripts keep working
    )
    p.add_argument(
        "--finetune-samples",
        type=int,
        default=512,
        help="text/rating pairs for encoder fine-tuning; 0 = frozen (default 512)",
    )
    p.add_argument("--finetune-epochs", type=int, default=1, help="default 1")
    p.add_argument(
        "--finetune-layers",
        type=int,
        default=2,
        help="top transformer layers updated by fine-tuning; 0 = all (default 2)",
    )
    p.add_argument("--max-seq-len", type=int, default=128, help="serving truncation (default 128)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="per-user holdout (0.2)")
    p.add_argument("--cold-fraction", type=float, default=0.1, help="cold-start items (0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--no-baselines", action="store_true", help="skip baseline models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    """The catalogue asked for with the flags of `add_synthetic_args`."""
    from bertrec.train.synthetic import SyntheticConfig

    return SyntheticConfig(n_users=args.users, n_items=args.items_count, seed=args.seed)


def run_generate(args: argparse.Namespace) -> int:
    from bertrec.train.synthetic import generate
    from bertrec.train.writers import write_dataset

    dataset, _ = generate(synthetic_config(args))
    ratings, items = write_dataset(dataset, args.out)
    print(
        f"wrote {len(dataset.ratings)} ratings to {ratings} and "
        f"{len(dataset.item_texts)} item texts to {items}"
    )
    return 0


def training_config(args: argparse.Namespace) -> TrainConfig:
    from bertrec.train.finetune import FinetuneConfig
    from bertrec.train.heads import HeadsConfig
    from bertrec.train.hybrid import HybridConfig
    from bertrec.train.ials import IALSConfig
    from bertrec.train.pipeline import TrainConfig
    from bertrec.train.rating_head import RatingConfig

    if args.dim <= 0 or args.rating_dim <= 0 or args.epochs < 0 or args.max_seq_len < 8:
        raise BertrecError(
            "--dim and --rating-dim must be > 0, --epochs >= 0 and --max-seq-len >= 8"
        )
    return TrainConfig(
        model_name=args.model_name,
        encoder_path=args.encoder,
        max_seq_len=args.max_seq_len,
        finetune=FinetuneConfig(
            samples=args.finetune_samples,
            epochs=args.finetune_epochs,
            top_layers=args.finetune_layers,
        ),
        heads=HeadsConfig(IALSConfig(dim=args.dim), RatingConfig(dim=args.rating_dim)),
        hybrid=HybridConfig(dim=args.dim, epochs=args.epochs, rank_weight=args.rank_weight),
        baselines=not args.no_baselines,
        progress=not args.quiet,
    )


def run_train(args: argparse.Namespace) -> int:
    from bertrec.train.loaders import load_dataset, load_ratings
    from bertrec.train.pipeline import metrics_table, train
    from bertrec.train.split import split_dataset, split_with_test

    if args.out.exists() and any(args.out.iterdir()):
        raise BertrecError(f"{args.out}: output folder exists and is not empty")
    dataset = load_dataset(args.ratings, args.items)
    test = load_ratings(args.test) if args.test is not None else None
    notes: dict[str, object] = {}
    if args.feedback:
        from bertrec.train.feedback_data import fold_feedback

        folded = fold_feedback(args.feedback, dataset, test)
        dataset, test = folded.dataset, folded.test
        notes["feedback"] = folded.summary.as_metrics()
        print(folded.summary.line())
    if test is not None:
        split = split_with_test(dataset, test)
    else:
        split = split_dataset(dataset, args.test_fraction, args.cold_fraction, seed=args.split_seed)
    result = train(dataset, split, training_config(args), args.out, notes)
    print(metrics_table(result.metrics))
    print(f"\ntraining output: {args.out}  (metrics: {args.out / 'metrics.json'})")
    print("timings (s): " + json.dumps(result.seconds))
    return 0
