"""Continuous batching: admit, chunk prefills, decode, retract, finish.

Each step the scheduler (1) gives every decoding request one KV slot —
evicting unlocked prefixes from the radix cache and, if still short,
retracting requests back to the waiting queue (see "Retraction" below); (2)
spends a per-step token budget (the chunk size) on prefills: first the request
whose prompt is half-done, then waiting requests (FCFS, or longest cached
prefix first); (3) hands the mixed batch to the runner; (4) appends the
sampled tokens and finishes requests.  Memory pressure never raises: it retracts.

Retraction (as SGLang does it): victims go least decoded output first (ties:
longest prompt, then the latest arrival), and retraction goes on until the
remaining decodes have room for RETRACT_DECODE_STEPS more steps (or for
RETRACT_ROOM_SHARE of the pool, if less), so pressure costs one retraction
round rather than one victim per step.  A retraction
raises ``new_token_ratio`` — the share of each running request's remaining
output that admission keeps free — to an estimate of what the survivors will
still use; it then decays by NEW_TOKEN_RATIO_DECAY per step to
MIN_NEW_TOKEN_RATIO.  Progress is guaranteed: a retracted request keeps its
output and its arrival number and goes back to the front of the waiting queue
(retracted requests in arrival order, protected ones first); after
PROTECT_AFTER_RETRACTIONS retractions it is protected — retracted only when
nothing else can make room for one step — and admitted only while every
running protected request's final length still fits the pool together with
its own, so protected requests can always finish.

A step that ran out of device memory is rolled back and later steps are
capped at half its tokens (``shrink_after_oom``); the cap doubles back after
OOM_RECOVERY_STEPS good steps.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from .kv_pool import KVPool, ReqToTokenPool
from .radix_cache import RadixCache
from .request import Request, Status

log = logging.getLogger("localsgl.scheduler")

INIT_NEW_TOKEN_RATIO = 0.5
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600  # per scheduled step
RETRACT_DECODE_STEPS = 20  # a retraction round makes room for this many decode steps,
RETRACT_ROOM_SHARE = 0.125  # or for this share of the pool if that is less
PROTECT_AFTER_RETRACTIONS = 3
OOM_RECOVERY_STEPS = 16  # good steps before a step size halved by an out-of-memory error doubles again


@dataclass
class ScheduledBatch:
    reqs: list[Request]
    extend_lens: list[int]
    prefix_lens: list[int]
    sample: list[bool]  # row needs a new token after this step
    out_slots: torch.Tensor  # [sum(extend_lens)] int64 CPU
    decode_only: bool
    # the first num_decode rows decode one token each; their new KV slot is written to the
    # host slot table only, and the runner writes it on the device (inside the decode graph)
    num_decode: int = 0


class Scheduler:
    def __init__(
        self,
        kv_pool: KVPool,
        req_pool: ReqToTokenPool,
        cache: RadixCache,
        max_running: int,
        chunk_size: int,
        max_model_len: int,
        policy: str = "fcfs",
    ):
        self.kv_pool = kv_pool
        self.req_pool = req_pool
        self.cache = cache
        self.max_running = max_running
        self.chunk_size = chunk_size
        self.max_model_len = max_model_len
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted (prefilling or decoding)
        self._arrivals = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.retractions_total = 0
        self.step_cap: int | None = None  # tokens per step after an out-of-memory step; None: no cap
        self._good_steps = 0

    # ------------------------------------------------------------ queue ops
    def add(self, req: Request) -> None:
        if req.arrival_no < 0:
            req.arrival_no = self._arrivals
            self._arrivals += 1
        self.waiting.append(req)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------ memory
    def _available(self) -> int:
        return self.kv_pool.num_free + self.cache.evictable_size

    def _alloc(self, n: int) -> torch.Tensor | None:
        if self.kv_pool.num_free < n:
            self.cache.evict(n - self.kv_pool.num_free)
        return self.kv_pool.alloc(n)

    def _reserved_for_decodes(self) -> int:
        tot = 0
        for r in self.running:
            tot += min(r.max_new_remaining(self.max_model_len), 4096)
        return int(tot * self.new_token_ratio)

    # ------------------------------------------------------------ admit
    def _admit(self, req: Request) -> bool:
        """Give req a table row and lock its longest cached prefix."""
        row = self.req_pool.alloc()
        if row is None:
            return False
        ids = req.all_ids(req.all_len - 1)  # always leave one token to compute
        slots, node = self.cache.match_prefix(ids)
        self.cache.lock(node)
        req.req_row = row
        req.last_node = node
        req.cached_len = req.kv_len = int(slots.numel())
        self.req_pool.write(row, 0, slots)
        if not req.first_admitted:
            req.first_admitted = True
            req.metrics.cached_prompt_tokens = req.kv_len
            self.cache.record_query(len(req.prompt_ids), req.kv_len)
        req.status = Status.RUNNING
        self.running.append(req)
        return True

    def _row_slots(self, req: Request, start: int, end: int) -> torch.Tensor:
        return self.req_pool.slots(req.req_row, start, end)

    def cache_progress(self, req: Request) -> None:
        """Hand the computed KV of req to the radix cache (after a prefill chunk).

        Only the new part, positions cached_len..kv_len, is inserted, walking on from
        req.last_node (which ends at cached_len), and the lock moves down over the new nodes
        only: a chunk costs O(chunk), not O(prompt)."""
        if self.cache.disabled or req.kv_len <= req.cached_len:
            return
        start, end = req.cached_len, req.kv_len
        n_prompt = len(req.prompt_ids)
        ids = req.prompt_ids[start:end] + req.output_ids[max(start - n_prompt, 0) : max(end - n_prompt, 0)]
        if min(ids) < 0:  # never cache a token still being sampled (failed step)
            return
        slots = self._row_slots(req, start, end)
        dup, node, tree_slots = self.cache.insert_from(req.last_node, ids, slots)
        if dup:  # the tree already held these tokens: use its slots, free ours
            self.kv_pool.free(slots[:dup])
            self.req_pool.write(req.req_row, start, tree_slots[:dup])
        self.cache.lock_below(req.last_node, node)
        req.last_node = node
        req.cached_len = end

    def release(self, req: Request) -> None:
        """Give back req's KV (to the cache, or the pool) and its table row."""
        if req.req_row is None:
            return
        if req.pending:  # slots handed out for a step that never committed
            self.kv_pool.free(self._row_slots(req, req.kv_len, req.kv_len + req.pending))
            req.pending = 0
        known = req.resolved_len(req.kv_len)
        if known < req.kv_len:  # KV computed from a token that never resolved (a failed step)
            self.kv_pool.free(self._row_slots(req, known, req.kv_len))
            req.kv_len = known
        if self.cache.disabled:
            self.kv_pool.free(self._row_slots(req, 0, req.kv_len))
        else:
            self.cache_progress(req)
            self.cache.unlock(req.last_node)
        self.req_pool.free(req.req_row)
        req.req_row = None
        req.last_node = None
        req.kv_len = req.cached_len = 0
        if req in self.running:
            self.running.remove(req)

    def retract(self, req: Request) -> None:
        """Back to the waiting queue; its output stays (recomputed from the cache on re-admission)."""
        log.debug("retracting %s", req.rid)
        self.release(req)
        req.status = Status.WAITING
        req.metrics.retractions += 1
        self.retractions_total += 1
        self._requeue_front(req)

    def _requeue_front(self, req: Request) -> None:
        """Insert req among the retracted requests at the front of the queue, in
        (protected first, arrival) order, ahead of every request never retracted."""
        key = self._requeue_key(req)
        i = 0
        for w in self.waiting:
            if w.retractions == 0 or self._requeue_key(w) > key:
                break
            i += 1
        self.waiting.insert(i, req)

    @staticmethod
    def _requeue_key(r: Request) -> tuple[bool, int]:
        return (r.retractions < PROTECT_AFTER_RETRACTIONS, r.arrival_no)

    @staticmethod
    def _victim_key(r: Request) -> tuple:
        """Sort key: the first in this order is retracted first."""
        return (r.retractions >= PROTECT_AFTER_RETRACTIONS, len(r.output_ids), -len(r.prompt_ids), -r.arrival_no)

    def _retract_for_decodes(self, decodes: list[Request], prefilling: list[Request]) -> None:
        """Not every decode has a slot: retract (victim order, decodes and unfinished prefills
        alike) until the remaining decodes have room for RETRACT_DECODE_STEPS steps (at most
        RETRACT_ROOM_SHARE of the pool).  Protected requests go only when nothing else makes room
        for one step, and the last decode stays."""
        L = self.max_model_len
        target = min(sum(min(RETRACT_DECODE_STEPS, r.max_new_remaining(L)) for r in decodes),
                     int(self.kv_pool.num_slots * RETRACT_ROOM_SHARE))
        retracted = 0
        for victim in sorted(decodes + prefilling, key=self._victim_key):
            avail = self._available()
            if avail >= target:
                break
            is_decode = victim.is_decoding
            if is_decode and len(decodes) == 1:
                continue
            if victim.retractions >= PROTECT_AFTER_RETRACTIONS and avail >= len(decodes):
                break
            if is_decode:
                decodes.remove(victim)
                target -= min(RETRACT_DECODE_STEPS, victim.max_new_remaining(L))
            else:
                prefilling.remove(victim)
            self.retract(victim)
            retracted += 1
        if decodes and self._available() < len(decodes):
            if any(r.is_decoding and r.max_new_remaining(L) == 0 for r in self.running):
                # a request ends with its in-flight token and frees its KV: the last victims wait a step
                decodes.sort(key=self._victim_key, reverse=True)
                del decodes[max(self._available(), 0):]
            while decodes and self._available() < len(decodes):  # the pool is too small for even these
                victim = min(decodes, key=self._victim_key)
                decodes.remove(victim)
                self.retract(victim)
                retracted += 1
        if retracted:
            self._raise_new_token_ratio(decodes)

    def _raise_new_token_ratio(self, decodes: list[Request]) -> None:
        """After a retraction: expect the survivors to use what they decoded so far plus
        RETRACT_DECODE_STEPS more each, as a share of their maximal output."""
        if not decodes:
            self.new_token_ratio = 1.0
            return
        L = self.max_model_len
        decoded = sum(len(r.output_ids) for r in decodes)
        max_new = sum(len(r.output_ids) + r.max_new_remaining(L) for r in decodes)
        estimate = (decoded + RETRACT_DECODE_STEPS * len(decodes)) / max(max_new, 1)
        self.new_token_ratio = max(self.new_token_ratio, min(1.0, estimate))

    def _protected_fits(self, req: Request) -> bool:
        """A protected request is admitted only while all running protected requests can still
        reach their final length together (retracting everything else makes that room)."""
        L = self.max_model_len
        others = sum(r.final_len(L) for r in self.running if r.retractions >= PROTECT_AFTER_RETRACTIONS)
        return others == 0 or others + req.final_len(L) <= self.kv_pool.num_slots

    def finish(self, req: Request, reason: str) -> None:
        if req.status == Status.FINISHED:
            return
        if req.status == Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self.release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    # ------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch | None:
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        # 1) one slot for every decoding request; retract (victim order) when short
        # a request whose in-flight token already reaches its limit waits for that token
        # one pass over running: decodes (one token to compute, budget left) and prefills
        decodes: list[Request] = []
        prefilling: list[Request] = []
        for r in self.running:
            if not r.is_decoding:
                prefilling.append(r)
            elif r.max_new_remaining(self.max_model_len) > 0:
                decodes.append(r)
        if self.step_cap is not None and len(decodes) > self.step_cap:  # the rest wait, keeping their KV
            decodes = sorted(decodes, key=lambda r: r.arrival_no)[: self.step_cap]
        if decodes and self._available() < len(decodes):
            self._retract_for_decodes(decodes, prefilling)
        reqs: list[Request] = []
        ext: list[int] = []
        pre: list[int] = []
        sample: list[bool] = []
        slot_parts: list[torch.Tensor] = []
        if decodes:
            slots = self._alloc(len(decodes))
            assert slots is not None
            self.req_pool.write_many([r.req_row for r in decodes], [r.kv_len for r in decodes], slots, device=False)
            for r in decodes:
                r.pending = 1
                reqs.append(r)
                ext.append(1)
                pre.append(r.kv_len)
                sample.append(True)
            slot_parts.append(slots)

        # 2) prefills under the token budget
        budget = self.chunk_size if self.step_cap is None else min(self.chunk_size, self.step_cap - len(decodes))
        candidates = prefilling
        if self.waiting and len(self.running) < self.max_running:
            if self.policy == "lpm":
                self._sort_waiting_by_prefix()
        for r in candidates:
            if budget <= 0:
                break
            n = self._extend_one(r, budget, reqs, ext, pre, sample, slot_parts, reserve=0)
            budget -= n
        reserve = self._reserved_for_decodes() if self.waiting and budget > 0 else 0
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            r = self.waiting.popleft()
            if r.depends_on is not None and not self._dependency_ready(r.depends_on):
                skipped.append(r)
                continue
            need = r.all_len  # conservative: cached prefix tokens are counted as evictable too
            if self._available() - reserve < need and self.running:
                self.waiting.appendleft(r)
                break
            if r.retractions >= PROTECT_AFTER_RETRACTIONS and not self._protected_fits(r):
                self.waiting.appendleft(r)
                break
            if not self._admit(r):
                self.waiting.appendleft(r)
                break
            n = self._extend_one(r, budget, reqs, ext, pre, sample, slot_parts, reserve=reserve)
            if n == 0:  # no memory even for a piece of it: undo admission
                self.release(r)
                r.status = Status.WAITING
                self.waiting.appendleft(r)
                break
            budget -= n
        for r in reversed(skipped):
            self.waiting.appendleft(r)
        if not reqs:
            stalled = [r for r in self.running if not r.is_decoding or r.max_new_remaining(self.max_model_len) > 0]
            if stalled:  # stalled for memory: free the first victim; the next step goes on
                self.retract(min(stalled, key=self._victim_key))
            return None
        out_slots = torch.cat(slot_parts) if slot_parts else torch.empty(0, dtype=torch.int64)
        decode_only = all(e == 1 for e in ext) and all(sample) and len(decodes) == len(reqs)
        return ScheduledBatch(reqs, ext, pre, sample, out_slots, decode_only, len(decodes))

    @staticmethod
    def _dependency_ready(dep: Request) -> bool:
        """n > 1: siblings wait until the first choice's prompt KV is in the cache."""
        return dep.finished or bool(dep.output_ids)

    def _extend_one(self, r, budget, reqs, ext, pre, sample, slot_parts, reserve) -> int:
        n = min(r.remaining_tokens, budget)
        avail = self._available() - reserve
        if n > avail:
            n = max(avail, 0)
        if n <= 0:
            return 0
        slots = self._alloc(n)
        if slots is None:
            return 0
        self.req_pool.write(r.req_row, r.kv_len, slots)
        r.pending = n
        reqs.append(r)
        ext.append(n)
        pre.append(r.kv_len)
        sample.append(r.kv_len + n == r.all_len)
        slot_parts.append(slots)
        return n

    def _sort_waiting_by_prefix(self) -> None:
        if self.cache.disabled or len(self.waiting) > 256:
            return
        scored = []
        for i, r in enumerate(self.waiting):
            if r.retractions:  # retracted requests keep their place at the front
                scored.append((0, 0, i, r))
                continue
            slots, _ = self.cache.match_prefix(r.all_ids(r.all_len - 1))
            scored.append((1, -int(slots.numel()), i, r))
        scored.sort(key=lambda t: t[:3])
        self.waiting = deque(t[3] for t in scored)

    def commit(self, batch: ScheduledBatch) -> None:
        """After the forward: advance kv_len; cache finished prefill chunks."""
        if self.step_cap is not None:
            self._good_steps += 1
            if self._good_steps >= OOM_RECOVERY_STEPS:
                self._good_steps = 0
                self.step_cap *= 2
                if self.step_cap >= self.chunk_size + self.max_running:
                    self.step_cap = None
        for r, n, s in zip(batch.reqs, batch.extend_lens, batch.sample):
            r.kv_len += n
            r.pending = 0
            unresolved = bool(r.output_ids) and r.output_ids[-1] < 0
            if (n > 1 or not r.output_ids) and not unresolved:  # a prefill chunk: share it at once
                self.cache_progress(r)

    # ------------------------------------------------------------ failed steps
    def rollback(self, batch: ScheduledBatch) -> None:
        """Undo the slot allocation of a step that failed before its commit."""
        for r in batch.reqs:
            if r.pending and r.req_row is not None:
                self.kv_pool.free(self._row_slots(r, r.kv_len, r.kv_len + r.pending))
            r.pending = 0

    def shrink_after_oom(self, batch: ScheduledBatch) -> bool:
        """The device ran out of memory in this (uncommitted) step: roll it back and cap the
        next steps at half its tokens (decodes beyond the cap wait, oldest arrivals go first;
        the cap doubles again every OOM_RECOVERY_STEPS good steps).  False when the step was
        one token already: nothing smaller to retry."""
        self.rollback(batch)
        tokens = sum(batch.extend_lens)
        if tokens <= 1:
            return False
        self.step_cap = tokens // 2
        self._good_steps = 0
        return True

    # ------------------------------------------------------------ checks
    def check_idle_invariants(self) -> None:
        """With nothing running: every slot is free or held (unlocked) by the cache."""
        assert not self.running and not self.waiting
        assert self.req_pool.num_free == self.req_pool.max_reqs, "request rows leaked"
        self.cache.check_invariants()
        assert self.cache.protected_size == 0, "radix nodes still locked"
        held = self.cache.total_tokens() if not self.cache.disabled else 0
        assert self.kv_pool.num_free + held == self.kv_pool.num_slots, (
            f"KV slots leaked: free {self.kv_pool.num_free} + cached {held} != {self.kv_pool.num_slots}"
        )
