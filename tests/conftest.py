"""Shared fixtures, built once per test session: a tiny random-weight BERT checkpoint and a
model repository holding it exported (the integration and deploy tests serve it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bertrec.train.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A model repository holding version 1 of `tiny`, exported from a fake training output."""
    from fakes import make_trained_output
    from server_harness import MODEL

    from bertrec.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("serving")
    trained = make_trained_output(root / "trained", tiny_bert_dir)
    repo = root / "repo"
    export_model(trained, repo, MODEL)
    return repo
