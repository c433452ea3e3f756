"""The cost-curves benchmark at a tiny size: one real served cell, the Ranker sweep, and the
report (largest catalogue within the p99 target, marginal bytes, table, statement, plot)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bertrec.bench import cost_curves
from bertrec.bench.common import write_json
from bertrec.bench.cost_curves import (
    Plan,
    ServedCell,
    largest_within,
    marginal_bytes_per_item,
    ranker_cells,
    ranker_fits,
    served_cell,
    statement,
    tables,
)

GIB = 1 << 30


def cell(items: int, dim: int, p99_ms: float, errors: int = 0, answered: float = 100.0,
         rss_kib: int = 100_000) -> ServedCell:  # fmt: skip
    return ServedCell(
        items=items, dim=dim, build_s=1.0, ready_s=2.0, load_s=0.5, rss_kib=rss_kib,
        pss_kib=None, rss_bytes_per_item=rss_kib * 1024 / items, offered_qps=100.0,
        answered_qps=answered, p50_ms=p99_ms / 3, p99_ms=p99_ms, calls=500, errors=errors,
        p99_ms_rounds=[p99_ms], send_late_ms_max=1.0, loadavg=None,
    )  # fmt: skip


def test_a_served_cell_answers_every_scheduled_request_of_a_real_server() -> None:
    got = served_cell(items=2000, dim=8, rate_qps=50.0, duration_s=0.4, rounds=2)
    assert (got.items, got.dim, got.calls, got.errors) == (2000, 8, 20, 0)
    assert 0 < got.p50_ms <= got.p99_ms == min(got.p99_ms_rounds)
    assert len(got.p99_ms_rounds) == 2 and got.send_late_ms_max >= 0
    assert got.rss_kib > 0 and got.load_s is not None and got.ready_s >= got.load_s


def test_the_ranker_sweep_times_each_batch() -> None:
    plan = Plan((500,), (8,), (), rounds=1, budget_s=0.1)
    got = ranker_cells(500, 8, (1, 4), k=10, plan=plan, threads=1)
    assert [(c.items, c.dim, c.batch) for c in got] == [(500, 8, 1), (500, 8, 4)]
    assert all(c.queries_per_s >= c.queries_per_s_median > 0 for c in got)


def test_cells_that_do_not_fit_half_the_memory_are_skipped() -> None:
    assert ranker_fits(10_000_000, 128, 23 * GIB)
    assert not ranker_fits(10_000_000, 256, 23 * GIB)


def test_the_largest_catalogue_needs_every_dim_within_target_and_the_whole_load() -> None:
    cells = [cell(10_000, 64, 5.0), cell(100_000, 64, 20.0), cell(100_000, 256, 49.0),
             cell(1_000_000, 64, 30.0), cell(1_000_000, 256, 51.0)]  # fmt: skip
    assert largest_within(cells) == 100_000
    assert largest_within([cell(10_000, 64, 5.0), cell(100_000, 64, 5.0, errors=1)]) == 10_000
    assert largest_within([cell(10_000, 64, 5.0), cell(100_000, 64, 5.0, answered=80.0)]) == 10_000
    assert largest_within([cell(10_000, 64, 60.0)]) is None
    assert "No served catalogue" in statement([cell(10_000, 64, 60.0)], 100.0)
    said = statement(cells, 100.0)
    assert "100,000 items" in said and "1,000,000 items did not" in said


def test_marginal_bytes_are_counted_over_the_smallest_catalogue_of_the_same_dim() -> None:
    cells = [cell(10_000, 64, 1.0, rss_kib=100_000), cell(110_000, 64, 1.0, rss_kib=125_000),
             cell(10_000, 32, 1.0)]  # fmt: skip
    assert marginal_bytes_per_item(cells) == {(110_000, 64): 25_000 * 1024 / 100_000}


def test_from_json_rewrites_table_statement_and_plot(tmp_path: Path) -> None:
    served = [cell(10_000, 64, 5.0), cell(100_000, 64, 70.0)]
    ranker = [cost_curves.RankerCell(10_000, 64, b, 1000.0 * b, 900.0 * b) for b in (1, 32)]
    out, png = tmp_path / "cc.json", tmp_path / "cc.png"
    write_json(out, {"plan": dataclasses.asdict(cost_curves.QUICK),
                     "ranker": [dataclasses.asdict(c) for c in ranker],
                     "served": [dataclasses.asdict(c) for c in served]})  # fmt: skip
    assert cost_curves.main(["--from-json", "--out", str(out), "--png", str(png)]) == 0
    result = json.loads(out.read_text())
    assert result["largest_within_p99"] == 10_000
    assert result["table"] == tables(ranker, served)
    assert "| 10,000 | 64 | 1000 | 32000 |" in result["table"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("quick", [True, False])
def test_the_plans_measure_what_the_issue_asks(quick: bool) -> None:
    plan = cost_curves.QUICK if quick else cost_curves.FULL
    assert plan.rate_qps == 100.0 and all(seconds > 0 for _, _, seconds in plan.served)
    if not quick:
        assert plan.ranker_items == (10_000, 100_000, 1_000_000, 10_000_000)
        assert plan.dims == (32, 64, 128, 256)
