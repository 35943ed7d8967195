"""Decode graphs captured in stages give the same greedy tokens: an engine that never
captures past its start-up buckets (larger batches run eagerly), one that captures the rest
while these very requests decode, and one that waits for every graph first."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from localsgl import Engine, SamplingParams  # noqa: E402
from localsgl.engine.graph_schedule import STARTUP_MAX_BS  # noqa: E402
from localsgl.engine.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    d = tmp_path_factory.mktemp("staged")
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return str(d)


def test_partly_captured_engine_gives_the_fully_captured_tokens(checkpoint, monkeypatch):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 64, 200, 9, 33, 5, 80, 41, 12, 7, 150)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (24, 30, 12, 28, 20, 26, 16, 32, 22, 18, 14, 10)]
    kwargs = dict(model=checkpoint, device="cuda", dtype="float32", kv_memory="64MiB")

    with Engine(**kwargs) as e:  # every graph first
        assert e.wait_graphs(120)
        graphs = e.core.runner.graphs
        assert len(graphs.schedule.planned_sizes) > 4 and graphs.schedule.done
        full = [o.token_ids for o in e.generate(prompts, params)]
        assert e.graphs_ready_after_weights_seconds >= e.ready_after_weights_seconds

    with Engine(**kwargs) as e:  # the rest captured between these requests' steps
        live = [o.token_ids for o in e.generate(prompts, params)]
        assert e.wait_graphs(120)

    eager_sizes = []
    real = ModelRunner._forward_eager

    def spy(self, sb, prev_tokens):
        if sb.decode_only:
            eager_sizes.append(len(sb.reqs))
        return real(self, sb, prev_tokens)

    monkeypatch.setattr(ModelRunner, "graphs_pending", property(lambda self: False))  # no capture after start-up
    monkeypatch.setattr(ModelRunner, "_forward_eager", spy)
    with Engine(**kwargs) as e:
        sched = e.core.runner.graphs.schedule
        assert sched.captured == set(sched.startup) and not sched.done
        partial = [o.token_ids for o in e.generate(prompts, params)]
        assert e.graphs_ready_after_weights_seconds is None
    assert eager_sizes and min(eager_sizes) > STARTUP_MAX_BS  # only batches beyond the start-up buckets

    assert live == full
    assert partial == full
