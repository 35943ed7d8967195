"""RadixAttention's prefix cache: a radix tree over token ids whose edges carry KV slots.

A finished (or partly prefilled) request inserts its tokens and their slots;
a new request reuses the longest cached prefix and computes only the rest.
Nodes in use are locked (lock_ref > 0 on the path to the root); unlocked
leaves are evicted least-recently-used first when the KV pool runs short.

No operation walks the whole tree: the unlocked leaves are kept in a set as locks, inserts
and evictions change them, with a lazy heap over it (entries whose node left the set or
was touched since are skipped), so evict costs O(k log n) in the k leaves it frees; a
request that grows (a prefill chunk) inserts from its own deepest node on, so caching a
chunk costs O(chunk), not O(prompt).

Invariants (tested with thousands of random requests): every slot is either
free in the pool, owned by exactly one tree node, or owned by a running
request; a locked node is never evicted.
"""
from __future__ import annotations

import heapq
import itertools

import torch

from .kv_pool import KVPool

_tick = itertools.count()


class Node:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "id")

    def __init__(self, parent: "Node | None" = None, key: tuple[int, ...] = (), value: torch.Tensor | None = None):
        self.children: dict[int, Node] = {}
        self.parent = parent
        self.key = key
        self.value = value if value is not None else torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = next(_tick)
        self.id = next(_tick)

    def __lt__(self, other: "Node") -> bool:
        return self.last_access < other.last_access


_SHORT = 16  # keys up to this long compare element by element (cheaper than slicing)


def _common_len(a: tuple[int, ...], b: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of ``a`` and ``b[start:]``.

    Long keys compare as tuple slices (C loops): the whole range first, which is the usual
    outcome, then a bisection on slice equality that costs O(n) element compares in C and
    O(log n) Python steps in all."""
    n = min(len(a), len(b) - start)
    if n <= _SHORT:
        i = 0
        while i < n and a[i] == b[start + i]:
            i += 1
        return i
    if a[:n] == b[start : start + n]:
        return n
    lo, hi = 0, n  # a[:lo] matches; the first mismatch lies in [lo, hi)
    while hi - lo > _SHORT:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    while a[lo] == b[start + lo]:
        lo += 1
    return lo


class RadixCache:
    def __init__(self, pool: KVPool, disabled: bool = False):
        self.pool = pool
        self.disabled = disabled
        self.root = Node()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes
        self.hit_tokens = 0
        self.query_tokens = 0
        self._leaves: set[Node] = set()  # unlocked leaves: what evict may take
        self._heap: list[tuple[int, int, Node]] = []  # (last_access, id, node), lazily pruned

    # ---------------------------------------------------------------- lookup
    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, Node]:
        """Longest cached prefix of tokens: (its KV slots, the deepest node covering it).

        A partially matched edge is split so the returned node ends exactly at the match."""
        if self.disabled or not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        values: list[torch.Tensor] = []
        node, _ = self._descend(self.root, tuple(tokens), next(_tick), values)
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _descend(self, node: Node, tokens: tuple, now: int, values: list[torch.Tensor]) -> tuple[Node, int]:
        """Follow ``tokens`` down from ``node`` as far as cached, splitting a partly matched
        edge and touching each node passed; their slots go to ``values``.  Returns the node
        reached and how many tokens it covers."""
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child, now)
            values.append(child.value)
            pos += n
            node = child
        return node, pos

    def record_query(self, query: int, hit: int) -> None:
        self.query_tokens += query
        self.hit_tokens += hit

    def _split(self, child: Node, n: int) -> Node:
        """Split child's edge after n tokens; return the new upper node (never a leaf, so the
        leaf set is unchanged: child keeps its place in it)."""
        upper = Node(child.parent, child.key[:n], child.value[:n])
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        return upper

    # ---------------------------------------------------------------- insert
    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Insert tokens with their slots; return how many leading tokens were already
        cached (the caller owns those duplicate slots of its own and must free them)."""
        if self.disabled:
            return 0
        return self.insert_from(self.root, tokens, slots)[0]

    def insert_from(self, node: Node, tokens: list[int], slots: torch.Tensor) -> tuple[int, Node, torch.Tensor]:
        """Insert tokens (with their slots) as the continuation of ``node``'s path.

        Returns (dup, deepest, tree_slots): the first ``dup`` tokens were already cached (the
        caller frees its own slots for them and uses ``tree_slots[:dup]`` instead), the node
        that ends exactly after the tokens, and the tree's slots for all of them.  Costs
        O(len(tokens)) whatever the depth of ``node``."""
        if self.disabled or not tokens:
            return 0, node, torch.empty(0, dtype=torch.int64)
        tokens = tuple(tokens)
        values: list[torch.Tensor] = []
        now = next(_tick)
        node, pos = self._descend(node, tokens, now, values)
        if pos == len(tokens):
            return pos, node, torch.cat(values)
        new = Node(node, tokens[pos:], slots[pos:].clone())
        new.last_access = now
        node.children[tokens[pos]] = new
        self.evictable_size += len(new.key)
        self._update_leaf(node)
        self._update_leaf(new)
        values.append(new.value)
        return pos, new, torch.cat(values)

    # ---------------------------------------------------------------- locks
    def lock(self, node: Node) -> None:
        self.lock_below(self.root, node)

    def lock_below(self, ancestor: Node, node: Node) -> None:
        """Lock the path from ``node`` up to, not including, ``ancestor`` (whose own path the
        caller already holds): with lock(ancestor) held this equals lock(node), at the cost
        of the nodes in between only."""
        while node is not ancestor:
            if node is self.root:
                raise RuntimeError("radix cache: lock_below from a node outside the ancestor's subtree")
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
                self._leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
                self._update_leaf(node)
            node = node.parent

    # ---------------------------------------------------------------- evictable leaves
    def _update_leaf(self, node: Node) -> None:
        """Put node in the evictable-leaf set (with a heap entry) or take it out, by its state."""
        if node.lock_ref == 0 and not node.children and node is not self.root:
            self._leaves.add(node)
            self._push(node)
        else:
            self._leaves.discard(node)

    def _touch(self, node: Node, now: int) -> None:
        node.last_access = now
        if node in self._leaves:
            self._push(node)  # the older entry is now stale

    def _push(self, node: Node) -> None:
        heap = self._heap
        if len(heap) > 2 * len(self._leaves) + 64:  # mostly stale: rebuild from the set
            heap[:] = [(n.last_access, n.id, n) for n in self._leaves if n is not node]
            heapq.heapify(heap)
        heapq.heappush(heap, (node.last_access, node.id, node))

    # ---------------------------------------------------------------- evict
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first; return freed count."""
        if self.disabled or num_tokens <= 0:
            return 0
        heap, leaves = self._heap, self._leaves
        freed = 0
        while freed < num_tokens and heap:
            access, _, leaf = heapq.heappop(heap)
            if leaf not in leaves or access != leaf.last_access:
                continue  # stale entry: evicted, locked, grown or touched since
            leaves.remove(leaf)
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            leaf.parent = None
            self._update_leaf(parent)
        return freed

    def reset(self) -> None:
        """Drop every unlocked node (frees their slots)."""
        self.evict(self.evictable_size)

    def _iter_nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    # ---------------------------------------------------------------- checks
    def total_tokens(self) -> int:
        return sum(len(n.key) for n in self._iter_nodes())

    def check_invariants(self) -> None:
        ev = pr = 0
        leaves = set()
        for n in self._iter_nodes():
            if n is self.root:
                continue
            assert len(n.key) == len(n.value) > 0, "empty or inconsistent node"
            assert n.lock_ref >= 0
            assert n.parent.children.get(n.key[0]) is n, "node not under its parent's first-token key"
            if n.lock_ref == 0:
                ev += len(n.key)
                assert all(c.lock_ref == 0 for c in n.children.values()), "locked child under unlocked parent"
                if not n.children:
                    leaves.add(n)
            else:
                pr += len(n.key)
        assert ev == self.evictable_size, (ev, self.evictable_size)
        assert pr == self.protected_size, (pr, self.protected_size)
        assert leaves == self._leaves, "evictable-leaf set out of date"
        current = {n for a, _, n in self._heap if a == n.last_access}
        assert leaves <= current, "an evictable leaf has no current heap entry"
