"""RadixCache on its own: prefix matching with edge splits, duplicate inserts, locks that
block eviction, and LRU order."""
from __future__ import annotations

import torch

from localsgl.engine.kv_pool import KVPool
from localsgl.engine.radix_cache import RadixCache


def _cache(slots=64):
    pool = KVPool(slots, 1, 1, 4, torch.float32, "cpu")
    return pool, RadixCache(pool)


def _put(pool, cache, tokens):
    slots = pool.alloc(len(tokens))
    dup = cache.insert(tokens, slots)
    pool.free(slots[:dup])  # the caller owns the duplicated prefix's slots
    return slots


def test_match_splits_edges_and_returns_slots():
    pool, cache = _cache()
    slots = _put(pool, cache, [1, 2, 3, 4, 5])
    got, node = cache.match_prefix([1, 2, 3, 9])
    assert got.tolist() == slots[:3].tolist()
    assert node.key == (1, 2, 3)  # split at the divergence
    assert cache.match_prefix([7])[0].numel() == 0
    cache.check_invariants()


def test_duplicate_insert_reports_shared_prefix():
    pool, cache = _cache()
    _put(pool, cache, [1, 2, 3, 4])
    slots = pool.alloc(6)
    assert cache.insert([1, 2, 3, 4, 5, 6], slots) == 4
    pool.free(slots[:4])
    assert cache.total_tokens() == 6
    assert pool.num_free + cache.total_tokens() == pool.num_slots
    cache.check_invariants()


def test_locked_prefix_survives_eviction_and_lru_goes_first():
    pool, cache = _cache()
    _put(pool, cache, [1, 2, 3])
    _put(pool, cache, [4, 5, 6])
    _put(pool, cache, [7, 8, 9])
    cache.match_prefix([7, 8, 9])  # touch: most recently used
    _, locked = cache.match_prefix([4, 5, 6])
    cache.lock(locked)
    assert cache.evict(3) == 3  # [1,2,3] is the LRU unlocked leaf
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert cache.evict(100) == 3  # only [7,8,9] is left to evict
    assert cache.match_prefix([4, 5, 6])[0].numel() == 3
    cache.unlock(locked)
    cache.check_invariants()
    cache.reset()
    assert pool.num_free == pool.num_slots


def test_disabled_cache_matches_nothing():
    pool = KVPool(8, 1, 1, 4, torch.float32, "cpu")
    cache = RadixCache(pool, disabled=True)
    assert cache.insert([1, 2], pool.alloc(2)) == 0
    assert cache.match_prefix([1, 2])[0].numel() == 0


def test_req_to_token_host_mirror_tracks_the_table():
    """With a separate host mirror (as on a GPU), every write lands in both and the
    scheduler's reads (slots) come from the mirror and equal the table."""
    from localsgl.engine.kv_pool import ReqToTokenPool

    g = torch.Generator().manual_seed(0)
    pool = ReqToTokenPool(6, 50, "cpu")
    pool.host = pool.table.clone()  # force the mirror path on the CPU
    for _ in range(200):
        if torch.rand((), generator=g) < 0.5:
            row = int(torch.randint(1, 7, (), generator=g))
            start = int(torch.randint(0, 40, (), generator=g))
            n = int(torch.randint(0, 50 - start, (), generator=g))
            pool.write(row, start, torch.randint(0, 10**6, (n,), generator=g))
        else:
            rows = torch.randperm(6, generator=g)[:3].add(1).tolist()
            pos = torch.randint(0, 50, (3,), generator=g).tolist()
            pool.write_many(rows, pos, torch.randint(0, 10**6, (3,), generator=g))
        assert torch.equal(pool.host, pool.table)
    assert pool.slots(3, 5, 20).tolist() == pool.table[3, 5:20].tolist()
    assert pool.slots(3, 5, 20).dtype == torch.int64
