"""Fixtures of the deployment checks: rendered manifests (the tiny exported model, `model_repo`,
comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, OVERLAYS, run_tool


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered by `kubectl kustomize`, as a file of YAML documents."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        result = run_tool("kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(result.stdout)
    return files
