"""Tests for the samples-per-insert rate limiter: hand-computed allowances, simulated producers and a learner,
the deadlock bound, and checkpoint round trips."""

from __future__ import annotations

import json
import random

import pytest

from softflow.actors.rate_limiter import SampleToInsertRatio


def greedy_alternating(limiter: SampleToInsertRatio, insert_chunk: int, sample_chunk: int, rounds: int) -> bool:
    """One producer of fixed chunks and one learner take turns, each moving whenever it may.

    Returns True when a round passes in which neither can move (a deadlock)."""
    for _ in range(rounds):
        moved = False
        if limiter.can_insert(insert_chunk):
            limiter.insert(insert_chunk)
            moved = True
        if limiter.can_sample(sample_chunk):
            limiter.sample(sample_chunk)
            moved = True
        if not moved:
            return True
    return False


def reachable_stuck_state(limiter: SampleToInsertRatio, insert_chunk: int, sample_chunk: int) -> bool:
    """Whether some state reachable with inserts of 1..insert_chunk and samples of 1..sample_chunk blocks both an
    insert of ``insert_chunk`` and a sample of ``sample_chunk``.

    Before ``min_size_to_sample`` inserts a state is its insert count; after it, only ``diff`` matters, so the search
    is finite."""
    m = limiter.min_size_to_sample

    def key(inserts: int, samples: int) -> tuple[str, float]:
        if inserts < m:
            return ("before", inserts)
        return ("after", round(inserts * limiter.samples_per_insert - samples, 9))

    frontier, seen = [(0, 0)], {key(0, 0)}
    while frontier:
        inserts, samples = frontier.pop()
        limiter.load_state_dict({"inserts": inserts, "samples": samples})
        if not limiter.can_insert(insert_chunk) and not limiter.can_sample(sample_chunk):
            return True
        moves = [(inserts + n, samples) for n in range(1, insert_chunk + 1) if limiter.can_insert(n)]
        moves += [(inserts, samples + n) for n in range(1, sample_chunk + 1) if limiter.can_sample(n)]
        for state in moves:
            if key(*state) not in seen:
                seen.add(key(*state))
                frontier.append(state)
    return False


def test_allowances_match_hand_computed_numbers() -> None:
    limiter = SampleToInsertRatio(samples_per_insert=0.5, min_size_to_sample=10, error_buffer=3.0)
    # Empty: inserts are free up to 10, and up to diff + 0.5 n <= 0.5 * 10 + 3 = 8, i.e. n = 16.
    assert (limiter.insert_allowance(), limiter.sample_allowance()) == (16, 0)
    assert limiter.can_insert(16) and not limiter.can_insert(17)
    assert not limiter.can_sample(1)

    limiter.insert(9)  # one short of min_size: still no samples
    assert limiter.sample_allowance() == 0
    limiter.insert(1)  # diff = 5: samples + n <= (10 - 10) * 0.5 + 3 gives 3; inserts (8 - 5) / 0.5 = 6
    assert (limiter.insert_allowance(), limiter.sample_allowance()) == (6, 3)
    assert limiter.can_sample(3) and not limiter.can_sample(4)

    limiter.sample(3)  # diff = 2: inserts (8 - 2) / 0.5 = 12
    assert (limiter.insert_allowance(), limiter.sample_allowance()) == (12, 0)

    limiter.insert(12)  # 22 inserts: samples + n <= (22 - 10) * 0.5 + 3 = 9, so 6 more
    assert (limiter.insert_allowance(), limiter.sample_allowance()) == (0, 6)
    assert limiter.diff == pytest.approx(8.0)


def test_allowances_with_several_samples_per_insert() -> None:
    limiter = SampleToInsertRatio(samples_per_insert=4.0, min_size_to_sample=2, error_buffer=6.0)
    # 4 n <= 4 * 2 + 6 = 14 gives n = 3 (more than the 2 free inserts).
    assert limiter.insert_allowance() == 3
    limiter.insert(3)  # samples + n <= (3 - 2) * 4 + 6 = 10
    assert limiter.sample_allowance() == 10
    limiter.sample(10)  # diff = 2: 2 + 4 n <= 14 gives n = 3
    assert (limiter.insert_allowance(), limiter.sample_allowance()) == (3, 0)


def simulate(num_producers: int, limiter: SampleToInsertRatio, max_insert_chunk: int, sample_chunk: int,
             total_inserts: int, seed: int) -> list[tuple[int, int]]:
    """Producers with random chunk sizes and a greedy learner, moving in a random order each round.

    Returns (inserts, samples) after every move; fails the test on a deadlock."""
    rng = random.Random(seed)
    pending = [rng.randint(1, max_insert_chunk) for _ in range(num_producers)]
    history = []
    while limiter.inserts < total_inserts:
        moved = False
        for who in rng.sample(range(num_producers + 1), num_producers + 1):
            if who == num_producers:
                if limiter.can_sample(sample_chunk):
                    limiter.sample(sample_chunk)
                    moved = True
            elif limiter.can_insert(pending[who]):
                limiter.insert(pending[who])
                pending[who] = rng.randint(1, max_insert_chunk)
                moved = True
            history.append((limiter.inserts, limiter.samples))
        assert moved, f"deadlock at inserts={limiter.inserts}, samples={limiter.samples}"
    return history


@pytest.mark.parametrize("num_producers", [1, 3])
@pytest.mark.parametrize("spi, min_size, max_insert_chunk, sample_chunk",
                         [(0.25, 100, 16, 2), (1.0, 50, 8, 4), (3.0, 7, 5, 1)])
def test_ratio_is_kept_within_error_buffer_at_every_point(num_producers: int, spi: float, min_size: int,
                                                          max_insert_chunk: int, sample_chunk: int) -> None:
    error_buffer = SampleToInsertRatio.min_error_buffer(spi, min_size, max_insert_chunk, sample_chunk)
    limiter = SampleToInsertRatio(spi, min_size, error_buffer)
    history = simulate(num_producers, limiter, max_insert_chunk, sample_chunk, total_inserts=5000, seed=num_producers)

    for inserts, samples in history:
        if inserts < min_size:
            assert samples == 0
        elif inserts == min_size:
            assert samples <= error_buffer
        else:
            ratio = samples / (inserts - min_size)
            assert abs(ratio - spi) <= error_buffer / (inserts - min_size) + 1e-12
    inserts, samples = history[-1]
    assert inserts >= 5000
    assert samples >= (inserts - min_size) * spi - error_buffer  # the learner really did its updates


def test_min_error_buffer_formula() -> None:
    # Steady state: (c * spi + k) / 2; crossing min_size: (c - 1) * spi; none of the latter with min_size 0.
    assert SampleToInsertRatio.min_error_buffer(1.0, 0, 3, 1) == pytest.approx(2.0)
    assert SampleToInsertRatio.min_error_buffer(1.0, 5, 4, 1) == pytest.approx(3.0)
    assert SampleToInsertRatio.min_error_buffer(1.0, 0, 4, 1) == pytest.approx(2.5)
    assert SampleToInsertRatio.min_error_buffer(0.25, 1000, 64, 8) == pytest.approx(15.75)


@pytest.mark.parametrize("spi, min_size, insert_chunk, sample_chunk", [
    (1.0, 0, 3, 1),    # steady state: bound 2, stuck at diff = -1
    (0.25, 0, 8, 2),   # steady state: bound 2, stuck at once (diff = 0)
    (1.0, 5, 4, 1),    # crossing min_size: bound 3, stuck at 4 inserts (8 would overshoot 5 by 3)
])
def test_greedy_alternation_deadlocks_just_below_the_bound(spi: float, min_size: int, insert_chunk: int,
                                                           sample_chunk: int) -> None:
    bound = SampleToInsertRatio.min_error_buffer(spi, min_size, insert_chunk, sample_chunk)
    at_bound = SampleToInsertRatio(spi, min_size, bound)
    at_bound.check_chunks(insert_chunk, sample_chunk)
    assert not greedy_alternating(at_bound, insert_chunk, sample_chunk, rounds=1000)
    lag = (at_bound.inserts - min_size) * spi - at_bound.samples
    assert at_bound.inserts > min_size and abs(lag) <= bound + 1e-9

    below = SampleToInsertRatio(spi, min_size, bound - 0.01)
    with pytest.raises(ValueError, match="use at least"):
        below.check_chunks(insert_chunk, sample_chunk)
    assert greedy_alternating(below, insert_chunk, sample_chunk, rounds=1000)


def test_crossing_deadlock_happens_before_min_size() -> None:
    limiter = SampleToInsertRatio(1.0, 5, 2.99)
    assert greedy_alternating(limiter, 4, 1, rounds=10)
    assert (limiter.inserts, limiter.samples) == (4, 0)


@pytest.mark.parametrize("spi", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("min_size", [0, 3])
def test_no_reachable_deadlock_at_the_bound(spi: float, min_size: int) -> None:
    for insert_chunk in range(1, 5):
        for sample_chunk in range(1, 4):
            bound = SampleToInsertRatio.min_error_buffer(spi, min_size, insert_chunk, sample_chunk)
            limiter = SampleToInsertRatio(spi, min_size, bound)
            assert not reachable_stuck_state(limiter, insert_chunk, sample_chunk), (insert_chunk, sample_chunk)


def test_reachable_deadlock_just_below_the_bound() -> None:
    # With spi = 1, diff is an integer; the stuck interval just below the bound is centred on (k - c) / 2,
    # an integer when c + k is even.
    for insert_chunk in range(1, 6):
        for sample_chunk in range(1, 5):
            if (insert_chunk + sample_chunk) % 2:
                continue
            bound = SampleToInsertRatio.min_error_buffer(1.0, 0, insert_chunk, sample_chunk)
            limiter = SampleToInsertRatio(1.0, 0, bound - 0.01)
            assert reachable_stuck_state(limiter, insert_chunk, sample_chunk), (insert_chunk, sample_chunk)


def test_check_chunks_message_is_one_line() -> None:
    limiter = SampleToInsertRatio(samples_per_insert=0.5, min_size_to_sample=0, error_buffer=1.0)
    with pytest.raises(ValueError) as error:
        limiter.check_chunks(insert_chunk=8, sample_chunk=2)
    assert str(error.value) == ("replay.ratio_tolerance=1 is too small for fragments of 8 transitions at 0.5 updates "
                                "per step and learner requests of 2 updates; use at least 3")


@pytest.mark.parametrize("kwargs", [
    {"samples_per_insert": 0.0, "min_size_to_sample": 0, "error_buffer": 1.0},
    {"samples_per_insert": 1.0, "min_size_to_sample": -1, "error_buffer": 1.0},
    {"samples_per_insert": 1.0, "min_size_to_sample": 0, "error_buffer": -0.5},
])
def test_invalid_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SampleToInsertRatio(**kwargs)


def test_state_dict_round_trip() -> None:
    limiter = SampleToInsertRatio(samples_per_insert=0.5, min_size_to_sample=10, error_buffer=3.0)
    limiter.insert(22)
    limiter.sample(3)
    state = json.loads(json.dumps(limiter.state_dict()))
    assert state == {"inserts": 22, "samples": 3}

    restored = SampleToInsertRatio(samples_per_insert=0.5, min_size_to_sample=10, error_buffer=3.0)
    restored.load_state_dict(state)
    assert (restored.inserts, restored.samples) == (22, 3)
    assert (restored.insert_allowance(), restored.sample_allowance()) == (0, 6)
