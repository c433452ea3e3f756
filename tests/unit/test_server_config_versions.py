"""The live-version settings: version policy, model control and poll interval."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertrec.server.config import ConfigError, ServerConfig, load_config
from bertrec.server.version_policy import VersionPolicy


def config(tmp_path: Path, **values: object) -> ServerConfig:
    return load_config({"model_repo": str(tmp_path), "model": "m", **values}, env={})


def test_defaults_follow_the_latest_version_every_ten_seconds(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert (c.version_policy, c.model_control, c.poll_interval_s) == ("latest", "poll", 10.0)
    assert c.policy == VersionPolicy.latest() and c.poll_s == 10.0


def test_every_source_sets_them(tmp_path: Path) -> None:
    env = {"BERTREC_VERSION_POLICY": "latest 2", "BERTREC_POLL_INTERVAL_S": "0.5"}
    c = load_config({"model_repo": str(tmp_path), "model": "m", "model_control": "explicit"},
                    env=env)  # fmt: skip
    assert c.policy == VersionPolicy.latest(2)
    assert (c.model_control, c.poll_s) == ("explicit", 0.5)


def test_a_fixed_version_is_the_specific_policy(tmp_path: Path) -> None:
    assert config(
        tmp_path, version="4", version_policy="latest 3"
    ).policy == VersionPolicy.specific(4)


def test_model_control_none_never_polls(tmp_path: Path) -> None:
    assert config(tmp_path, model_control="none", poll_interval_s="2").poll_s == 0.0


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("version_policy", "newest", "expected 'latest', 'latest K'"),
        ("version_policy", "latest 0", "at least 1"),
        ("model_control", "auto", "must be one of"),
        ("poll_interval_s", "-1", "must be >= 0"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, setting: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=setting) as raised:
        config(tmp_path, **{setting: value})
    assert says in str(raised.value)
