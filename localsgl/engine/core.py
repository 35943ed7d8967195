"""EngineCore: the engine thread.  It owns the scheduler, the runner and every
request's state; callers talk to it only through a thread-safe inbox, and it
talks back through each request's on_delta callback — or, when it runs in its
own process (core_process), through one message per step (``outbox``) that
carries the new token ids and finishes of every request, the text being made
by the front end.

One iteration: drain the inbox (new requests, aborts) -> schedule -> forward
-> sample -> append tokens, detokenize, check stops, finish -> callbacks (the
output side, from appending on, is core_output.CoreOutput).

A failing step fails small: an exception ends, with finish_reason "error" and
its message (``StreamDelta.extra["error"]``, ``Request.error``), only the
requests the failing part worked on — the batch for schedule/forward/commit,
one request for its own sampling, detokenizer, stop check or callback, the
launched step's rows when its tokens cannot be read — and gives back their
KV: uncommitted slots to the pool, committed KV of known tokens to the radix
cache.  A device out-of-memory error in the forward first retries with
steps of half as many tokens (Scheduler.shrink_after_oom).  Everything else
keeps going.
"""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from . import debug_switches
from .core_output import CoreOutput
from .debug_switches import DebugSwitches
from .kv_pool import KVPool, ReqToTokenPool, kv_cache_torch_dtype
from .layers.attention.base import create_backend
from .penalties import PenaltyState
from .radix_cache import RadixCache
from .request import Request
from .runner import ModelRunner
from .sampling import SampleResult, SamplingBatch, sample
from .scheduler import Scheduler
from .text_output import ChoiceText

log = logging.getLogger("localsgl.engine")


@dataclass
class CoreConfig:
    kv_tokens: int
    max_running: int
    chunk_size: int
    max_model_len: int
    attention_backend: str = "auto"
    disable_radix_cache: bool = False
    cuda_graph_bs: list[int] | None = None
    schedule_policy: str = "fcfs"
    seed: int = 0
    kv_cache_dtype: str | None = None  # None / "auto": the model's dtype; "fp8": e4m3 with scales (kv_pool.py)
    debug: DebugSwitches = debug_switches.DEFAULT  # debug/A-B switches (docs/switches.md)


class EngineCore(CoreOutput):
    def __init__(self, model, tokenizer, eos_ids: list[int], device: torch.device, cfg: CoreConfig, overlap: bool = False,
                 start_thread: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = sorted(set(eos_ids))
        self.device = device
        self.cfg = cfg
        self.overlap = overlap
        debug_switches.apply_to_model(model, cfg.debug)
        debug_switches.apply_to_thread(cfg.debug, device)  # graphs are captured on this thread
        # GPU sampling kernels (kernels/sampling.py; tested against the torch path, which stays the
        # fallback): torch's argmax over a 128k vocabulary costs ~1% of a batch-1 step on an H200
        self.gpu_sampling_kernels = cfg.debug.gpu_sampling_kernels
        self.profile = None
        if cfg.debug.profile_steps:
            from .step_profile import StepProfile

            self.profile = StepProfile(device)
        mc = model.config
        model.rotary.check_covers(cfg.max_model_len)  # the rotary kernel reads its table unguarded
        self.vocab_size = mc.vocab_size
        self.kv_pool = KVPool(cfg.kv_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim, model.dtype, device,
                              kv_dtype=kv_cache_torch_dtype(cfg.kv_cache_dtype, model.dtype))
        self.req_pool = ReqToTokenPool(cfg.max_running, cfg.max_model_len + 1, device)
        self.cache = RadixCache(self.kv_pool, disabled=cfg.disable_radix_cache)
        self.scheduler = Scheduler(
            self.kv_pool, self.req_pool, self.cache, cfg.max_running, cfg.chunk_size, cfg.max_model_len, cfg.schedule_policy
        )
        self.attn = create_backend(cfg.attention_backend, device)
        if self.kv_pool.quantized and self.attn.name == "triton" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("an fp8 KV cache with the triton attention backend needs compute capability 8.9 or "
                             "newer (Ada, Hopper, Blackwell); use --attention-backend torch or drop --kv-cache-dtype")
        self.runner = ModelRunner(model, self.kv_pool, self.req_pool, self.attn, device, cfg.cuda_graph_bs,
                                  max_step_tokens=cfg.chunk_size + cfg.max_running)
        self.default_generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.inbox: queue.Queue = queue.Queue()
        self.requests: dict[str, list[Request]] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps = 0
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.inflight: _Launched | None = None
        # Fault injection (tests): when set, called as fault(point, requests) at the named points
        # of a step — "schedule", "forward", "commit", "sample", "resolve", "detokenize" — with
        # the requests that point works on; what it raises is handled like a real failure there.
        self.fault: Callable[[str, list[Request]], None] | None = None
        self._blind_failures = 0  # consecutive failures that touched no identifiable request
        self.oom_retries = 0
        self.penalties = PenaltyState(self.vocab_size, device)  # penalised requests' token history, on the device
        self.masks = None  # grammar.MaskFiller, made when a constrained request is first sampled
        self._mask_pool = None  # the worker that fills masks while a forward runs
        self._thread: threading.Thread | None = None
        # core_process.StepOutbox when this core runs in its own process: tokens and finishes
        # go out raw, one message per step, and the front end makes the text
        self.outbox = None
        if start_thread:
            self.attach_thread(threading.Thread(target=self.run_loop, name="localsgl-engine", daemon=True))
            self._thread.start()

    def attach_thread(self, thread: threading.Thread) -> None:
        """The thread that runs run_loop (started here, or the one that built the engine)."""
        self._thread = thread

    # ------------------------------------------------------------ caller side (any thread)
    def add(self, reqs: list[Request]) -> None:
        self._idle.clear()
        self.inbox.put(("add", reqs))

    def add_many(self, groups: list[list[Request]]) -> None:
        self._idle.clear()
        self.inbox.put(("add_many", groups))

    def abort(self, rid: str) -> None:
        self.inbox.put(("abort", rid))

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.inbox.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def release(self) -> None:
        """Drop the model, the KV pool and the graphs so their memory can go back."""
        self.runner.graphs = None
        self.runner.model = None
        self.model = None
        self.kv_pool.release()
        self.req_pool.table = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    # ------------------------------------------------------------ engine thread
    def run_loop(self) -> None:
        """The engine loop; runs until shutdown()."""
        torch.set_grad_enabled(False)
        debug_switches.apply_to_thread(self.cfg.debug, self.device)
        while not self._stop.is_set():
            try:
                idle = not self.scheduler.has_work() and self.inflight is None
                self._drain(block=idle and not self.runner.graphs_pending)
                if self._stop.is_set():
                    break
                self.step()
                self._capture_graph_if_due()
            except Exception as e:  # keep serving: fail what the step touched, not the engine
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_unattributed(e)
            if self.outbox is not None:
                self.outbox.flush(self)
            if not self.scheduler.has_work() and self.inbox.empty() and self.inflight is None:
                self._idle.set()
        self._abort_all()
        if self.outbox is not None:
            self.outbox.flush(self)

    def _capture_graph_if_due(self) -> None:
        """Capture one more decode graph while the engine is idle, or right away when the last
        decode batch ran without the graph planned for it (its in-flight step resolved first:
        a capture synchronizes the device anyway)."""
        runner = self.runner
        if not runner.graphs_pending:
            return
        idle = not self.scheduler.has_work() and self.inflight is None and self.inbox.empty()
        if not idle and not runner.wants_graph:
            return
        if self.inflight is not None:
            self._resolve(self.inflight)
            self.inflight = None
        runner.capture_next_graph(plain_only=not idle)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind in ("add", "add_many"):
                for group in payload if kind == "add_many" else [payload]:
                    self.requests.setdefault(group[0].rid, []).extend(group)
                    for r in group:
                        try:
                            self._init_request(r)
                        except Exception as e:  # e.g. its detokenizer cannot start: it alone fails
                            log.error("request %s failed to start:\n%s", r.rid, traceback.format_exc())
                            self._fail([r], e)
                            continue
                        self.scheduler.add(r)
            elif kind == "abort":
                for r in self.requests.get(payload, []):
                    if not r.finished:
                        self._finish(r, "abort", emit=True)
            elif kind == "abort_choice":  # (rid, index): the front end saw a stop string end it
                rid, index = payload
                for r in self.requests.get(rid, []):
                    if r.index == index and not r.finished:
                        self._finish(r, "abort", emit=True)
            elif kind == "stop":
                return

    def _init_request(self, r: Request) -> None:
        p = r.params
        if p.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(p.seed + r.index)
        if self.outbox is None:  # in a core process the front end makes the text
            r.text = ChoiceText(self.tokenizer, r.prompt_ids, p)
        self.prompt_tokens_total += len(r.prompt_ids)

    # ------------------------------------------------------------ one step
    def step(self) -> None:
        """Schedule and launch step N+1, then finish step N's bookkeeping while the GPU works.

        Without overlap each step's tokens are resolved before the next is scheduled.  With
        overlap the sampled tokens of step N stay on the device: step N+1's inputs read them
        there (placeholders in output_ids), as do the penalties' token counts (PenaltyState),
        and detokenization, stop checks and callbacks of step N run after N+1 is launched.
        Outputs are the same either way; a request that stops at step N may have computed
        one extra token, which is dropped.

        Failures stay with the requests they touch: see _schedule, _on_launch_failure, _resolve."""
        prof = self.profile
        t = prof.tick() if prof else 0.0
        sb = self._schedule()
        if prof:
            t = prof.add_host("schedule", t)
        launched = None
        if sb is not None:
            try:
                launched = self._launch(sb)
                self._blind_failures = 0
            except Exception as e:
                self._on_launch_failure(sb, e)
        if prof:
            t = prof.add_host("launch", t)
        if self.inflight is not None:
            self._resolve(self.inflight)
            self.inflight = None
        if launched is not None:
            if self.overlap and launched.deferred:
                self.inflight = launched
            else:
                self._resolve(launched)
        if prof:
            prof.add_host("resolve", t)

    def _schedule(self):
        """The scheduler's next batch; if building it fails, the requests holding uncommitted
        slots (the batch so far) end with "error"."""
        try:
            sb = self.scheduler.schedule()
            if self.fault is not None and sb is not None:
                self.fault("schedule", sb.reqs)
            return sb
        except Exception as e:
            log.error("scheduling failed:\n%s", traceback.format_exc())
            self._fail_blamed([r for r in self.scheduler.running if r.pending], e)
            return None

    def _on_launch_failure(self, sb, err: Exception) -> None:
        """The forward, commit or sampling of sb raised.  Out of device memory before the commit:
        roll back and let the next step run smaller; otherwise sb's requests end with "error"."""
        if isinstance(err, torch.OutOfMemoryError) and all(r.pending for r in sb.reqs):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.scheduler.shrink_after_oom(sb):
                self.oom_retries += 1
                log.warning("out of device memory in a step of %d tokens (%d requests): retrying smaller",
                            sum(sb.extend_lens), len(sb.reqs))
                return
        log.error("step failed for %d request(s):\n%s", len(sb.reqs), traceback.format_exc())
        self._fail(sb.reqs, err)

    def _fail(self, reqs: list[Request], err: BaseException) -> None:
        """End reqs with "error" and the failure's message; release gives their KV back
        (resolved, committed tokens to the radix cache; the rest to the pool)."""
        msg = f"{type(err).__name__}: {err}"
        for r in reqs:
            if not r.finished:
                self._finish(r, "error", emit=True, error=msg)

    def _fail_blamed(self, reqs: list[Request], err: BaseException) -> None:
        """Fail reqs; a failure with no request to blame is counted, and one that keeps
        recurring (three steps in a row) ends every running request so the loop cannot spin
        on it.  Waiting requests were never touched and stay."""
        if not reqs:
            self._blind_failures += 1
            if self._blind_failures < 3:
                return
            reqs = list(self.scheduler.running)
        self._blind_failures = 0
        self._fail(reqs, err)

    def _fail_unattributed(self, err: BaseException) -> None:
        """An exception escaped the step's own handling: fail the batch being built or run
        (its requests hold uncommitted slots) and the launched step whose tokens are unread."""
        reqs = [r for r in self.scheduler.running if r.pending]
        if self.inflight is not None:
            reqs += self.inflight.rows
            self.inflight = None
        self._fail_blamed(reqs, err)

    def _launch(self, sb) -> "_Launched | None":
        self.steps += 1
        prev = self.inflight.tokens if self.inflight is not None else None
        prof = self.profile
        ev = prof.start_device() if prof else None
        masks = self._start_masks(sb)  # None unless a row to sample is constrained
        try:
            if self.fault is not None:
                self.fault("forward", sb.reqs)
            logits = self.runner.forward(sb, prev_tokens=prev)
            self.scheduler.commit(sb)
            if self.fault is not None:
                self.fault("commit", sb.reqs)
            rows = [r for r, s in zip(sb.reqs, sb.sample) if s]
            if not rows:
                if prof:
                    prof.end_device(self._step_kind(sb), sum(sb.extend_lens), ev)
                return None
            grammar = None
            if masks is not None:
                grammar, rows, logits = self._finish_masks(masks, rows, logits)
            deferred = self.overlap and not any(r.params.logprobs for r in rows)
            try:
                res = self._sample(rows, logits, deferred, grammar) if rows else None
            except Exception as e:
                rows, res = self._sample_each(rows, logits, deferred, e, grammar)
        finally:
            if masks is not None:
                masks.join()
        if prof:
            prof.end_device(self._step_kind(sb), sum(sb.extend_lens), ev)
        if not rows:
            return None
        slots = []
        for j, r in enumerate(rows):
            slots.append(len(r.output_ids))
            r.output_ids.append(-(1 + j))  # placeholder: token j of this step's device tensor
        if grammar is not None and grammar[2]:
            for r, forced in grammar[2].items():  # the sampled token is forced[0]; the rest follow it
                if not r.finished:
                    r.grammar.consume(forced)
                    r.grammar.forced_after[len(r.output_ids) - 1] = len(forced) - 1
                    r.output_ids.extend(forced[1:])
        la = _Launched(rows, slots, res, deferred)
        if deferred:
            la.tokens = res.tokens
            if res.tokens.is_cuda:
                la.cpu_tokens = torch.empty(res.tokens.shape, dtype=res.tokens.dtype, pin_memory=True)
                la.cpu_tokens.copy_(res.tokens, non_blocking=True)
                la.event = torch.cuda.Event()
                la.event.record()
            else:
                la.cpu_tokens = res.tokens
        return la

    # ------------------------------------------------------------ grammar masks
    def _start_masks(self, sb):
        """The grammar work of this step's constrained rows (grammar.StepMasks), started on a
        worker now when their last tokens are known, so it runs while the forward does;
        with overlap their last token is still in flight and the work waits for it (after
        the forward is launched, while the device runs it).  None when no row is constrained."""
        rows = [r for r, s in zip(sb.reqs, sb.sample) if s]
        if not any(r.grammar is not None for r in rows):
            return None
        from .grammar import MaskFiller, StepMasks

        words = next(r.grammar.backend.words for r in rows if r.grammar is not None)
        if self.masks is None or self.masks.words != words:
            self.masks = MaskFiller(words, self.device)
        job = StepMasks(self.masks, rows, self.cfg.max_model_len, self._inflight_host_tokens)
        if not job.waits_for_inflight:
            if self._mask_pool is None:
                import concurrent.futures

                self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="localsgl-masks")
            job.start(self._mask_pool)
        return job

    def _inflight_host_tokens(self) -> list[int]:
        la = self.inflight
        if la.event is not None:
            la.event.synchronize()
        return la.cpu_tokens.tolist()

    def _finish_masks(self, job, rows: list[Request], logits: torch.Tensor):
        """((positions, bitmasks, forced tokens), rows, logits) of a step.  If preparing the
        masks failed, its constrained requests end with "error" and the step goes on with
        the other rows (and their logits) alone."""
        try:
            if self.fault is not None:
                self.fault("grammar", [rows[j] for j in job.positions])
            return job.result(), rows, logits
        except Exception as e:
            log.error("grammar masks failed:\n%s", traceback.format_exc())
            self._fail([rows[j] for j in job.positions], e)
            keep = [j for j, r in enumerate(rows) if r.grammar is None]
            return None, [rows[j] for j in keep], logits[keep]

    def _sample(self, rows: list[Request], logits: torch.Tensor, deferred: bool, grammar=None):
        if self.fault is not None:
            self.fault("sample", rows)
        prev = self.inflight.tokens if self.inflight is not None else None  # placeholders' ids
        sbatch = SamplingBatch.build(
            params=[r.params for r in rows],
            prompt_ids=[r.prompt_ids for r in rows],
            output_ids=[r.output_ids for r in rows],
            generators=[r.generator for r in rows],
            eos_ids=self.eos_ids,
            vocab_size=self.vocab_size,
            device=logits.device,
            default_generator=self.default_generator,
            penalty_source=lambda pen: self.penalties.gather([rows[i] for i in pen], prev),
            constrained=frozenset(grammar[0]) if grammar is not None else frozenset(),
        )
        if grammar is not None:
            sbatch.set_grammar(grammar[0], grammar[1])
        return sample(logits, sbatch, use_kernels=self.gpu_sampling_kernels, defer=deferred)

    def _sample_each(self, rows: list[Request], logits: torch.Tensor, deferred: bool, err: Exception, grammar=None):
        """Sampling the batch raised: sample each row alone, so a request whose own sampling
        fails ends with "error" and the others get their tokens.  Returns (rows kept, result)."""
        log.warning("sampling %d rows failed (%s: %s); sampling them one by one", len(rows), type(err).__name__, err)
        kept: list[Request] = []
        parts = []
        where = {j: k for k, j in enumerate(grammar[0])} if grammar is not None else {}
        for j, r in enumerate(rows):
            k = where.get(j)
            one = ([0], grammar[1][k:k + 1], grammar[2]) if k is not None else None
            try:
                parts.append(self._sample([r], logits[j:j + 1], deferred, one))
                kept.append(r)
            except Exception as e:
                log.error("sampling failed for %s:\n%s", r.rid, traceback.format_exc())
                self._fail([r], e)
        if not parts:
            return kept, None
        res = SampleResult(token_ids=None if deferred else [t for p in parts for t in p.token_ids],
                           tokens=torch.cat([p.tokens for p in parts]))
        if any(p.logprobs is not None for p in parts):
            res.logprobs = [p.logprobs[0] if p.logprobs else None for p in parts]
            res.top_logprobs = [p.top_logprobs[0] if p.top_logprobs else None for p in parts]
        return kept, res

    def _step_kind(self, sb) -> str:
        if sb.decode_only:
            return "decode_" + self.runner.last_path
        return "mixed" if any(n == 1 for n in sb.extend_lens) else "prefill"

    # ------------------------------------------------------------ introspection
    def stats(self) -> dict:
        s = self.scheduler
        locked = sum(
            (r.kv_len - r.cached_len) for r in list(s.running)
        ) + self.cache.protected_size
        return {
            "running": s.num_running,
            "waiting": s.num_waiting,
            "kv_slots_total": self.kv_pool.num_slots,
            "kv_slots_used": self.kv_pool.num_slots - self.kv_pool.num_free,
            "kv_slots_locked": locked,
            "kv_slots_cached": self.cache.evictable_size + self.cache.protected_size,
            "cache_hit_tokens": self.cache.hit_tokens,
            "cache_query_tokens": self.cache.query_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "retractions_total": s.retractions_total,
            "steps": self.steps,
            **({"step_profile": self.profile.summary()} if self.profile is not None else {}),
        }


class _Launched:
    """A launched step whose sampled tokens may still be on the device."""

    __slots__ = ("rows", "slots", "result", "deferred", "tokens", "cpu_tokens", "event")

    def __init__(self, rows, slots, result, deferred):
        self.rows = rows
        self.slots = slots
        self.result = result
        self.deferred = deferred
        self.tokens = None
        self.cpu_tokens = None
        self.event = None
