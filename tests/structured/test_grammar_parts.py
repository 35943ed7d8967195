"""engine/grammar.py parts on their own: compile errors and limits, the matcher state's
verdicts, the bitmask application, the reasoning wrapper, the mask filler."""
from __future__ import annotations

import json
import time

import pytest
import torch

from localsgl.engine.grammar import GrammarBackend, GrammarLimits, GrammarState, MaskFiller, wrap_after_reasoning
from localsgl.engine.params import InvalidRequestError, SamplingParams
from localsgl.engine.sampling import apply_token_bitmask

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(bits_row: torch.Tensor, vocab: int) -> set[int]:
    x = bits_row.to(torch.int64) & 0xFFFFFFFF
    return {32 * w + j for w in range(x.numel()) for j in range(32) if (int(x[w]) >> j) & 1 and 32 * w + j < vocab}


@pytest.mark.parametrize("kw, field, words", [
    ({"json_schema": {"type": "nope"}}, "json_schema", "Invalid type"),
    ({"json_schema": '{"type": '}, "json_schema", "not valid JSON"),
    ({"json_schema": {"type": "string", "format": "no-such-format"}}, "json_schema", "format"),
    ({"json_schema": {"$ref": "#/definitions/missing"}}, "json_schema", "missing"),
    ({"json_schema": {"type": "string", "pattern": "(("}}, "json_schema", "regex"),
    ({"json_schema": [1, 2]}, "json_schema", "JSON object"),
    ({"regex": "a(("}, "regex", "unclosed group"),
    ({"regex": ""}, "regex", "non-empty"),
    ({"grammar": "start: undefined_rule"}, "grammar", "unknown name"),
    ({"grammar": "root ::= (\"a\""}, "grammar", "grammar"),
    ({"grammar": '{"grammars": []}'}, "grammar", "grammars"),
    ({"json_schema": {"type": "object"}, "json_whitespace": "wide"}, "json_whitespace", "compact or pretty"),
])
def test_invalid_constraints_name_the_field(backend, kw, field, words):
    with pytest.raises(InvalidRequestError) as e:
        p = SamplingParams(**kw)
        p.validate()
        backend.compile(p)
    assert e.value.param == field
    assert words.lower() in str(e.value).lower()


def test_hostile_inputs_are_refused_quickly(backend):
    deep: dict = {"type": "integer"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    huge_enum = {"enum": [f"value-{i}" for i in range(200_000)]}
    for schema, words in ((deep, "deeply"), (huge_enum, "too large")):
        with pytest.raises(InvalidRequestError, match=words):
            backend.compile(SamplingParams(json_schema=schema))


def test_compile_time_limit(tokenizer, monkeypatch):
    """A compile that outlives the limit is refused; the compile is made slow on purpose,
    since a real one can finish inside any limit on a fast machine (a 0 s limit raced it)."""
    be = GrammarBackend(tokenizer, 49152, [2], limits=GrammarLimits(compile_seconds=0.2))
    be.ll_tokenizer
    real = be._compile

    def slow(text, ll):
        time.sleep(1.0)
        return real(text, ll)

    monkeypatch.setattr(be, "_compile", slow)
    with pytest.raises(InvalidRequestError, match="longer than 0.2 s"):
        be.compile(SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "string"}}}))


def test_compiled_grammars_are_cached_and_states_independent(backend, tokenizer):
    a = backend.compile(SamplingParams(json_schema=PERSON))
    b = backend.compile(SamplingParams(json_schema=PERSON))
    assert a.template is b.template
    s1, s2 = a.new_state(), a.new_state()
    s1.consume(enc(tokenizer, '{"name":"Al'))
    assert s2.consumed == 0 and s1.consumed > 0
    assert not s1.ended and not s2.ended


def test_state_verdicts(backend, tokenizer):
    g = backend.compile(SamplingParams(regex="ab|abc")).new_state()
    ids = enc(tokenizer, "ab")
    assert g.after(0, ids[0]) in ("ok", "complete")
    # a refused token ends the output before it
    g = backend.compile(SamplingParams(regex="[0-9]+")).new_state()
    one = enc(tokenizer, "1")
    x = enc(tokenizer, "x")
    assert g.after(0, one[0]) == "ok"
    assert g.after(1, x[0]) == "reject"
    assert g.end_at == 1 and g.end_error
    assert g.verdict(2) == "reject"
    # a complete grammar ends with its last token
    g = backend.compile(SamplingParams(regex="yes")).new_state()
    ids = enc(tokenizer, "yes")
    verdicts = [g.after(i, t) for i, t in enumerate(ids)]
    assert verdicts[-1] == "complete" and set(verdicts[:-1]) <= {"ok"}
    # tokens fed ahead (overlap) give the same verdicts when they resolve
    h = backend.compile(SamplingParams(regex="yes")).new_state()
    h.consume(ids)
    assert [h.after(i, t) for i, t in enumerate(ids)] == verdicts


def test_json_is_compact_unless_pretty(backend, tokenizer):
    compact = backend.compile(SamplingParams(json_schema=PERSON)).new_state()
    compact.consume(enc(tokenizer, '{"name":"Al",'))
    assert not compact.ended
    spaced = backend.compile(SamplingParams(json_schema=PERSON)).new_state()
    spaced.consume(enc(tokenizer, '{ "name": "Al"'))
    assert spaced.end_error is not None
    pretty = backend.compile(SamplingParams(json_schema=PERSON, json_whitespace="pretty")).new_state()
    pretty.consume(enc(tokenizer, '{\n  "name": "Al",\n  "age": 3\n}'))
    assert pretty.end_error is None
    # padding is bounded: a long run of spaces is refused
    padded = backend.compile(SamplingParams(json_schema=PERSON, json_whitespace="pretty")).new_state()
    padded.consume(enc(tokenizer, "{" + " " * 60))
    assert padded.end_error is not None


def test_schema_x_guidance_overrides_compact(backend, tokenizer):
    schema = {**PERSON, "x-guidance": {"whitespace_flexible": True}}
    g = backend.compile(SamplingParams(json_schema=schema)).new_state()
    g.consume(enc(tokenizer, '{ "name" : "Al" , "age" : 3 }'))
    assert g.end_error is None


def test_apply_token_bitmask_matches_reference():
    torch.manual_seed(0)
    B, V = 5, 100  # V not a multiple of 32
    logits = torch.randn(B, V)
    words = (V + 31) // 32
    rows = [1, 3, 4]
    allow = [torch.rand(V) < 0.3 for _ in rows]
    allow[1][:] = False
    allow[1][V - 1] = True  # the last token alone
    bits = torch.zeros(len(rows), words, dtype=torch.int64)
    for k, a in enumerate(allow):
        for t in a.nonzero().view(-1).tolist():
            bits[k, t // 32] |= 1 << (t % 32)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    out = apply_token_bitmask(logits, torch.tensor(rows), bits)
    ref = logits.clone()
    for k, r in enumerate(rows):
        ref[r][~allow[k]] = float("-inf")
    assert torch.equal(out, ref)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    full = apply_token_bitmask(logits[:3], None, bits)  # every row constrained
    for k in range(3):
        assert torch.equal(full[k], logits[k].masked_fill(~allow[k], float("-inf")))
    short = apply_token_bitmask(logits[:3], None, bits[:, :2])  # tokens past 32 * words: never allowed
    for k in range(3):
        a = allow[k].clone()
        a[64:] = False
        assert torch.equal(short[k], logits[k].masked_fill(~a, float("-inf")))
    half = apply_token_bitmask(logits[:3].half(), None, bits)
    assert half.dtype == torch.float16 and torch.equal(half.isinf(), full.isinf())


def test_mask_filler_forced_and_ended_rows(backend, tokenizer):
    V = backend.vocab_size
    filler = MaskFiller(backend.words, torch.device("cpu"), threads=1)
    free = backend.compile(SamplingParams(regex="[ab]")).new_state()
    ended = backend.compile(SamplingParams(regex="[ab]")).new_state()
    ended.consume(enc(tokenizer, "q"))
    assert ended.ended
    forced_row = backend.compile(SamplingParams(regex="[ab]")).new_state()
    bits, _ = filler.fill([free, ended, forced_row], {2: 1234}, eos=2)
    a, b = enc(tokenizer, "a")[0], enc(tokenizer, "b")[0]
    assert {a, b} <= allowed(bits[0], V)
    assert allowed(bits[1], V) == {2}
    assert allowed(bits[2], V) == {1234}


def test_vocab_padding_beyond_the_tokenizer(tokenizer):
    """A model vocabulary larger than the tokenizer's (padded LM head, or a dummy model with a
    smaller tokenizer): the masks cover it and never allow the extra ids."""
    be = GrammarBackend(tokenizer, 128_256, [2])
    assert be.vocab_size == 128_256 and be.words == (128_256 + 31) // 32
    g = be.compile(SamplingParams(json_schema={"type": "object"})).new_state()
    bits, _ = MaskFiller(be.words, torch.device("cpu"), threads=1).fill([g], {}, eos=2)
    ok = allowed(bits[0], be.vocab_size)
    assert ok and max(ok) < len(tokenizer)


def test_reasoning_wrapper(backend, tokenizer):
    """Free reasoning first, then the constrained answer; a prompt that opened the reasoning
    continues it."""
    from localsgl.engine.grammar import grammar_source

    _, top = grammar_source(SamplingParams(json_schema=PERSON))
    ll = backend.ll_tokenizer
    import llguidance

    def accepts(grammar: dict, text: str) -> bool:
        m = llguidance.LLMatcher(ll, json.dumps(grammar))
        assert not m.is_error(), m.get_error()
        ids = enc(tokenizer, text)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    outer = wrap_after_reasoning(top, "<think>", "</think>", inside=False, special={})
    answer = '{"name":"Al","age":3}'
    assert accepts(outer, answer)
    assert accepts(outer, "<think>\nlet me see {not json}\n</think>\n\n" + answer)
    assert not accepts(outer, "<think>\nhm\n</think>\n\nnot json")
    inner = wrap_after_reasoning(top, "<think>", "</think>", inside=True, special={})
    assert accepts(inner, "so: {x}\n</think>\n" + answer)
    assert not accepts(inner, answer + "trailing")


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        GrammarBackend(None, 100, [0])
