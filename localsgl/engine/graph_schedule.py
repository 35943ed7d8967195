"""Which decode CUDA graphs exist, which replays a batch, and which to capture next.

Capturing every batch-size bucket of an 8B model takes seconds (three forwards and a
graph instantiation per bucket, twice as many buckets with the shared-prefix variants).
A user who pipes one prompt waits for none of that but batch 1: so the engine captures
the small plain buckets before it serves, and the rest afterwards, one bucket at a time,
on the engine thread between steps (no capture ever runs beside a launch on another
thread).  Until a batch's bucket exists, the batch replays the smallest captured bucket
that holds it, or runs eagerly when none does; the outputs are the same either way.

The later buckets are captured largest first, as the start-up ones are: every graph
allocates from one shared memory pool, and smaller captures reuse the blocks a larger
one freed, so the pool stays near the largest graph's size.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple

# buckets up to this size are captured before the engine serves: batch 1 alone, since every
# bucket captured before serving adds ~0.3 s (8B, H200) to the first answer of a piped prompt
STARTUP_MAX_BS = 1


class GraphKey(NamedTuple):
    batch_size: int
    cascade: bool  # the shared-prefix (cascade attention) variant


def capture_order(batch_sizes: list[int], cascade: bool, startup_max_bs: int = STARTUP_MAX_BS
                  ) -> tuple[list[GraphKey], list[GraphKey]]:
    """(keys captured before serving, keys captured afterwards), each in capture order.

    Before serving: the plain buckets <= startup_max_bs (at least the smallest bucket), or
    none with startup_max_bs 0 (the first decode batch then runs eagerly and its bucket is
    captured right after that step).  Afterwards: every other bucket, plain and cascade
    (cascade only for batches >= 2), largest first, the plain variant of a size before its
    cascade variant."""
    sizes = sorted(set(batch_sizes))
    if not sizes:
        return [], []
    keys = [GraphKey(bs, False) for bs in sizes]
    if cascade:
        keys += [GraphKey(bs, True) for bs in sizes if bs >= 2]
    keys.sort(key=lambda k: (-k.batch_size, k.cascade))
    limit = max(startup_max_bs, sizes[0]) if startup_max_bs > 0 else 0
    first = [k for k in keys if not k.cascade and k.batch_size <= limit]
    later = [k for k in keys if k not in first]
    return first, later


class GraphSchedule:
    """The captured and still-pending graph keys of one engine (pure bookkeeping, no CUDA)."""

    def __init__(self, batch_sizes: list[int], cascade: bool, startup_max_bs: int = STARTUP_MAX_BS):
        self.planned_sizes = sorted(set(batch_sizes))
        self.startup, later = capture_order(batch_sizes, cascade, startup_max_bs)
        self.pending: list[GraphKey] = list(self.startup) + later
        self.captured: set[GraphKey] = set()
        self._plain_sizes: list[int] = []  # captured plain buckets, ascending

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def startup_done(self) -> bool:
        return all(k in self.captured for k in self.startup)

    def next_key(self, plain_only: bool = False) -> GraphKey | None:
        """The next key to capture; ``plain_only``: the next plain one (a batch is waiting for
        its bucket, and the cascade variants only speed up shared-prefix batches)."""
        for k in self.pending:
            if not (plain_only and k.cascade):
                return k
        return None

    def mark_captured(self, key: GraphKey) -> None:
        self.pending.remove(key)
        self.captured.add(key)
        if not key.cascade:
            bisect.insort(self._plain_sizes, key.batch_size)

    def abandon(self) -> None:
        """Capture nothing more (a capture failed): uncaptured sizes run eagerly from now on."""
        self.pending.clear()

    def bucket_for(self, batch_size: int) -> int | None:
        """The captured plain bucket a decode batch of this size replays, or None (eager)."""
        i = bisect.bisect_left(self._plain_sizes, batch_size)
        return self._plain_sizes[i] if i < len(self._plain_sizes) else None

    def planned_bucket(self, batch_size: int) -> int | None:
        """The bucket this size replays once every graph is captured (None: always eager)."""
        i = bisect.bisect_left(self.planned_sizes, batch_size)
        return self.planned_sizes[i] if i < len(self.planned_sizes) else None

    def key_for(self, batch_size: int, cascade: bool) -> GraphKey | None:
        """The graph that replays a decode batch (cascade: it has shared-prefix groups), or None."""
        bs = self.bucket_for(batch_size)
        if bs is None:
            return None
        if cascade and GraphKey(bs, True) in self.captured:
            return GraphKey(bs, True)
        return GraphKey(bs, False)

    def wants_capture(self, batch_size: int) -> bool:
        """Whether a decode batch of this size runs slower than planned for a missing graph
        (eagerly, or padded to a larger bucket than its own)."""
        if self.done:
            return False
        planned = self.planned_bucket(batch_size)
        return planned is not None and self.bucket_for(batch_size) != planned
