"""`buf lint` and `buf breaking` over proto/, with the buf CLI from the TypeScript client's npm
packages (or `buf` on PATH).

The breaking check compares the working tree with the previous commit, as CI does for every
landing; the two mutation tests prove both checks can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NPM_BUF = ROOT / "clients" / "typescript" / "node_modules" / ".bin" / "buf"
RECOMMENDER = Path("proto/bertrec/v1/recommender.proto")


@pytest.fixture(scope="module")
def buf() -> str:
    found = str(NPM_BUF) if NPM_BUF.exists() else shutil.which("buf")
    if found is None:
        reason = "buf CLI not found (scripts/ci-deps.sh installs it with the TypeScript client)"
        if os.environ.get("BERTREC_REQUIRE_TOOLCHAINS", "") not in ("", "0"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def _workspace_copy(tmp_path: Path) -> Path:
    """buf.yaml and proto/ copied, so a test can change them without touching the repo."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))  # fmt: skip
    return tmp_path


def test_buf_lint_is_clean(buf: str) -> None:
    result = _run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_previous_commit(buf: str) -> None:
    if _run("git", "rev-parse", "--verify", "--quiet", "HEAD~1").returncode != 0:
        pytest.skip("no previous commit in this checkout (shallow clone?)")
    result = _run(buf, "breaking", "--against", ".git#ref=HEAD~1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(buf: str, tmp_path: Path) -> None:
    changed = _workspace_copy(tmp_path)
    proto = changed / RECOMMENDER
    text = proto.read_text()
    assert "  int32 k = 2;\n" in text
    proto.write_text(text.replace("  int32 k = 2;\n", "  int32 k = 9;\n", 1))
    result = _run(buf, "breaking", str(changed), "--against", str(ROOT))
    assert result.returncode != 0
    assert "k" in result.stdout + result.stderr


def test_buf_lint_catches_a_bad_name(buf: str, tmp_path: Path) -> None:
    changed = _workspace_copy(tmp_path)
    proto = changed / RECOMMENDER
    proto.write_text(proto.read_text() + "\nmessage bad_name {}\n")
    result = _run(buf, "lint", str(changed))
    assert result.returncode != 0
    assert "bad_name" in result.stdout + result.stderr
