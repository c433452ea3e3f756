"""How long a batch takes, learnt online: the batcher's basis for shedding load early.

A batch of n items costs roughly `overhead + n * per_item` (a session run has a fixed cost,
each item adds its share). `ServiceTime` keeps exponentially weighted moments of (n, seconds)
over the batches run so far and fits that line, so the estimate follows the model's real speed
on this machine (and its drift: text lengths, other load) without any configuration. The
batcher turns it into the expected wait of a newly queued item (`expected_wait_s`) and rejects
a call at once when that wait exceeds the caller's remaining time.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest batch: about the last 1/ALPHA batches count, so the estimate follows a
# change in load within a second or two yet one odd batch moves it little.
ALPHA = 0.1
_MIN_VARIANCE = 0.25  # batch sizes this close together cannot separate overhead from per item


@dataclass
class ServiceTime:
    """An online fit of batch run time against batch size (not thread-safe: one owner)."""

    alpha: float = ALPHA
    _weight: float = 0.0
    _n: float = 0.0
    _t: float = 0.0
    _nn: float = 0.0
    _nt: float = 0.0

    def observe(self, size: int, seconds: float) -> None:
        """Record one finished batch of `size` items that took `seconds`."""
        keep = 1.0 - self.alpha
        self._weight = keep * self._weight + self.alpha
        self._n = keep * self._n + self.alpha * size
        self._t = keep * self._t + self.alpha * seconds
        self._nn = keep * self._nn + self.alpha * size * size
        self._nt = keep * self._nt + self.alpha * size * seconds

    @property
    def known(self) -> bool:
        """Whether any batch has been observed (before that nothing is estimated)."""
        return self._weight > 0.0

    def batch_s(self, size: int) -> float:
        """Expected seconds to run a batch of `size` items (0.0 before any observation)."""
        if not self.known or size <= 0:
            return 0.0
        w = self._weight
        mean_n, mean_t = self._n / w, self._t / w
        variance = self._nn / w - mean_n * mean_n
        if variance < _MIN_VARIANCE:  # one batch size seen: all of its time is per item
            return mean_t * size / max(mean_n, 1.0)
        slope = max((self._nt / w - mean_n * mean_t) / variance, 0.0)
        overhead = max(mean_t - slope * mean_n, 0.0)
        return overhead + slope * size


def expected_wait_s(
    estimate: ServiceTime,
    queued: int,
    max_batch_size: int,
    running_left_s: float,
    window_left_s: float,
) -> float:
    """Seconds until an item queued behind `queued` others has its result.

    The queue ahead runs as full batches. The item's own batch is costed as full too when it
    cannot start at once (a batch is running, or full batches are ahead): items arriving
    meanwhile join it, and under overload they always do. Costing it at its size now made
    admission optimistic by nearly a whole batch (~1 s for 32 long texts on MiniLM).

    Args:
        estimate: the batcher's service time fit.
        queued: items ahead of the new one in the queue.
        max_batch_size: items per batch.
        running_left_s: what remains of the batch running now (0 when idle).
        window_left_s: what remains of the batching window the new item would wait for.
    """
    full_batches, rest = divmod(queued, max_batch_size)
    ahead = full_batches * estimate.batch_s(max_batch_size)
    waits = running_left_s > 0.0 or full_batches > 0
    own = estimate.batch_s(max_batch_size if waits else rest + 1)
    return max(running_left_s, window_left_s) + ahead + own


def expected_wait_bound_s(
    full_batch_s: float, queued: int, max_batch_size: int, running_left_s: float, window_s: float
) -> float:
    """An upper bound of `expected_wait_s` in a few float operations, for the admission check
    every call makes: the batches ahead and its own costed full (`batch_s` grows with the
    size), the whole window (what remains of one is never more).

    Args:
        full_batch_s: `estimate.batch_s(max_batch_size)`.
        queued, max_batch_size, running_left_s: as for `expected_wait_s`.
        window_s: the batching window (`max_queue_delay`).
    """
    return max(running_left_s, window_s) + (queued // max_batch_size + 1) * full_batch_s
