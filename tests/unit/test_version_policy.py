"""Version policy: parsing the one-string forms and selecting the versions to keep."""

from __future__ import annotations

import pytest

from bertrec.server.version_policy import PolicyError, VersionPolicy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latest", VersionPolicy.latest(1)),
        ("LATEST", VersionPolicy.latest(1)),
        ("latest 3", VersionPolicy.latest(3)),
        ("latest:2", VersionPolicy.latest(2)),
        (" latest = 2 ", VersionPolicy.latest(2)),
        ("specific 4", VersionPolicy.specific(4)),
        ("specific 5,4", VersionPolicy.specific(4, 5)),
        ("specific:4, 5", VersionPolicy.specific(4, 5)),
    ],
)
def test_parse_accepts_the_documented_forms(text: str, expected: VersionPolicy) -> None:
    assert VersionPolicy.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "newest", "latest 0", "latest 2 3", "specific", "specific 0", "specific x", "all", "-1"],
)
def test_parse_rejects_anything_else(text: str) -> None:
    with pytest.raises(PolicyError):
        VersionPolicy.parse(text)


def test_parse_round_trips_through_str() -> None:
    for text in ("latest", "latest 2", "specific 4", "specific 4,7"):
        assert str(VersionPolicy.parse(text)) == text


def test_latest_keeps_the_newest_ones() -> None:
    assert VersionPolicy.latest().select([3, 1, 2]) == (3,)
    assert VersionPolicy.latest(2).select([3, 1, 2]) == (2, 3)
    assert VersionPolicy.latest(5).select([3, 1]) == (1, 3)
    assert VersionPolicy.latest().select([]) == ()


def test_specific_keeps_only_the_named_versions_that_exist() -> None:
    policy = VersionPolicy.specific(2, 9)
    assert policy.select([1, 2, 3]) == (2,)
    assert policy.select([1, 3]) == ()


def test_the_default_is_latest_one() -> None:
    assert VersionPolicy() == VersionPolicy.latest(1)
