"""Weights that stream in beside the engine's start (models/loader.py WeightsInFlight: the KV
pool and the first decode graph are built while the parameters fill) give the tokens of a
load that finishes first."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from model_utils import save_tiny_llama, staggered_requests  # noqa: E402
from localsgl import Engine  # noqa: E402
from localsgl.engine.models import loader  # noqa: E402


def test_weights_streamed_beside_the_start_give_the_tokens_of_a_load_first(tmp_path, monkeypatch):
    checkpoint = save_tiny_llama(tmp_path)
    prompts, params = staggered_requests(2)
    kwargs = dict(model=checkpoint, device="cuda", dtype="float32", kv_memory="64MiB")
    started = []
    real_init = loader.WeightsInFlight.__init__

    def spy(self, *a, **k):
        started.append(True)
        real_init(self, *a, **k)

    monkeypatch.setattr(loader.WeightsInFlight, "__init__", spy)
    with Engine(**kwargs) as e:
        beside = [o.token_ids for o in e.generate(prompts, params)]
    assert started, "the checkpoint did not stream in beside the start"

    monkeypatch.setattr(loader, "_streamed", lambda *a, **k: None)  # loaded before anything else
    with Engine(**kwargs) as e:
        first = [o.token_ids for o in e.generate(prompts, params)]
    assert len(started) == 1
    assert beside == first
