"""The swap benchmark's pure parts, and `publish_variant` (new versions without exporting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertrec.bench.loadtest.recorder import Calls
from bertrec.bench.swap import SwapWindow, during_swaps
from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.bench.versions import publish_variant
from bertrec.repository.artifacts import ITEM_FACTORS, TOKENIZER
from bertrec.repository.manifest import read_manifest, verify_files
from bertrec.repository.versions import list_versions


def test_a_variant_is_a_complete_verified_version_with_other_factors(tmp_path: Path) -> None:
    repo = build_synthetic_repo(tmp_path, n_items=50, n_users=10, dim=8)
    assert publish_variant(repo, MODEL, 1, seed=3) == 2
    assert publish_variant(repo, MODEL, 1, seed=3, version=5) == 5
    assert list_versions(repo, MODEL) == [1, 2, 5]
    base, two, five = (repo / MODEL / str(v) for v in (1, 2, 5))
    verify_files(two, read_manifest(two))
    assert read_manifest(two).version == 2
    assert not np.array_equal(np.load(base / ITEM_FACTORS), np.load(two / ITEM_FACTORS))
    assert np.array_equal(np.load(two / ITEM_FACTORS), np.load(five / ITEM_FACTORS))  # seeded
    assert (two / TOKENIZER).read_bytes() == (base / TOKENIZER).read_bytes()


def test_calls_in_flight_during_a_swap_or_its_settle_time_count_as_during() -> None:
    ms = 1_000_000
    intended = np.array([0, 10, 40, 95, 200]) * ms
    done = np.array([5, 50, 60, 99, 210]) * ms
    calls = Calls(np.zeros(5, np.int8), intended, intended, done, np.zeros(5, np.int8))
    windows = [SwapWindow(start_ns=45 * ms, end_ns=80 * ms, version=2, rss_mb=1.0)]
    mask = during_swaps(calls, windows, settle_ns=20 * ms)
    # [0,5] before; [10,50] overlaps the start; [40,60] inside; [95,99] in the settle time;
    # [200,210] after.
    assert mask.tolist() == [False, True, True, True, False]
