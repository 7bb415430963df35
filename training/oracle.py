"""The oracle key scheduler: for a number of keys, the placement that maximises total mIoU.

Input per episode: ``u[i, g]`` = the per-frame mIoU of frame ``i`` when its key is ``g`` frames
back (``g = 0``: frame ``i`` is itself a key), ``-inf`` where the pair was not computed (gaps are
limited to ``G = u.shape[1] - 1``). The first frame of an episode is always a key (the paper's
protocol). A placement is a set of key positions; its value is ``sum_i u[i, i - key(i)]``, where
``key(i)`` is the latest key at or before ``i``.

Dynamic programming over segments: a key at ``p`` followed by the next at ``q`` covers frames
``p .. q-1`` with value ``V(p, q) = sum_{t < q-p} u[p+t, t]``; ``D[q, n] = max_p D[p, n-1] + V(p, q)``.
Exact, O(L * G * L) per episode. Episodes are combined by a max-plus convolution over key counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEG = -np.inf


@dataclass(frozen=True)
class EpisodeDP:
    """``best[n]``: the best total for ``n`` keys (-inf when impossible); ``parent[q, n]``: the last
    key of the best placement of ``n`` keys over the first ``q`` frames."""

    best: np.ndarray  # (L + 1,)
    parent: np.ndarray  # (L + 1, L + 1) int

    @property
    def length(self) -> int:
        return len(self.best) - 1

    def keys(self, count: int) -> list[int]:
        """Key positions (episode-relative) of the best placement with ``count`` keys."""
        if not np.isfinite(self.best[count]):
            raise ValueError(f"no placement with {count} keys in an episode of {self.length} frames")
        keys, q, n = [], self.length, count
        while q > 0:
            p = int(self.parent[q, n])
            keys.append(p)
            q, n = p, n - 1
        return keys[::-1]


def segment_values(u: np.ndarray) -> np.ndarray:
    """``V[p, j]`` = value of a key at ``p`` covering ``j`` frames (j = 0 .. G+1); -inf where a pair
    is missing or the segment runs past the episode."""
    length, width = u.shape
    values = np.full((length, width + 1), NEG)
    values[:, 0] = 0.0
    for p in range(length):
        span = min(width, length - p)
        diagonal = u[np.arange(p, p + span), np.arange(span)]
        values[p, 1 : span + 1] = np.cumsum(diagonal)
    return values


def solve_episode(u: np.ndarray) -> EpisodeDP:
    """The exact DP for one episode (see the module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    length, width = u.shape
    if length == 0:
        raise ValueError("an episode needs at least one frame")
    values = segment_values(u)
    best = np.full((length + 1, length + 1), NEG)  # best[q, n]
    parent = np.zeros((length + 1, length + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for q in range(1, length + 1):
        starts = np.arange(max(0, q - width), q)
        seg = values[starts, q - starts]  # (P,)
        candidates = best[starts, :-1] + seg[:, None]  # (P, L): n-1 keys before p, key at p
        choice = np.argmax(candidates, axis=0)
        best[q, 1:] = candidates[choice, np.arange(length)]
        parent[q, 1:] = starts[choice]
    return EpisodeDP(best[length], parent)


@dataclass(frozen=True)
class Placement:
    total: float
    keys: list[list[int]]  # per episode, episode-relative key positions


class Oracle:
    """The best placement over several episodes for every total key count."""

    def __init__(self, tables: Sequence[np.ndarray]) -> None:
        if not tables:
            raise ValueError("the oracle needs at least one episode")
        self.episodes = [solve_episode(u) for u in tables]
        self.best, self._split = self._combine()

    def _combine(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Max-plus convolution of the episodes' ``best`` arrays; ``split[e][n]`` = keys given to
        episode ``e`` when ``n`` keys go to episodes ``0..e``."""
        acc = np.array([0.0])
        splits: list[np.ndarray] = []
        for episode in self.episodes:
            size = len(acc) + episode.length
            new = np.full(size, NEG)
            split = np.zeros(size, dtype=np.int64)
            for m in range(1, episode.length + 1):
                if not np.isfinite(episode.best[m]):
                    continue
                candidate = acc + episode.best[m]
                target = np.arange(m, m + len(acc))
                better = candidate > new[target]
                new[target[better]] = candidate[better]
                split[target[better]] = m
            acc = new
            splits.append(split)
        return acc, splits

    @property
    def frames(self) -> int:
        return sum(e.length for e in self.episodes)

    def feasible(self, keys: int) -> bool:
        return 0 <= keys < len(self.best) and bool(np.isfinite(self.best[keys]))

    def placement(self, keys: int) -> Placement:
        """The best placement with ``keys`` keys in total (every episode gets at least one)."""
        if not self.feasible(keys):
            raise ValueError(f"no placement with {keys} keys over {len(self.episodes)} episodes")
        counts, remaining = [], keys
        for split in reversed(self._split):
            counts.append(int(split[remaining]))
            remaining -= counts[-1]
        counts.reverse()
        return Placement(
            float(self.best[keys]), [e.keys(n) for e, n in zip(self.episodes, counts, strict=True)]
        )


def placement_value(u: np.ndarray, keys: Sequence[int]) -> float:
    """Value of a given key placement in one episode (brute-force reference; -inf if infeasible)."""
    if not keys or keys[0] != 0:
        return NEG
    total, last = 0.0, 0
    key_set = set(keys)
    for i in range(len(u)):
        if i in key_set:
            last = i
        gap = i - last
        if gap >= u.shape[1]:
            return NEG
        total += u[i, gap]
    return total
