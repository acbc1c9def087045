"""Sample orders: seeded RNGs, and the training order of `data.order=permutation` (one global
permutation of all training samples per epoch, any position computable alone)."""

from __future__ import annotations

import hashlib
import random

import numpy as np


def seeded_rng(*parts) -> random.Random:
    """An RNG seeded by a hash of `parts` (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


_ROUNDS = 8


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array: every input bit flips about half the output bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap around silently, as wanted
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, *key) -> np.ndarray:
    """A pseudo-random permutation of [0, n), evaluated at `index` (any int array of values in [0, n)).

    A balanced Feistel network on the smallest even number of bits that holds n - 1 (8 rounds, round
    keys from a hash of `key`), with cycle walking: an output outside [0, n) is permuted again
    until it falls inside, which keeps the map a bijection of [0, n). Pure integer arithmetic: no
    table of n entries is built, any position can be asked alone (what a resumed or re-sized run
    needs), and the order is the same on every machine and every numpy version."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    digest = hashlib.sha256(repr(("permutation", *key)).encode()).digest()
    keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
    keys = np.concatenate([keys, _mix64(keys)])[:_ROUNDS]
    out = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        v = out[todo]
        for k in keys:
            left, right = v >> shift, v & mask
            v = (right << shift) | (left ^ (_mix64(right ^ k) & mask))
        out[todo] = v
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


def epoch_order(positions: np.ndarray, counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Global stream positions -> (shard, index in shard) of the samples there.

    The stream is epoch after epoch; epoch e = position // N is a permutation of all N training
    samples, seeded by (seed, e). It depends on nothing else: not the world size, the number of
    workers or the batch size, which is what lets a run continue on another number of processes."""
    n = sum(counts)
    positions = np.asarray(positions, dtype=np.int64)
    epochs, within = positions // n, positions % n
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        ids[sel] = permute(within[sel], n, seed, int(epoch))
    offsets = np.cumsum([0, *counts])
    shard = np.searchsorted(offsets, ids, side="right") - 1
    return shard, ids - offsets[shard]
