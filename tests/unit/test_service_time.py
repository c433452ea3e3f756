"""The learnt batch time and the expected wait the batcher sheds load by (no batcher here:
test_batcher.py runs the shedding itself against a fake model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertrec.server.service_time import ServiceTime, expected_wait_bound_s, expected_wait_s


def test_service_time_fits_a_fixed_cost_per_batch_plus_a_cost_per_item() -> None:
    estimate = ServiceTime()
    assert not estimate.known and estimate.batch_s(8) == 0.0
    for size in (1, 8, 4, 2, 8, 1) * 20:
        estimate.observe(size, 0.010 + 0.002 * size)
    assert estimate.batch_s(4) == pytest.approx(0.018, rel=1e-6)
    assert estimate.batch_s(32) == pytest.approx(0.074, rel=1e-6)


def test_service_time_with_one_batch_size_charges_it_all_per_item() -> None:
    estimate = ServiceTime()
    for _ in range(5):
        estimate.observe(4, 0.04)
    assert estimate.batch_s(4) == pytest.approx(0.04)
    assert estimate.batch_s(2) == pytest.approx(0.02)


def test_expected_wait_counts_the_running_batch_full_batches_ahead_and_its_own() -> None:
    estimate = ServiceTime()
    estimate.observe(4, 0.04)  # 10 ms per item
    # 9 queued at 4 per batch: two full batches ahead, then its own, which fills meanwhile.
    assert expected_wait_s(estimate, 9, 4, 0.015, 0.0) == pytest.approx(0.015 + 0.08 + 0.04)
    # Idle: the window, then a batch of what is queued now and the new item.
    assert expected_wait_s(estimate, 0, 4, 0.0, 0.002) == pytest.approx(0.002 + 0.01)
    assert expected_wait_s(estimate, 2, 4, 0.0, 0.001) == pytest.approx(0.001 + 0.03)
    # Busy with nothing queued: the running batch, then a full one.
    assert expected_wait_s(estimate, 0, 4, 0.02, 0.002) == pytest.approx(0.02 + 0.04)


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(st.tuples(st.integers(1, 64), st.floats(1e-5, 2.0)), min_size=1, max_size=20),
    queued=st.integers(0, 2000),
    max_batch_size=st.integers(1, 64),
    running_left_s=st.floats(-1.0, 3.0),
    window_fraction=st.floats(0.0, 1.0),
    window_s=st.floats(0.0, 0.05),
)
def test_the_admission_bound_is_never_below_the_expected_wait(
    batches: list[tuple[int, float]],
    queued: int,
    max_batch_size: int,
    running_left_s: float,
    window_fraction: float,
    window_s: float,
) -> None:
    """Admission skips the full estimate when the bound fits: it must never admit a call the
    estimate would refuse."""
    estimate = ServiceTime()
    for size, seconds in batches:
        estimate.observe(size, seconds)
    full_s = estimate.batch_s(max_batch_size)
    exact = expected_wait_s(
        estimate, queued, max_batch_size, max(running_left_s, 0.0), window_s * window_fraction
    )
    bound = expected_wait_bound_s(full_s, queued, max_batch_size, running_left_s, window_s)
    assert bound >= exact - 1e-12
