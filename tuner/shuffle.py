"""Many trials' epoch shuffles at once, each exactly ``torch.randperm(n, generator=g)``.

``train()`` shuffles each epoch with ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``.
Fused training at large K (thousands of slots on a GPU) would call that once per trial-epoch on
the host, which bounds the device. torch's CPU ``randperm`` for ``n`` below 2**32 / 20 is a
Fisher-Yates shuffle driven by the generator's 32-bit Mersenne Twister (MT19937) outputs, one
output per position (``z = random() % (n - i)``, swap ``i`` and ``i + z``; n - 1 outputs per
call). ``Streams`` keeps every slot's MT19937 state in numpy arrays and runs the twist and the
shuffle vectorised over slots, so one epoch start of m slots is a few dozen array operations
instead of m torch calls, with the same permutations (``tests/test_fused.py`` holds them equal
to ``torch.randperm``). Splits too long for the per-slot output buffer (``MAX_ROWS``) keep a
torch generator per slot. ``mt_outputs`` gives many seeds' first outputs at once, from which
``model.initial_draws`` takes every new trial's initial weights.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MAX_ROWS", "Streams", "mt_outputs", "mt_seed"]

_N, _M = 624, 397
_MATRIX_A, _UPPER, _LOWER = np.uint32(0x9908B0DF), np.uint32(0x80000000), np.uint32(0x7FFFFFFF)
MAX_ROWS = 4 * _N  # longest split shuffled here (each slot buffers ceil((n - 1) / 624) + 1 blocks)
_VECTOR_FROM = 8  # fewer slots than this at once: a plain loop per slot is cheaper


def mt_seed(seeds: np.ndarray) -> np.ndarray:
    """MT19937's state after ``init_genrand(seed)`` (what ``Generator.manual_seed`` does), per row."""
    if len(seeds) < 32 and _torch_layout_ok():  # a few seeds: torch seeds them faster (in C)
        return np.stack([_torch_state(int(x)) for x in seeds])
    return _init_genrand(seeds)


def mt_outputs(seeds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[r]`` 32-bit outputs of ``torch.Generator().manual_seed(seeds[r])``
    for each row r, as ``(len(seeds), max(counts))`` uint32 (a row's later columns are
    undefined), vectorised over seeds; a row is twisted only for the blocks of 624 it needs."""
    state = mt_seed(np.asarray(seeds))
    blocks = -(-np.asarray(counts, dtype=np.int64) // _N)
    out = np.zeros((len(state), int(blocks.max(initial=0)) * _N), np.uint32)
    for b in range(int(blocks.max(initial=0))):
        rows = np.flatnonzero(blocks > b)
        state[rows] = _twist(state[rows])
        out[rows, b * _N : (b + 1) * _N] = _temper(state[rows])
    return out[:, : int(np.max(counts, initial=0))]


def _torch_state(seed: int) -> np.ndarray:
    """The 624 words of ``torch.Generator().manual_seed(seed)``'s state (a 64-bit seed, two
    32-bit counters and a 64-bit ``next`` come first, then the words as 64-bit integers)."""
    raw = torch.Generator().manual_seed(seed).get_state().numpy().tobytes()
    return np.frombuffer(raw, dtype=np.uint64, count=_N, offset=24).astype(np.uint32)


_LAYOUT_OK: bool | None = None


def _torch_layout_ok() -> bool:
    """Whether torch's generator state still reads as above (checked once against init_genrand)."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        try:
            _LAYOUT_OK = bool((_torch_state(5489) == _init_genrand(np.array([5489]))[0]).all())
        except (ValueError, RuntimeError):
            _LAYOUT_OK = False
    return _LAYOUT_OK


def _init_genrand(seeds: np.ndarray) -> np.ndarray:
    state = np.empty((len(seeds), _N), dtype=np.uint64)
    state[:, 0] = np.asarray(seeds, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    for i in range(1, _N):
        prev = state[:, i - 1]
        state[:, i] = (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(i)) & np.uint64(0xFFFFFFFF)
    return state.astype(np.uint32)


def _twist(mt: np.ndarray) -> np.ndarray:
    """The next 624-word state of each row (the recurrence in four vectorised segments: word i
    reads word i + 397, which from i = 227 on is already the new one)."""
    new = np.empty_like(mt)

    def words(i0: int, i1: int, far: np.ndarray, nxt: np.ndarray) -> None:
        y = (mt[:, i0:i1] & _UPPER) | (nxt & _LOWER)
        new[:, i0:i1] = far ^ (y >> np.uint32(1)) ^ np.where(y & np.uint32(1), _MATRIX_A, np.uint32(0))

    words(0, 227, mt[:, 397:624], mt[:, 1:228])
    words(227, 454, new[:, 0:227], mt[:, 228:455])
    words(454, 623, new[:, 227:396], mt[:, 455:624])
    words(623, 624, new[:, 396:397], new[:, 0:1])
    return new


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    return y ^ (y >> np.uint32(18))


class Streams:
    """Per-slot MT19937 streams with their upcoming outputs; rows follow the bank's slots."""

    def __init__(self, n_rows: int) -> None:
        self.blocks = -(-max(n_rows - 1, 1) // _N) + 1
        self.state = np.zeros((0, _N), np.uint32)
        self.buf = np.zeros((0, self.blocks * _N), np.uint32)  # tempered outputs from ptr on
        self.ptr = np.zeros(0, np.int64)

    def resize(self, K: int, order: list[int]) -> None:
        """K rows, rows ``order`` of the old ones first (the others empty)."""
        state, buf, ptr = np.zeros((K, _N), np.uint32), np.zeros((K, self.buf.shape[1]), np.uint32), np.zeros(K, np.int64)
        k = len(order)
        state[:k], buf[:k], ptr[:k] = self.state[order], self.buf[order], self.ptr[order]
        self.state, self.buf, self.ptr = state, buf, ptr

    def move(self, rows: np.ndarray, sources: np.ndarray) -> None:
        """Row ``rows[i]`` takes the stream of row ``sources[i]`` (as it was before the move)."""
        self.state[rows], self.buf[rows], self.ptr[rows] = self.state[sources], self.buf[sources], self.ptr[sources]

    def seed(self, rows: list[int], seeds: list[int]) -> None:
        """Start rows' streams as ``torch.Generator().manual_seed(seed)``."""
        index = np.asarray(rows)
        self.state[index] = mt_seed(np.asarray(seeds))
        self.ptr[index] = self.buf.shape[1]  # nothing buffered yet
        self._refill(index)

    def _refill(self, index: np.ndarray) -> None:
        """Drop whole consumed blocks of these rows and buffer new ones."""
        while True:
            stale = index[self.ptr[index] >= _N]
            if not len(stale):
                return
            self.buf[stale, :-_N] = self.buf[stale, _N:]
            self.state[stale] = _twist(self.state[stale])
            self.buf[stale, -_N:] = _temper(self.state[stale])
            self.ptr[stale] -= _N

    def permutations(self, rows: list[int], sizes: list[int], width: int) -> np.ndarray:
        """One ``randperm(size)`` per row, ``(len(rows), width)``, each padded with zeros."""
        index, n = np.asarray(rows), np.asarray(sizes, dtype=np.int64)
        steps = int(n.max()) - 1
        take = self.ptr[index][:, None] + np.arange(max(steps, 0))
        raw = self.buf[index[:, None], take].astype(np.int64)
        perm = np.zeros((len(rows), width), np.int64)
        if len(rows) < _VECTOR_FROM:
            for r, (size, out) in enumerate(zip(n.tolist(), raw.tolist())):
                order = list(range(size))
                for i in range(size - 1):
                    j = i + out[i] % (size - i)
                    order[i], order[j] = order[j], order[i]
                perm[r, :size] = order
        else:
            # Position-major (p[i] holds position i of every row's order): each round's reads
            # and writes are contiguous, ~2x faster than row-major at 16,384 slots.
            m = int(n.max())
            p = np.broadcast_to(np.arange(m)[:, None], (m, len(rows))).copy()
            flat = p.reshape(-1)
            cols = np.arange(len(rows))
            raw_t = np.ascontiguousarray(raw.T)
            for i in range(steps):
                j = np.where(i < n - 1, i + raw_t[i] % np.maximum(n - i, 1), i)
                at = j * len(rows) + cols
                held = p[i].copy()
                p[i] = flat[at]
                flat[at] = held
            p[np.arange(m)[:, None] >= n[None, :]] = 0
            perm[:, :m] = p.T
        self.ptr[index] += np.maximum(n - 1, 0)
        self._refill(index)
        return perm
