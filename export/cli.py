"""`bertrec generate`, `bertrec train` and `bertrec demo` subcommands (filled in by the pipeline)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Placeholder until the training pipeline lands."""
