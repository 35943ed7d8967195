"""GPU: penalties from the device-side state keep overlap scheduling on and give the tokens of
the exact recomputation from the token lists (with the GPU sampling kernels)."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from model_utils import save_tiny_llama  # noqa: E402
from localsgl import Engine, SamplingParams  # noqa: E402
from test_penalties import ExactPenalties  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama_pen"))


class ExactOnDevice(ExactPenalties):
    def __init__(self, V, device):
        super().__init__(V)
        self.device = device

    def gather(self, reqs, prev=None):
        counts, mask = super().gather(reqs, None if prev is None else prev.cpu())  # syncs: a reference only
        return counts.to(self.device), None if mask is None else mask.to(self.device)


def run_penalised(model_dir, device, overlap, exact):
    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(rng.randrange(4, 120))] for _ in range(24)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i, max_tokens=40, ignore_eos=True,
                             repetition_penalty=rng.choice([1.1, 1.5]), frequency_penalty=rng.choice([0.0, 0.4]),
                             presence_penalty=rng.choice([0.0, 0.3])) for i in range(len(prompts))]
    with Engine(model=model_dir, device=device, dtype="float32", kv_memory="64MiB", disable_overlap=not overlap) as e:
        if exact:
            e.core.penalties = ExactOnDevice(e.core.vocab_size, e.device)
        in_flight = [0]
        forward = e.core.runner.forward

        def counting_forward(sb, prev_tokens=None):
            in_flight[0] += prev_tokens is not None
            return forward(sb, prev_tokens=prev_tokens)

        e.core.runner.forward = counting_forward
        outs = [o.token_ids for o in e.generate(prompts, params)]
        rows_left = e.core.penalties.num_rows
    return outs, in_flight[0], rows_left


def test_penalised_overlap_equals_exact_sync(saved):
    got, in_flight, rows_left = run_penalised(saved, "cuda", overlap=True, exact=False)
    ref, _, _ = run_penalised(saved, "cuda", overlap=False, exact=True)
    assert got == ref
    assert in_flight > 20, "penalised requests forced synchronous steps"
    assert rows_left == 0
