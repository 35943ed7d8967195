"""Opt-in per-step timing (the ``profile_steps`` debug switch, ``LOCALSGL_DEBUG_PROFILE_STEPS=1``): where a step's wall time goes.

Benchmarks need to know whether a workload is bound by the GPU or by the engine's
own Python (scheduling, batch building, token bookkeeping).  Each step records the
host time of its phases and, on CUDA, the device time between two events around
the forward and sampling; the events are read only after the step's tokens were
synchronised anyway, so profiling adds no sync of its own.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


class StepProfile:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = defaultdict(float)  # phase -> seconds
        self.cpu = defaultdict(float)  # phase -> CPU seconds of the engine thread (wall minus waits)
        self._cpu0 = None
        self.kinds = defaultdict(lambda: [0, 0, 0.0])  # kind -> [steps, tokens, device seconds]
        self._pending: list[tuple[str, int, object, object]] = []
        self.t_first = None
        self.t_last = None

    def tick(self) -> float:
        self._cpu0 = time.thread_time()
        return time.perf_counter()

    def add_host(self, phase: str, t0: float) -> float:
        t = time.perf_counter()
        c = time.thread_time()
        if self._cpu0 is not None:
            self.cpu[phase] += c - self._cpu0
        self._cpu0 = c
        self.host[phase] += t - t0
        if self.t_first is None:
            self.t_first = t0
        self.t_last = t
        return t

    def start_device(self):
        if not self.cuda:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def end_device(self, kind: str, tokens: int, start) -> None:
        k = self.kinds[kind]
        k[0] += 1
        k[1] += tokens
        if start is not None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._pending.append((kind, tokens, start, e))
        if len(self._pending) > 64:
            self.collect()

    def collect(self) -> None:
        keep = []
        for kind, tokens, s, e in self._pending:
            if e.query():
                self.kinds[kind][2] += s.elapsed_time(e) / 1e3
            else:
                keep.append((kind, tokens, s, e))
        self._pending = keep

    def summary(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        self.collect()
        wall = (self.t_last - self.t_first) if self.t_first is not None else 0.0
        return {
            "wall_s": round(wall, 3),
            "host_s": {k: round(v, 3) for k, v in sorted(self.host.items())},
            "cpu_s": {k: round(v, 3) for k, v in sorted(self.cpu.items())},
            "kinds": {k: {"steps": v[0], "tokens": v[1], "device_s": round(v[2], 3),
                          "ms_per_step": round(1e3 * v[2] / max(v[0], 1), 3)} for k, v in sorted(self.kinds.items())},
        }
