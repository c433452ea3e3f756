"""The model repository as an attacker or an unlucky operator leaves it (issue 12, items 8, 9).

Item 8: a version folder or file that leads out of the repository, a manifest naming another
model or version than its folder, and NaN or infinity in a float array are each refused when the
server loads the version (in process and by a real `bertrec serve`), by `bertrec verify`, and
when an export publishes. Item 9: an export killed with SIGKILL leaves its build folder, which
the next export removes, while the build folder of an export still running survives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import (
    ITEM_BIAS,
    ITEM_FACTORS,
    ITEM_RANK_BIAS,
    MANIFEST,
    TEXT_TO_USER,
    USER_BIAS,
    USER_FACTORS,
)
from bertrec.repository.manifest import read_manifest, sha256_file, write_manifest
from bertrec.repository.versions import list_versions, publish_version
from bertrec.server.config import ServerConfig
from bertrec.server.model import Model, load_model

CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic repository holding version 1 of MODEL (never modified)."""
    return build_synthetic_repo(tmp_path_factory.mktemp("pristine"), 40, 12, 8)


@pytest.fixture
def repo(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine repository that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "repo", symlinks=True))


def load(repo: Path, version: int | None = None, model: str = MODEL) -> Model:
    config = ServerConfig(
        model_repo=repo, model=model, version=version, providers=("CPUExecutionProvider",)
    )
    return load_model(config)


def bertrec(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the `bertrec` CLI of this environment, without BERTREC_* variables of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    return subprocess.run(
        [sys.executable, "-m", "bertrec", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=CLI_TIMEOUT_S,
    )


def serve_once(repo: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`bertrec serve` on free loopback ports; a version it refuses makes it exit at once."""
    return bertrec(
        "serve", "--model-repo", str(repo), "--model", MODEL, "--host", "127.0.0.1",
        "--grpc-port", "0", "--metrics-port", "0", "--providers", "CPUExecutionProvider",
        *flags, cwd=repo,
    )  # fmt: skip


def rehash(version_dir: Path) -> None:
    """Record every file's current size and SHA-256 in the manifest, as a forger would."""
    path = version_dir / MANIFEST
    raw = json.loads(path.read_text())
    for name, entry in raw["files"].items():
        entry["sha256"] = sha256_file(version_dir / name)
        entry["bytes"] = (version_dir / name).stat().st_size
    path.write_text(json.dumps(raw))


def poison(version_dir: Path, name: str, value: float) -> None:
    """Put `value` into one element of the float array `name` (a valid .npy afterwards)."""
    array = np.load(version_dir / name)
    array.reshape(-1)[array.size // 2] = value
    np.save(version_dir / name, array, allow_pickle=False)


# ---- item 8a: links out of the repository -------------------------------------------------


def test_a_version_folder_linked_out_of_the_repository_is_refused(
    repo: Path, tmp_path: Path
) -> None:
    # A complete, hash-consistent version 2, but living outside the repository.
    outside = Path(shutil.copytree(repo / MODEL / "1", tmp_path / "elsewhere" / MODEL / "2"))
    _set_manifest_version(outside, 2)
    rehash(outside)
    (repo / MODEL / "2").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="outside the repository"):
        load(repo)
    with pytest.raises(ArtifactError, match="outside the repository"):
        load(repo, version=2)
    load(repo, version=1)  # the genuine version still loads


def test_a_file_linked_out_of_the_repository_is_refused(repo: Path, tmp_path: Path) -> None:
    version_dir = repo / MODEL / "1"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # Same bytes, so every hash still matches: only where the file lives is wrong.
    shutil.move(version_dir / ITEM_FACTORS, outside / ITEM_FACTORS)
    (version_dir / ITEM_FACTORS).symlink_to(outside / ITEM_FACTORS)
    with pytest.raises(ArtifactError, match=f"{ITEM_FACTORS} leads to .*outside the repository"):
        load(repo)


def test_the_real_server_and_verify_refuse_a_version_linked_out(repo: Path, tmp_path: Path) -> None:
    outside = Path(shutil.copytree(repo / MODEL / "1", tmp_path / "elsewhere" / "1"))
    shutil.rmtree(repo / MODEL / "1")
    (repo / MODEL / "1").symlink_to(outside, target_is_directory=True)
    served = serve_once(repo)
    assert served.returncode == 2, served.stderr[-2000:]
    assert "outside the repository" in served.stderr
    verified = bertrec("verify", "--repo", str(repo), "--model", MODEL, cwd=repo)
    assert verified.returncode == 2 and "outside the repository" in verified.stderr


def test_links_inside_the_repository_are_allowed_and_publish_checks_links(
    repo: Path, tmp_path: Path
) -> None:
    first = repo / MODEL / "1"
    manifest = read_manifest(first)

    def share_files_with(source: Path, version: int) -> Callable[[Path], None]:
        def build(out: Path) -> None:
            for path in source.iterdir():
                if path.name != MANIFEST:
                    (out / path.name).symlink_to(path)
            write_manifest(out, dataclasses.replace(manifest, version=version))

        return build

    publish_version(repo, MODEL, share_files_with(first, 2), version=2)
    assert load(repo).version == 2  # a file shared with another version of the repository

    outside = Path(shutil.copytree(first, tmp_path / "elsewhere"))
    with pytest.raises(ArtifactError, match="outside the repository"):
        publish_version(repo, MODEL, share_files_with(outside, 3), version=3)
    assert list_versions(repo, MODEL) == [1, 2]
    assert not [p for p in (repo / MODEL).iterdir() if p.name.startswith(".")]


# ---- item 8b: a manifest that disagrees with its folder -----------------------------------


def test_a_version_copied_under_another_number_is_refused(repo: Path) -> None:
    # Every hash matches: the files are exactly version 1's, now also listed as version 2.
    shutil.copytree(repo / MODEL / "1", repo / MODEL / "2")
    with pytest.raises(ArtifactError, match="is for version 1, but the folder is version 2"):
        load(repo)
    verified = bertrec("verify", "--repo", str(repo), "--model", MODEL, cwd=repo)
    assert verified.returncode == 1
    assert "is for version 1, but the folder is version 2" in verified.stdout


def test_a_version_copied_under_another_model_is_refused(repo: Path) -> None:
    shutil.copytree(repo / MODEL / "1", repo / "other" / "1")
    with pytest.raises(ArtifactError, match=f"for model '{MODEL}', but .* model 'other'"):
        load(repo, model="other")


def test_the_real_server_refuses_a_version_under_the_wrong_number(repo: Path) -> None:
    shutil.copytree(repo / MODEL / "1", repo / MODEL / "5")
    served = serve_once(repo, "--version", "5")
    assert served.returncode == 2, served.stderr[-2000:]
    assert "is for version 1, but the folder is version 5" in served.stderr


def test_publish_refuses_a_manifest_for_another_version(repo: Path) -> None:
    first = repo / MODEL / "1"
    manifest = read_manifest(first)

    def build(out: Path) -> None:
        for path in first.iterdir():
            if path.name != MANIFEST:
                shutil.copyfile(path, out / path.name)
        write_manifest(out, manifest)  # still says version 1

    with pytest.raises(ArtifactError, match="is for version 1, but the folder is version 2"):
        publish_version(repo, MODEL, build, version=2)
    assert list_versions(repo, MODEL) == [1]


# ---- item 8c: NaN and infinity in the float arrays ----------------------------------------

FLOAT_ARRAYS = (ITEM_FACTORS, USER_FACTORS, ITEM_BIAS, USER_BIAS, ITEM_RANK_BIAS, TEXT_TO_USER)


@pytest.mark.parametrize("name", FLOAT_ARRAYS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_refused_at_load(repo: Path, name: str, value: float) -> None:
    version_dir = repo / MODEL / "1"
    poison(version_dir, name, value)
    rehash(version_dir)  # the hashes agree: only the values are wrong
    with pytest.raises(ArtifactError, match=f"{name}: row \\d+ holds NaN or infinity"):
        load(repo)


def test_the_real_server_and_verify_refuse_non_finite_factors(repo: Path) -> None:
    version_dir = repo / MODEL / "1"
    poison(version_dir, ITEM_FACTORS, np.nan)
    rehash(version_dir)
    served = serve_once(repo)
    assert served.returncode == 2, served.stderr[-2000:]
    assert f"{ITEM_FACTORS}: row 20 holds NaN or infinity" in served.stderr
    verified = bertrec("verify", "--repo", str(repo), "--model", MODEL, cwd=repo)
    assert verified.returncode == 1 and "NaN or infinity" in verified.stdout


@pytest.mark.parametrize("name", [ITEM_FACTORS, TEXT_TO_USER])
def test_publish_refuses_non_finite_arrays(repo: Path, name: str) -> None:
    first = repo / MODEL / "1"
    manifest = dataclasses.replace(read_manifest(first), version=2)

    def build(out: Path) -> None:
        for path in first.iterdir():
            if path.name != MANIFEST:
                shutil.copyfile(path, out / path.name)
        poison(out, name, np.inf)
        write_manifest(out, manifest)

    with pytest.raises(ArtifactError, match=f"{name}: row \\d+ holds NaN or infinity"):
        publish_version(repo, MODEL, build, version=2)
    assert list_versions(repo, MODEL) == [1]


# ---- item 9: build folders of killed exports ----------------------------------------------

# A publish whose build writes a file, prints its build folder, then waits for a line on stdin
# before finishing: the test kills it or lets it finish.
EXPORTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from bertrec.repository.versions import publish_version

    def build(out: Path) -> None:
        (out / "half-written.bin").write_bytes(bytes(1 << 20))
        print(out, flush=True)
        sys.stdin.readline()
        (out / "marker.txt").write_text("finished")

    publish_version(Path(sys.argv[1]), "m", build, version=int(sys.argv[2]))
    """
)


def start_exporter(repo: Path, version: int) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(repo), str(version)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"exporter for version {version} exited early ({proc.wait()})"
    return proc, Path(line)


def hidden(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "m").iterdir() if p.name.startswith("."))


def test_the_next_export_removes_a_killed_exports_folder_but_not_a_running_ones(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    killed, killed_dir = start_exporter(repo, 1)
    running, running_dir = start_exporter(repo, 2)
    try:
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(30) == -signal.SIGKILL
        assert killed_dir.is_dir()  # kill -9: no cleanup ran

        publish_version(repo, "m", lambda out: (out / "marker.txt").write_text("3"), version=3)

        assert not killed_dir.exists()
        assert running_dir.is_dir() and (running_dir / "half-written.bin").is_file()
        assert hidden(repo) == [running_dir.name, running_dir.name + ".lock"]
        assert running.stdin is not None
        running.stdin.write("finish\n")
        running.stdin.flush()
        assert running.wait(30) == 0
    finally:
        for proc in (killed, running):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert list_versions(repo, "m") == [2, 3]
    assert (repo / "m" / "2" / "marker.txt").read_text() == "finished"
    assert hidden(repo) == []


def _set_manifest_version(version_dir: Path, version: int) -> None:
    path = version_dir / MANIFEST
    raw = json.loads(path.read_text())
    raw["version"] = version
    path.write_text(json.dumps(raw))
