"""RadixAttention's prefix cache: a radix tree over token ids whose edges carry KV slots.

A finished (or partly prefilled) request inserts its tokens and their slots;
a new request reuses the longest cached prefix and computes only the rest.
Nodes in use are locked (lock_ref > 0 on the path to the root); unlocked
leaves are evicted least-recently-used first when the KV pool runs short.

Invariants (tested with thousands of random requests): every slot is either
free in the pool, owned by exactly one tree node, or owned by a running
request; a locked node is never evicted.
"""
from __future__ import annotations

import heapq
import itertools
import time

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


def _common_len(a: tuple[int, ...], b: list[int] | tuple[int, ...], start: int) -> int:
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


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

    # ---------------------------------------------------------------- lookup
    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, Node]:
        """Longest cached prefix of tokens: (its KV slots, the deepest node covering it).

        A partially matched edge is split so the returned node ends exactly at the match."""
        if self.disabled or not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        node = self.root
        pos = 0
        values = []
        now = next(_tick)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            pos += n
            node = child
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def record_query(self, query: int, hit: int) -> None:
        self.query_tokens += query
        self.hit_tokens += hit

    def _split(self, child: Node, n: int) -> Node:
        """Split child's edge after n tokens; return the new upper node."""
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
        node = self.root
        pos = 0
        now = next(_tick)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                new = Node(node, tuple(tokens[pos:]), slots[pos:].clone())
                new.last_access = now
                node.children[tokens[pos]] = new
                self.evictable_size += len(new.key)
                return pos
            n = _common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return pos

    # ---------------------------------------------------------------- locks
    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
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
            node = node.parent

    # ---------------------------------------------------------------- evict
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots from unlocked leaves, LRU first; return freed count."""
        if self.disabled or num_tokens <= 0:
            return 0
        leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
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
        for n in self._iter_nodes():
            if n is self.root:
                continue
            assert len(n.key) == len(n.value) > 0, "empty or inconsistent node"
            assert n.lock_ref >= 0
            if n.lock_ref == 0:
                ev += len(n.key)
                assert all(c.lock_ref == 0 for c in n.children.values()), "locked child under unlocked parent"
            else:
                pr += len(n.key)
        assert ev == self.evictable_size, (ev, self.evictable_size)
        assert pr == self.protected_size, (pr, self.protected_size)
