"""What users install: the wheel, installed non-editable into fresh virtualenvs, must serve.

Every other test runs in the editable development venv, where a package missing from the
wheel still imports from the checkout; that once shipped wheels (and so every image) without
`bertrec.server.oip`. Here the wheel is built from the checkout, installed into two fresh venvs
(`[cpu]` to serve, bare for the light client), and run from a folder outside the source tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from server_harness import MODEL, start_server

ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 900

# Modules only the server needs; the light client install must not pull any of them in.
SERVER_ONLY = ("onnxruntime", "onnx", "tokenizers", "prometheus_client", "grpc_reflection", "torch")


def _clean_env() -> dict[str, str]:
    """The environment without anything that could point Python back at the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("BERTREC_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*command: str | Path, cwd: Path, timeout_s: float = PIP_TIMEOUT_S) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT, cwd=out)
    (built,) = out.glob("bertrec-*.whl")
    return built


def _venv_with(wheel: Path, where: Path, extras: str) -> Path:
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    spec = f"{wheel}[{extras}]" if extras else str(wheel)
    _run(python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", spec, cwd=where)
    return python


@pytest.fixture(scope="module")
def serve_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv_with(wheel, tmp_path_factory.mktemp("venv-serve"), "cpu")


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv_with(wheel, tmp_path_factory.mktemp("venv-client"), "")


def _package_folders() -> set[str]:
    """Every folder below the mapped package folders that holds Python modules."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in mapping["package-dir"].items():
        base = ROOT / folder
        for module in base.rglob("*.py"):
            parts = module.parent.relative_to(base).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    return found


def test_wheel_ships_every_package_folder(wheel: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("__init__.py")}
    missing = _package_folders() - shipped
    assert not missing, f"folders with modules but no package in the wheel: {sorted(missing)}"
    assert "bertrec.server.oip" in shipped
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "bertrec/client/service_config.json" in names  # the clients' shared retry policy


def test_installed_wheel_serves_verifies_and_answers_the_light_client(
    serve_python: Path, client_python: Path, model_repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = "import bertrec.server.oip as m; print(m.__file__)"
    where = _run(serve_python, "-c", probe, cwd=outside)
    assert "site-packages" in where and str(ROOT) not in where

    verify = _run(
        serve_python.parent / "bertrec", "verify", "--repo", model_repo, "--model", MODEL,
        cwd=outside,
    )  # fmt: skip
    assert verify.strip(), "verify printed nothing"

    # Two workers, as `--workers auto` starts on a multi-core machine: the supervisor spawns
    # `python -m bertrec.server.workers` from the installed package, and each worker serves all
    # of what a single process does.
    server = start_server(
        model_repo, tmp_path / "logs", "--workers", "2", python=str(serve_python), cwd=outside
    )
    try:
        server.wait_serving()
        server.wait_for_line(re.compile(r"worker 1 pid \d+ serving"), 60)
        torch_loaded = _run(
            serve_python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)",
            cwd=outside,
        )  # fmt: skip
        assert torch_loaded.strip() == "True", "the [cpu] install must not bring torch"
        answer = _run(client_python, "-c", _CLIENT_SCRIPT, server.target, cwd=outside)
    finally:
        assert server.terminate() == 0, server.stderr()[-3000:]
    result = json.loads(answer)
    assert result["server_only_modules"] == [], result
    assert len(result["items"]) == 5
    assert result["model"] == MODEL


_CLIENT_SCRIPT = f"""
import importlib.util, json, sys
from bertrec.client import RecommenderClient
with RecommenderClient(sys.argv[1], timeout_s=10.0) as client:
    info = client.model_info()
    recs = client.recommend_for_text("a quiet film about the sea", k=5)
print(json.dumps({{
    "model": info.model.name,
    "items": [i.item_id for i in recs.items],
    "server_only_modules": [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)],
}}))
"""
