"""Fixtures of the deployment checks: rendered manifests and the tiny exported model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DEPLOY, OVERLAYS, ROOT, run_tool


def _integration_conftest() -> Any:
    """tests/integration/conftest.py under its own module name (every conftest is "conftest")."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))  # for its `server_harness` import
    spec = importlib.util.spec_from_file_location(
        "bertrec_integration_conftest", ROOT / "tests" / "integration" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The integration tests' tiny exported model (a session fixture), reused as it is.
model_repo = _integration_conftest().model_repo


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
