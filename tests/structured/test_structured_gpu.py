"""GPU: structured decoding with overlap scheduling, CUDA graphs and pinned mask uploads
(the embedded model on the GPU).  Outputs validate and are the same with and without
overlap; free requests in a mixed batch keep their greedy text; forced tokens still save
steps when the matcher waits for the in-flight token.

Run on the device machine: TESTS=tests/structured/test_structured_gpu.py bash scripts/device_check.sh quick"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

jsonschema = pytest.importorskip("jsonschema")

from localsgl import Engine, SamplingParams  # noqa: E402
from localsgl.store.aliases import embedded_gguf_path  # noqa: E402

try:
    embedded_gguf_path()
except Exception as e:  # the embedded model's package (94 MB) is too large to travel to a device
    pytest.skip(f"needs the embedded model: {e}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_engine_grammar import LONG_KEYS  # noqa: E402
from test_json_schemas import generated_schemas  # noqa: E402

FREE = ["The capital of France is", "Water boils at", "My favourite colour is", "Once upon a time"]


def outputs(engine, schemas):
    ids = engine.apply_chat_template([{"role": "user", "content": "Reply with a small JSON example."}])
    return engine.generate([ids] * len(schemas), [SamplingParams(json_schema=s, temperature=0, max_tokens=200)
                                                  for s in schemas])


@pytest.fixture(scope="module")
def engines():
    kw = dict(model="smollm2-135m", device="cuda", max_model_len=1024, kv_memory="1GiB")
    on, off = Engine(**kw), Engine(**kw, disable_overlap=True)
    assert on.core.overlap and not off.core.overlap
    on.wait_graphs()
    off.wait_graphs()
    yield on, off
    on.shutdown()
    off.shutdown()


def test_schemas_validate_and_overlap_changes_nothing(engines):
    on, off = engines
    schemas = generated_schemas(24)
    a, b = outputs(on, schemas), outputs(off, schemas)
    for s, x, y in zip(schemas, a, b):
        assert x.finish_reason == "stop", x.text
        jsonschema.validate(json.loads(x.text), s)
        assert (x.text, x.token_ids) == (y.text, y.token_ids)
    assert on.core.masks.fills > 0


def test_mixed_batch_keeps_free_greedy_text(engines):
    """The same batch shape both times (the constrained rows run the same number of tokens
    as the free ones they replace), so only the masks differ."""
    on, _ = engines
    n = 24
    free = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    endless = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}
    other = ["JSON one:", "JSON two:", "JSON three:", "JSON four:"]
    plain = on.generate(FREE + other, free)
    mixed = on.generate(FREE + other, [free] * 4 + [SamplingParams(json_schema=endless, temperature=t, max_tokens=n)
                                                   for t in (0, 1, 0, 1)])
    assert [o.token_ids for o in mixed[:4]] == [o.token_ids for o in plain[:4]]
    assert all(o.text.startswith("[") and len(o.token_ids) == n for o in mixed[4:])


def test_forced_tokens_with_overlap(engines):
    on, _ = engines
    before = on.core.steps
    o = on.generate("Long keys:", SamplingParams(json_schema=LONG_KEYS, temperature=0, max_tokens=80))
    steps = on.core.steps - before
    assert o.finish_reason == "stop"
    json.loads(o.text)
    assert steps < len(o.token_ids) / 2, (steps, len(o.token_ids))
