"""Which decode rows share a cached prefix (for cascade decode attention).

Rows whose radix-cache paths run through the same nodes hold the same KV slots for those
tokens (a request's req_to_token row starts with the slots of its cached path, and a
node's slots never change while it is locked).  Grouping them lets the attention
backend read the shared prefix once per group instead of once per row: for 64 requests
on one 4k-token system prompt that is 64x fewer prefix bytes per decode step.
"""
from __future__ import annotations

# A group pays for itself when it saves at least this many token-rows of KV reads per step
# ((members - 1) x shared length): below that the extra kernel costs more than it saves.
MIN_SAVED_TOKENS = 2048
MIN_SHARED_LEN = 64


def _path(node) -> list:
    out = []
    while node is not None and node.parent is not None:  # the root has no parent and no key
        out.append(node)
        node = node.parent
    out.reverse()
    return out


def shared_prefix_groups(reqs, max_groups: int, max_rows: int,
                         min_saved: int | None = None, min_len: int | None = None) -> list[tuple[int, list[int]]]:
    """reqs: the decode rows of a step (each with ``last_node``, the deepest locked radix
    node of its cached prefix).  Returns up to ``max_groups`` (shared length, row indices)
    with 2..max_rows rows each, the largest savings first."""
    min_saved = MIN_SAVED_TOKENS if min_saved is None else min_saved
    min_len = MIN_SHARED_LEN if min_len is None else min_len
    by_top: dict[int, list[tuple[int, list]]] = {}
    for i, r in enumerate(reqs):
        if r.cached_len < min_len or r.last_node is None:
            continue
        path = _path(r.last_node)
        if path:
            by_top.setdefault(path[0].id, []).append((i, path))
    groups = []
    for members in by_top.values():
        if len(members) < 2:
            continue
        ref = members[0][1]
        k = len(ref)
        for _, p in members[1:]:
            j = 0
            n = min(k, len(p))
            while j < n and p[j] is ref[j]:
                j += 1
            k = j
        plen = sum(len(node.key) for node in ref[:k])
        if plen < min_len:
            continue
        rows = [i for i, _ in members]
        for c in range(0, len(rows), max_rows):
            part = rows[c : c + max_rows]
            if len(part) >= 2 and (len(part) - 1) * plen >= min_saved:
                groups.append((plen, part))
    groups.sort(key=lambda g: -(len(g[1]) - 1) * g[0])
    return groups[:max_groups]
