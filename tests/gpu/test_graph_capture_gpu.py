"""Decode graphs captured in stages give the same greedy tokens: an engine that never
captures past its start-up buckets (larger batches run eagerly), one that captures the rest
while these very requests decode, one that waits for every graph first, and one that captures
none before serving."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from model_utils import save_tiny_llama, staggered_requests  # noqa: E402
from localsgl import Engine  # noqa: E402
from localsgl.engine.debug_switches import DebugSwitches  # noqa: E402
from localsgl.engine.graph_schedule import STARTUP_MAX_BS  # noqa: E402
from localsgl.engine.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("staged"))


def test_partly_captured_engine_gives_the_fully_captured_tokens(checkpoint, monkeypatch):
    prompts, params = staggered_requests(1)
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

    # nothing captured before serving (LOCALSGL_DEBUG_STARTUP_GRAPH=0): the first decode steps
    # run eagerly, then their buckets are captured between steps
    monkeypatch.undo()
    with Engine(**kwargs, debug_switches=DebugSwitches(startup_graph=False)) as e:
        assert not e.core.runner.graphs.graphs
        deferred = [o.token_ids for o in e.generate(prompts, params)]
        assert e.wait_graphs(120) and e.core.runner.graphs.schedule.done

    assert live == full
    assert partial == full
    assert deferred == full
