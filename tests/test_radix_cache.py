"""RadixCache on its own: prefix matching with edge splits, duplicate inserts, locks that
block eviction, LRU order, random operations against a brute-force model, and the cost of
caching a long prompt chunk by chunk."""
from __future__ import annotations

import random

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


# -- against a brute-force model ---------------------------------------------------------------


class BruteCache:
    """Every cached prefix (a tuple) with the slot of its last token, the prefixes where a
    tree node ends, each node's last access, and locks held per node end.  A node end is
    locked while any locked end extends it; a leaf is an end no cached prefix extends."""

    def __init__(self):
        self.slot: dict[tuple, int] = {}
        self.ends: set[tuple] = set()
        self.access: dict[tuple, int] = {}
        self.locks: dict[tuple, int] = {}
        self.t = 0

    def _parent_end(self, e):
        return max((p for p in self.ends if len(p) < len(e) and e[: len(p)] == p), key=len, default=())

    def _cached_len(self, tokens):
        k = 0
        while k < len(tokens) and tokens[: k + 1] in self.slot:
            k += 1
        return k

    def _mark_end(self, prefix):
        """A node ends here (an edge split): the upper part takes the access of the node it splits."""
        if prefix and prefix not in self.ends:
            below = min((e for e in self.ends if e[: len(prefix)] == prefix), key=len)
            self.access[prefix] = self.access[below]
            self.ends.add(prefix)

    def _touch(self, tokens, lo, hi):
        for e in self.ends:
            if lo < len(e) <= hi and tokens[: len(e)] == e:
                self.access[e] = self.t

    def match(self, tokens):
        self.t += 1
        k = self._cached_len(tokens)
        self._mark_end(tokens[:k])
        self._touch(tokens, 0, k)
        return [self.slot[tokens[: i + 1]] for i in range(k)], tokens[:k]

    def insert_from(self, start, tokens, slots):
        self.t += 1
        full = start + tokens
        p = self._cached_len(full)
        self._mark_end(full[:p])
        self._touch(full, len(start), p)
        if p < len(full):
            for i in range(p, len(full)):
                self.slot[full[: i + 1]] = slots[i - len(start)]
            self.ends.add(full)
            self.access[full] = self.t
        return p - len(start), full

    def locked(self, e):
        return any(n > 0 and len(l) >= len(e) and l[: len(e)] == e for l, n in self.locks.items())

    def evictable_leaves(self):
        return [e for e in self.ends if not self.locked(e) and not any(e + (t,) in self.slot for t in range(TOKENS))]

    def evict(self, num):
        freed, slots = 0, []
        while freed < num:
            leaves = self.evictable_leaves()
            if not leaves:
                break
            e = min(leaves, key=lambda x: self.access[x])
            for i in range(len(self._parent_end(e)), len(e)):
                slots.append(self.slot.pop(e[: i + 1]))
            freed += len(e) - len(self._parent_end(e))
            self.ends.remove(e)
        return freed, slots


TOKENS = 4  # a small alphabet: many shared prefixes and splits


def _tree_ends(cache):
    ends, stack = {}, [((), cache.root)]
    while stack:
        path, n = stack.pop()
        for c in n.children.values():
            p = path + c.key
            ends[p] = c
            stack.append((p, c))
    return ends


def _path(node):
    parts = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return tuple(t for k in reversed(parts) for t in k)


def test_random_operations_match_a_brute_force_model():
    """Matches, inserts (from the root and from a request's node), locks that move down as a
    request grows, unlocks and evictions: same slots, same tree, same locks, LRU evictions."""
    rng = random.Random(7)
    pool, cache = _cache(slots=120)
    model = BruteCache()
    active = []  # (real node, model end) of requests holding a lock

    for step in range(1500):
        u = rng.random()
        tokens = tuple(rng.randrange(TOKENS) for _ in range(rng.randrange(1, 12)))
        if u < 0.1 and model.ends:  # a lookup of a cached sequence (e.g. sorting the queue): touch, no lock
            tokens = rng.choice(sorted(model.ends))
            got, node = cache.match_prefix(list(tokens))
            ref, end = model.match(tokens)
            assert got.tolist() == ref and _path(node) == end
        elif u < 0.25:  # a request arrives: match, lock
            got, node = cache.match_prefix(list(tokens))
            ref, end = model.match(tokens)
            assert got.tolist() == ref and _path(node) == end
            cache.lock(node)
            model.locks[end] = model.locks.get(end, 0) + 1
            active.append((node, end))
        elif u < 0.45 and active:  # a request grows by a chunk: insert from its node, move its lock
            i = rng.randrange(len(active))
            node, end = active[i]
            slots = _alloc_with_model(pool, cache, model, len(tokens))
            if slots is None:
                continue
            dup, deeper, tree_slots = cache.insert_from(node, list(tokens), slots)
            ref_dup, ref_end = model.insert_from(end, tokens, slots.tolist())
            assert dup == ref_dup and _path(deeper) == ref_end
            assert tree_slots.tolist() == [model.slot[ref_end[: j + 1]] for j in range(len(end), len(ref_end))]
            pool.free(slots[:dup])
            cache.lock_below(node, deeper)
            model.locks[end] -= 1
            model.locks[ref_end] = model.locks.get(ref_end, 0) + 1
            active[i] = (deeper, ref_end)
        elif u < 0.6:  # a plain insert of a finished request's tokens
            slots = _alloc_with_model(pool, cache, model, len(tokens))
            if slots is None:
                continue
            dup = cache.insert(list(tokens), slots)
            assert dup == model.insert_from((), tokens, slots.tolist())[0]
            pool.free(slots[:dup])
        elif u < 0.8 and active:  # a request finishes
            node, end = active.pop(rng.randrange(len(active)))
            cache.unlock(node)
            model.locks[end] -= 1
        else:
            n = rng.randrange(1, 30)
            freed = cache.evict(n)
            ref_freed, ref_slots = model.evict(n)
            assert freed == ref_freed
        cache.check_invariants()
        ends = _tree_ends(cache)
        assert set(ends) == model.ends, step
        for e, node in ends.items():
            assert (node.lock_ref > 0) == model.locked(e), (step, e)
            assert node.value.tolist() == [model.slot[e[: j + 1]] for j in range(len(e) - len(node.key), len(e))]
        assert pool.num_free + len(model.slot) == pool.num_slots  # every slot: free or in the tree
    for node, _ in active:
        cache.unlock(node)
    cache.reset()
    assert pool.num_free == pool.num_slots


def _alloc_with_model(pool, cache, model, n):
    """Allocate n slots, evicting (in the cache and the model alike) when the pool is short."""
    if pool.num_free < n:
        need = n - pool.num_free
        freed = cache.evict(need)
        assert freed == model.evict(need)[0]
    return pool.alloc(n)


def test_common_len_long_and_short_keys():
    from localsgl.engine.radix_cache import _common_len

    rng = random.Random(1)
    for _ in range(400):
        n = rng.choice([1, 3, 16, 17, 40, 1000])
        a = tuple(rng.randrange(3) for _ in range(n))
        start = rng.randrange(0, 5)
        cut = rng.randrange(0, n + 1)
        b = tuple(rng.randrange(3) for _ in range(start)) + a[:cut] + tuple(rng.randrange(3) for _ in range(rng.randrange(0, 50)))
        ref = 0
        while ref < min(len(a), len(b) - start) and a[ref] == b[start + ref]:
            ref += 1
        assert _common_len(a, b, start) == ref


# -- cost of caching a long prompt chunk by chunk --------------------------------------------


def test_cache_progress_work_grows_with_the_chunk_not_the_prompt(monkeypatch):
    """A long prompt prefilled in chunks: the radix-cache work of each chunk's cache_progress
    (tokens compared or copied, nodes walked by locks) stays O(chunk), so the whole prompt costs
    O(prompt) — re-matching the prefix after every chunk would cost O(prompt² / chunk)."""
    import localsgl.engine.radix_cache as rc
    from localsgl.engine.kv_pool import ReqToTokenPool
    from localsgl.engine.params import SamplingParams
    from localsgl.engine.request import Request
    from localsgl.engine.scheduler import Scheduler

    chunk, n_chunks = 16, 96
    L = chunk * n_chunks
    pool = KVPool(L + 64, 1, 1, 4, torch.float32, "cpu")
    cache = RadixCache(pool)
    sched = Scheduler(pool, ReqToTokenPool(4, L + 64, "cpu"), cache, max_running=4, chunk_size=chunk,
                      max_model_len=L + 32)
    work = [0]

    common = rc._common_len

    def counted_common(a, b, start):
        work[0] += min(len(a), len(b) - start)
        return common(a, b, start)

    def depth(node, stop=None):
        d = 0
        while node is not None and node is not stop:
            d, node = d + 1, node.parent
        return d

    def wrap(name, cost):
        f = getattr(RadixCache, name)

        def w(self, *a):
            work[0] += cost(*a)
            return f(self, *a)
        monkeypatch.setattr(RadixCache, name, w)

    monkeypatch.setattr(rc, "_common_len", counted_common)
    wrap("match_prefix", lambda tokens: len(tokens))
    wrap("insert_from", lambda node, tokens, slots: len(tokens))
    wrap("lock", lambda node: depth(node))
    wrap("unlock", lambda node: depth(node))
    wrap("lock_below", lambda anc, node: depth(node, anc))
    all_ids = Request.all_ids
    monkeypatch.setattr(Request, "all_ids", lambda self, end=None: _count(work, all_ids(self, end)))

    rng = random.Random(0)
    prompt = [rng.randrange(1000) for _ in range(L)]
    req = Request("long", prompt, SamplingParams(max_tokens=4))
    sched.add(req)
    per_chunk = []
    while req.kv_len < L:
        before = work[0]
        sb = sched.schedule()
        sched.commit(sb)
        per_chunk.append(work[0] - before)
    assert len(per_chunk) == n_chunks
    assert req.cached_len == L  # every prefilled token is in the cache
    assert cache.match_prefix(prompt)[0].numel() == req.cached_len
    # the first chunk pays for admission (one match of the prompt); every later one O(chunk)
    assert max(per_chunk[1:]) <= 4 * chunk, per_chunk
    assert sum(per_chunk) <= 6 * L, sum(per_chunk)
    sched.finish(req, "abort")
    sched.check_idle_invariants()


def _count(work, ids):
    work[0] += len(ids)
    return ids
