"""The overload benchmark's pure parts: arguments, the README table, the RSS sampler."""

from __future__ import annotations

import os

import pytest

from bertrec.bench.overload import RssSampler, Step, parse_args, table


def step(rpc: str, factor: float, goodput: float, **shares: float) -> Step:
    return Step(
        rpc=rpc, factor=factor, offered_rps=goodput * max(factor, 1.0), requests=100,
        goodput_rps=goodput, p99_ms=12.5, resource_exhausted=shares.get("re", 0.0),
        deadline_exceeded=shares.get("de", 0.0), other_errors=0.0, errors={},
        rss_peak_mb=200.0, server_cpu_s=1.0, client_cpu_percent=5.0, shed=0.0, encoded=0.0,
        dropped=0.0, handled=100.0,
    )  # fmt: skip


def test_table_has_a_capacity_row_then_one_row_per_factor_relative_to_it() -> None:
    text = table([step("recommend", 0, 100.0), step("recommend", 4, 90.0, re=0.7, de=0.05)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| recommend | capacity | 100 | 100 | 1 |")
    assert lines[3] == "| recommend | 4x | 360 | 90 | 0.9 | 12.5 | 70.0% | 5.0% | 0.0% | 200 |"


def test_arguments_are_parsed_and_checked() -> None:
    args = parse_args(["--quick", "--rpcs", "recommend"])
    assert args.rpcs == ["recommend"] and args.factors == [1.0, 4.0]
    assert parse_args([]).factors == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    for bad in (["--rpcs", "embed_text"], ["--factors", "0"], ["--model", "m"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_rss_sampler_sees_this_process() -> None:
    with RssSampler(os.getpid(), period_s=0.01) as rss:
        pass
    assert rss.peak_kb > 1000
