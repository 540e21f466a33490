"""A samples-per-insert rate limiter: Reverb's ``SampleToInsertRatio`` in plain Python.

The replay-buffer actor asks this limiter before it accepts a fragment from a rollout actor (an *insert* is one
transition) and before it serves the learner (a *sample* is one learner update, i.e. one batch). Blocking the faster
side keeps the update-to-data ratio at ``samples_per_insert`` however many rollout actors there are.

Bookkeeping, with ``spi = samples_per_insert`` and ``m = min_size_to_sample``:

* ``diff = inserts * spi - samples`` measures how far the learner lags behind the data.
* Inserts are free until ``m`` transitions are in; after that an insert of ``n`` is allowed while
  ``diff + n * spi <= m * spi + error_buffer``.
* Samples wait for ``m`` inserts; after that a sample of ``n`` is allowed while
  ``diff - n >= m * spi - error_buffer``.

So ``samples`` stays within ``error_buffer`` of ``(inserts - m) * spi``: with ``m = learning_starts`` the learner
starts after ``learning_starts`` steps and then tracks ``(steps - learning_starts) * ratio``, as in CleanRL.

Deadlock. Write ``D = diff - m * spi`` and let ``c`` be the largest insert and ``k`` the largest sample the callers
use. Once ``m`` inserts are in, nobody can move when ``D + c * spi > error_buffer`` and ``D - k < -error_buffer``;
some ``D`` satisfies both unless ``2 * error_buffer >= c * spi + k``. Before ``m`` inserts the learner cannot sample,
so an insert that crosses ``m`` must be allowed: one of ``c`` items starting at ``m - 1`` ends ``c - 1`` past ``m``,
which needs ``(c - 1) * spi <= error_buffer``. :meth:`SampleToInsertRatio.min_error_buffer` is the larger of the two.
"""

from __future__ import annotations

import math

# Slack for float comparisons, so that counts exactly on a boundary are not lost to rounding.
_EPS = 1e-9


class SampleToInsertRatio:
    """Counts inserts and samples and says whether one more insert or sample keeps the ratio.

    ``insert`` and ``sample`` only record; callers ask ``can_insert`` / ``can_sample`` (or the allowances) first.

    Attributes:
        samples_per_insert: target learner updates per inserted transition.
        min_size_to_sample: inserts needed before the first sample.
        error_buffer: how far ``samples`` may drift from ``(inserts - min_size_to_sample) * samples_per_insert``.
        inserts: transitions inserted so far.
        samples: updates sampled so far.
    """

    def __init__(self, samples_per_insert: float, min_size_to_sample: int, error_buffer: float) -> None:
        if not samples_per_insert > 0:
            raise ValueError(f"samples_per_insert must be positive, got {samples_per_insert}")
        if min_size_to_sample < 0:
            raise ValueError(f"min_size_to_sample must be >= 0, got {min_size_to_sample}")
        if not error_buffer >= 0:
            raise ValueError(f"error_buffer must be >= 0, got {error_buffer}")
        self.samples_per_insert = float(samples_per_insert)
        self.min_size_to_sample = int(min_size_to_sample)
        self.error_buffer = float(error_buffer)
        self.inserts = 0
        self.samples = 0

    @property
    def diff(self) -> float:
        """``inserts * samples_per_insert - samples``: how many updates the learner is owed."""
        return self.inserts * self.samples_per_insert - self.samples

    @property
    def _max_diff(self) -> float:
        return self.min_size_to_sample * self.samples_per_insert + self.error_buffer

    @property
    def _min_diff(self) -> float:
        return self.min_size_to_sample * self.samples_per_insert - self.error_buffer

    def can_insert(self, n: int) -> bool:
        """Whether inserting ``n`` transitions now keeps the learner within ``error_buffer`` of the ratio."""
        if self.inserts + n <= self.min_size_to_sample:
            return True
        return self.diff + n * self.samples_per_insert <= self._max_diff + _EPS

    def can_sample(self, n: int) -> bool:
        """Whether ``n`` more updates now keep the learner within ``error_buffer`` of the ratio."""
        if self.inserts < self.min_size_to_sample:
            return False
        return self.diff - n >= self._min_diff - _EPS

    def insert(self, n: int) -> None:
        """Records ``n`` inserted transitions."""
        self.inserts += n

    def sample(self, n: int) -> None:
        """Records ``n`` sampled updates."""
        self.samples += n

    def insert_allowance(self) -> int:
        """The largest ``n`` with ``can_insert(n)``; 0 when none."""
        free = self.min_size_to_sample - self.inserts
        by_ratio = math.floor((self._max_diff - self.diff + _EPS) / self.samples_per_insert)
        return max(free, by_ratio, 0)

    def sample_allowance(self) -> int:
        """The largest ``n`` with ``can_sample(n)``; 0 when none."""
        if self.inserts < self.min_size_to_sample:
            return 0
        return max(math.floor(self.diff - self._min_diff + _EPS), 0)

    @staticmethod
    def min_error_buffer(samples_per_insert: float, min_size_to_sample: int, insert_chunk: int,
                         sample_chunk: int) -> float:
        """The smallest ``error_buffer`` that cannot deadlock with inserts of at most ``insert_chunk`` and samples
        of at most ``sample_chunk`` (the module docstring derives it)."""
        steady = (insert_chunk * samples_per_insert + sample_chunk) / 2
        crossing = (insert_chunk - 1) * samples_per_insert if min_size_to_sample > 0 else 0.0
        return max(steady, crossing)

    def check_chunks(self, insert_chunk: int, sample_chunk: int) -> None:
        """Raises ValueError when inserts of ``insert_chunk`` and samples of ``sample_chunk`` could deadlock."""
        needed = self.min_error_buffer(self.samples_per_insert, self.min_size_to_sample, insert_chunk, sample_chunk)
        if self.error_buffer < needed - _EPS:
            raise ValueError(
                f"replay.ratio_tolerance={self.error_buffer:g} is too small for fragments of {insert_chunk} "
                f"transitions at {self.samples_per_insert:g} updates per step and learner requests of "
                f"{sample_chunk} updates; use at least {needed:g}")

    def state_dict(self) -> dict[str, int]:
        """The counters, for a checkpoint."""
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores the counters saved by :meth:`state_dict`."""
        self.inserts = int(state["inserts"])
        self.samples = int(state["samples"])
