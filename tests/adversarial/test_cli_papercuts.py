"""Papercuts a new user hits first (issue 12, item 12): a misspelt BERTREC_* variable, `-v`
after the subcommand, `verify --help`, and paths printed as `PosixPath(...)`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertrec.cli import build_parser
from bertrec.server.config import ConfigError, ServerConfig, load_config
from bertrec.server.environment import OTHER_TOOLS_VARIABLES

CLI_TIMEOUT_S = 120


def bertrec(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `bertrec` CLI with the caller's environment minus BERTREC_*, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    return subprocess.run(
        [sys.executable, "-m", "bertrec", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=cwd,
        timeout=CLI_TIMEOUT_S,
    )


# ---- unknown BERTREC_* variables ----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("BERTREC_MAX_KK", "BERTREC_MAX_K"),
        ("BERTREC_GRCP_PORT", "BERTREC_GRPC_PORT"),
        ("BERTREC_REQUEST_TIMEOUT", "BERTREC_REQUEST_TIMEOUT_S"),
        ("BERTREC_MODELREPO", "BERTREC_MODEL_REPO"),
        ("BERTREC_CONFIG_FILE", "BERTREC_CONFIG"),
    ],
)
def test_a_misspelt_variable_is_an_error_naming_the_closest_setting(
    tmp_path: Path, variable: str, suggestion: str
) -> None:
    required = {"model_repo": str(tmp_path), "model": "m"}
    with pytest.raises(ConfigError, match=f"{variable} \\(did you mean {suggestion}\\?\\)"):
        load_config(required, env={variable: "5"})


def test_every_unknown_variable_is_named_even_without_a_close_match(tmp_path: Path) -> None:
    required = {"model_repo": str(tmp_path), "model": "m"}
    with pytest.raises(ConfigError) as raised:
        load_config(required, env={"BERTREC_MAX_KK": "5", "BERTREC_ZZZ": "1"})
    message = str(raised.value)
    assert "BERTREC_MAX_KK (did you mean BERTREC_MAX_K?)" in message
    assert "BERTREC_ZZZ" in message and "BERTREC_ZZZ (" not in message


def test_variables_of_other_tools_and_kubernetes_service_links_are_accepted(
    tmp_path: Path,
) -> None:
    env = {name: "1" for name in OTHER_TOOLS_VARIABLES}
    env.update(
        {
            # What a Service named `bertrec` (deploy/k8s/base/service.yaml) puts in each pod.
            "BERTREC_SERVICE_HOST": "10.0.0.7",
            "BERTREC_SERVICE_PORT": "50051",
            "BERTREC_SERVICE_PORT_GRPC": "50051",
            "BERTREC_PORT": "tcp://10.0.0.7:50051",
            "BERTREC_PORT_50051_TCP": "tcp://10.0.0.7:50051",
            "BERTREC_PORT_50051_TCP_PROTO": "tcp",
            "BERTREC_PORT_50051_TCP_PORT": "50051",
            "BERTREC_PORT_50051_TCP_ADDR": "10.0.0.7",
            # ... and a Service named `bertrec-canary`.
            "BERTREC_CANARY_SERVICE_HOST": "10.0.0.8",
            "BERTREC_CANARY_PORT": "tcp://10.0.0.8:50051",
            "BERTREC_MAX_K": "7",
            "OTHER_TOOL_SETTING": "anything",
        }
    )
    config = load_config({"model_repo": str(tmp_path), "model": "m"}, env=env)
    assert config.max_k == 7


def test_a_port_like_name_without_a_service_link_value_is_still_unknown(tmp_path: Path) -> None:
    required = {"model_repo": str(tmp_path), "model": "m"}
    with pytest.raises(ConfigError, match="BERTREC_GRCP_PORT"):
        load_config(required, env={"BERTREC_GRCP_PORT": "50052"})


def test_serve_exits_at_once_on_a_misspelt_variable(tmp_path: Path) -> None:
    result = bertrec(
        "serve", "--model-repo", str(tmp_path), "--model", "m",
        cwd=tmp_path, env={"BERTREC_MAX_KK": "5"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "BERTREC_MAX_KK (did you mean BERTREC_MAX_K?)" in result.stderr
    assert "Traceback" not in result.stderr


# ---- -v after the subcommand --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["serve", "-v", "--model-repo", "r", "--model", "m"], True),
        (["serve", "--verbose", "--model-repo", "r", "--model", "m"], True),
        (["-v", "serve", "--model-repo", "r", "--model", "m"], True),
        (["serve", "--model-repo", "r", "--model", "m"], False),
        (["verify", "--repo", "r", "--model", "m", "-v"], True),
        (["-v", "verify", "--repo", "r", "--model", "m"], True),
        (["export", "--trained", "t", "--repo", "r", "--model", "m", "-v"], True),
        (["generate", "--out", "o"], False),
        (["generate", "--out", "o", "-v"], True),
    ],
)
def test_verbose_is_accepted_before_and_after_the_subcommand(
    argv: list[str], verbose: bool
) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


def test_dash_v_after_the_subcommand_is_no_usage_error(tmp_path: Path) -> None:
    result = bertrec("verify", "-v", "--repo", str(tmp_path), "--model", "m", cwd=tmp_path)
    assert "unrecognized arguments" not in result.stderr
    assert result.returncode == 2 and "no versions of model 'm'" in result.stderr


# ---- help texts ---------------------------------------------------------------------------


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`bertrec COMMAND --help`, with its line wrapping undone."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_verify_help_speaks_only_of_verifying(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("verify", capsys)
    assert "export the next" not in text
    assert "--version N version number (default: the newest)" in text


def test_export_help_speaks_only_of_exporting(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("export", capsys)
    assert "verify the latest" not in text
    assert "--version N version number (default: the next free one)" in text


# ---- paths in error messages --------------------------------------------------------------


def test_config_errors_print_paths_plainly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo"
    with pytest.raises(ConfigError) as from_flag:
        load_config({"model_repo": str(missing), "model": "m"}, env={})
    assert str(from_flag.value) == f"model_repo={missing} (from --model-repo): no such directory"
    toml = tmp_path / "serve.toml"
    toml.write_text(f'model_repo = "{missing}"\nmodel = "m"\n')
    with pytest.raises(ConfigError, match="no such directory") as from_file:
        load_config({}, env={}, config_file=toml)
    with pytest.raises(ConfigError, match="no such directory") as direct:
        ServerConfig(model_repo=missing, model="m")
    for raised in (from_file, direct):
        message = str(raised.value)
        assert "PosixPath" not in message and f"model_repo={missing}" in message


def test_serve_prints_a_missing_repository_plainly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo"
    result = bertrec("serve", "--model-repo", str(missing), "--model", "m", cwd=tmp_path)
    assert result.returncode == 2
    assert "PosixPath" not in result.stderr
    assert f"model_repo={missing} (from --model-repo): no such directory" in result.stderr
