"""The oracle's DP is exact: checked against brute force on small random U tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facestream.training.oracle import Oracle, placement_value, solve_episode


def _brute_force(u: np.ndarray, keys: int) -> float:
    best = -np.inf
    for rest in itertools.combinations(range(1, len(u)), keys - 1):
        best = max(best, placement_value(u, [0, *rest]))
    return best


def _random_table(rng: np.random.Generator, length: int, gaps: int, holes: bool) -> np.ndarray:
    u = rng.random((length, gaps + 1))
    if holes:
        u[rng.random(u.shape) < 0.25] = -np.inf
        u[:, 0] = rng.random(length)  # a key frame is always scored
    return u


@pytest.mark.parametrize("trial", range(40))
def test_episode_dp_matches_brute_force(trial: int) -> None:
    rng = np.random.default_rng(trial)
    u = _random_table(rng, int(rng.integers(1, 10)), int(rng.integers(1, 5)), holes=trial % 2 == 0)
    dp = solve_episode(u)
    for keys in range(1, len(u) + 1):
        expected = _brute_force(u, keys)
        if np.isfinite(expected):
            assert dp.best[keys] == pytest.approx(expected)
            placement = dp.keys(keys)
            assert len(placement) == keys and placement[0] == 0
            assert placement_value(u, placement) == pytest.approx(expected)
        else:
            assert dp.best[keys] == -np.inf


def test_gap_limit_makes_few_keys_infeasible() -> None:
    u = np.ones((10, 3))  # gaps 0..2: a key at least every 3 frames
    dp = solve_episode(u)
    assert not np.isfinite(dp.best[3])  # 3 keys cover at most 9 frames
    assert dp.best[4] == pytest.approx(10.0)


@pytest.mark.parametrize("trial", range(10))
def test_episodes_combine_exactly(trial: int) -> None:
    rng = np.random.default_rng(100 + trial)
    tables = [_random_table(rng, int(rng.integers(1, 6)), 3, holes=False) for _ in range(3)]
    oracle = Oracle(tables)
    for total in range(len(tables), oracle.frames + 1):
        best = -np.inf
        for counts in itertools.product(*(range(1, len(u) + 1) for u in tables)):
            if sum(counts) == total:
                best = max(best, sum(_brute_force(u, n) for u, n in zip(tables, counts, strict=True)))
        if not oracle.feasible(total):
            assert best == -np.inf
            continue
        placement = oracle.placement(total)
        assert placement.total == pytest.approx(best)
        assert sum(len(k) for k in placement.keys) == total
        value = sum(placement_value(u, k) for u, k in zip(tables, placement.keys, strict=True))
        assert value == pytest.approx(best)


def test_infeasible_totals_are_refused() -> None:
    oracle = Oracle([np.ones((3, 2)), np.ones((2, 2))])
    assert not oracle.feasible(1)  # every episode needs its first key
    with pytest.raises(ValueError, match="no placement"):
        oracle.placement(1)
    assert oracle.feasible(5) and not oracle.feasible(6)
