"""Server configuration: precedence flags > env > file > defaults, types and validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bertrec.server.config import (
    DEFAULT_PROVIDERS,
    ConfigError,
    ServerConfig,
    add_flags,
    flags_from_args,
    load_config,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def test_defaults_with_only_required_settings(tmp_path: Path) -> None:
    config = load_config({"model_repo": str(tmp_path), "model": "m"}, env={})
    assert config.model_repo == tmp_path
    assert config.model == "m"
    assert config.version is None
    assert config.grpc_port == 50051
    assert config.ranker_max_queue_delay_us == 200
    assert config.providers == DEFAULT_PROVIDERS


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(
        f'model_repo = "{tmp_path}"\nmodel = "from-file"\nmax_k = 7\nmax_texts = 3\n'
        "grace_period_s = 1.5\n"
    )
    env = {"BERTREC_MAX_K": "8", "BERTREC_MAX_TEXTS": "4", "BERTREC_MODEL": "from-env"}
    config = load_config({"max_k": "9"}, env=env, config_file=toml)
    assert config.max_k == 9  # flag
    assert config.max_texts == 4  # env
    assert config.model == "from-env"  # env over file
    assert config.grace_period_s == 1.5  # file
    assert config.max_item_ids == 1000  # default


def test_config_file_from_env_and_server_table(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(f'[server]\nmodel_repo = "{tmp_path}"\nmodel = "m"\nversion = 3\n')
    config = load_config({}, env={"BERTREC_CONFIG": str(toml)})
    assert config.version == 3


def test_flags_parse_and_only_given_flags_override(tmp_path: Path) -> None:
    args = parse(
        "--model-repo", str(tmp_path), "--model", "m", "--grpc-port", "0",
        "--providers", "CPUExecutionProvider", "--request-timeout-s", "2.5",
    )  # fmt: skip
    flags = flags_from_args(args)
    assert "max_k" not in flags
    config = load_config(flags, env={"BERTREC_MAX_K": "5"}, config_file=args.config)
    assert config.grpc_port == 0
    assert config.providers == ("CPUExecutionProvider",)
    assert config.request_timeout_s == 2.5
    assert config.max_k == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"grpc_port": "70000"}, r"grpc_port=70000 \(from --grpc-port\): must be a port"),
        ({"ranker_max_batch_size": "0"}, r"ranker_max_batch_size=0 .*must be >= 1"),
        ({"max_k": "ten"}, r"max_k='ten' \(from --max-k\): expected int"),
        ({"request_timeout_s": "0"}, r"request_timeout_s=0.0 .*must be > 0"),
        ({"providers": ","}, r"providers=\(\) .*at least one provider"),
        ({"version": "0"}, r"version=0 .*must be >= 1"),
    ],
)
def test_invalid_values_name_setting_value_and_source(
    tmp_path: Path, flags: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"model_repo": str(tmp_path), "model": "m", **flags}, env={})


def test_invalid_env_value_names_the_variable(tmp_path: Path) -> None:
    env = {"BERTREC_RANKER_MAX_QUEUE_SIZE": "-1"}
    with pytest.raises(ConfigError, match=r"from BERTREC_RANKER_MAX_QUEUE_SIZE\): must be >= 1"):
        load_config({"model_repo": str(tmp_path), "model": "m"}, env=env)


def test_empty_optional_env_value_means_unset(tmp_path: Path) -> None:
    required = {"model_repo": str(tmp_path), "model": "m"}
    assert load_config(required, env={"BERTREC_VERSION": ""}).version is None
    assert load_config(required, env={"BERTREC_VERSION": "4"}).version == 4
    with pytest.raises(ConfigError, match=r"grpc_port='' \(from BERTREC_GRPC_PORT\)"):
        load_config(required, env={"BERTREC_GRPC_PORT": ""})


def test_missing_required_and_missing_repo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_repo is required"):
        load_config({"model": "m"}, env={})
    with pytest.raises(ConfigError, match="no such directory"):
        load_config({"model_repo": str(tmp_path / "nope"), "model": "m"}, env={})


def test_file_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_k = [")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config({}, env={}, config_file=bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("max_kk = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*max_kk"):
        load_config({}, env={}, config_file=typo)
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, env={}, config_file=tmp_path / "missing.toml")


def test_config_is_frozen_and_validated_when_built_directly(tmp_path: Path) -> None:
    config = ServerConfig(model_repo=tmp_path, model="m")
    with pytest.raises(AttributeError):
        config.max_k = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_texts=0"):
        ServerConfig(model_repo=tmp_path, model="m", max_texts=0)


def test_env_is_read_when_the_config_is_built(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BERTREC_MODEL_REPO", str(tmp_path))
    monkeypatch.setenv("BERTREC_MODEL", "late")
    assert load_config({}).model == "late"
