"""Near-duplicate grouping (multi-index hashing) finds exactly the all-pairs groups, and the split's
per-group helpers are vectorised without changing what they return."""

from __future__ import annotations

import numpy as np
import pytest

from cvpipe.preprocess.near_duplicates import block_masks, brute_force_groups, near_duplicate_groups
from cvpipe.preprocess.splits import _unit_labels, groups_report, straddling_groups

N = 50_000


def _flip(rng: np.random.Generator, h: np.ndarray, max_bits: int) -> np.ndarray:
    """*h* with 0..max_bits random bits flipped per hash (possibly the same bit twice: fewer)."""
    out = h.copy()
    for _ in range(max_bits):
        bit = rng.integers(0, 64, len(h)).astype(np.uint64)
        on = rng.random(len(h)) < 0.7
        out[on] ^= np.uint64(1) << bit[on]
    return out


def random_hashes(rng, n):
    return rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) | (rng.integers(0, 2, n).astype(np.uint64) << np.uint64(63))


def planted(rng, n, distance=4):
    """Random hashes, a fifth of them copies of others with up to *distance* (and a few *distance* + 1) bits flipped."""
    h = random_hashes(rng, n)
    k = n // 5
    src = rng.integers(0, n - k, k)
    h[n - k:] = _flip(rng, h[src], distance)
    h[n - 50:] = _flip(rng, h[src[:50]], distance + 1)  # some just beyond: linked only when within
    return h


def adversarial(rng, n):
    """Hashes crowding the same block values: block 0 takes 3 values, a third have at most 3 bits set
    (so most blocks are all-zero for them), and dense clusters of 2,000 hashes within 3 bits of a centre."""
    h = random_hashes(rng, n)
    shift, mask = block_masks(4)[0]
    h &= ~np.uint64(mask << shift)
    h |= rng.integers(0, 3, n).astype(np.uint64) << np.uint64(shift)
    third = n // 3
    sparse = np.zeros(third, dtype=np.uint64)
    for _ in range(3):
        sparse |= np.uint64(1) << rng.integers(0, 64, third).astype(np.uint64)
    h[:third] = sparse
    centres = random_hashes(rng, 5)
    for i, c in enumerate(centres):
        at = slice(third + i * 2000, third + (i + 1) * 2000)
        h[at] = _flip(rng, np.full(2000, c, dtype=np.uint64), 3)
    return rng.permutation(h)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "planted", "adversarial"])
def test_groups_equal_the_brute_force_on_50k_hashes(kind):
    rng = np.random.default_rng({"random": 1, "planted": 2, "adversarial": 3}[kind])
    h = {"random": random_hashes, "planted": planted, "adversarial": adversarial}[kind](rng, N)
    ref = brute_force_groups(h, 4, block=256)
    # a small link buffer forces the spanning-forest compaction many times on the dense clusters
    got = near_duplicate_groups(h, 4, max_links=20_000)
    np.testing.assert_array_equal(got, ref)  # same ids too: both are numbered by first member
    sizes = np.bincount(ref)
    if kind == "planted":
        assert (sizes > 1).sum() > 1000, "the planted groups are there"
    if kind == "adversarial":
        assert sorted(sizes)[-6:-1] == [2000] * 5 and sizes.max() > 10_000, "the five clusters and the sparse crowd"


@pytest.mark.parametrize("d", [0, 1, 2, 3, 4, 5, 6, 7, 12])
def test_every_distance_matches_the_brute_force(d):
    rng = np.random.default_rng(d)
    h = planted(rng, 3000, distance=d)
    h[:200] = h[200:400]  # exact copies
    np.testing.assert_array_equal(near_duplicate_groups(h, d), brute_force_groups(h, d))


def test_blocks_cover_the_64_bits_once():
    for d in range(0, 12):
        masks = block_masks(d)
        assert len(masks) == d + 1
        covered = 0
        for shift, mask in masks:
            bits = mask << shift
            assert covered & bits == 0
            covered |= bits
        assert covered == 2**64 - 1


def test_no_grouping_and_empty_input():
    h = np.array([1, 1, 2], dtype=np.uint64)
    assert near_duplicate_groups(h, None).tolist() == [0, 1, 2]
    assert near_duplicate_groups(h[:0], 4).tolist() == []
    assert near_duplicate_groups(h, 0).tolist() == [0, 0, 1]


# ---- the split's per-group helpers against the loops they replaced -------------------------------


def _unit_labels_loop(idx, labels, groups):
    units, inverse = np.unique(groups[idx], return_inverse=True)
    out = np.zeros(len(units), dtype=np.int64)
    for u in range(len(units)):
        out[u] = np.bincount(labels[idx][inverse == u]).argmax()
    return units, out


def _straddling_loop(groups, splits):
    where: dict[int, set[str]] = {}
    for name, idx in splits.items():
        for g in groups[idx].tolist():
            where.setdefault(g, set()).add(name)
    return sorted(g for g, s in where.items() if len(s) > 1)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_helpers_equal_the_loops(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    labels = rng.integers(0, 1 + seed * 2, n)
    groups = rng.integers(0, n // (1 + seed), n)  # many ties in small groups
    idx = np.sort(rng.choice(n, n // 2, replace=False))
    u1, l1 = _unit_labels(idx, labels, groups)
    u2, l2 = _unit_labels_loop(idx, labels, groups)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(l1, l2)
    perm = rng.permutation(n)
    splits = {"train": perm[: n // 2], "val": perm[n // 2: 3 * n // 4], "test": perm[3 * n // 4:]}
    assert straddling_groups(groups, splits) == _straddling_loop(groups, splits)
    ids = [f"img{i}" for i in range(n)]
    report = groups_report(groups, ids, labels, [f"c{c}" for c in range(labels.max() + 1)])
    assert sum(len(g["ids"]) for g in report) == int((np.bincount(groups)[groups] > 1).sum())
    assert all(len(g["ids"]) > 1 for g in report)
