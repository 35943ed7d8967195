"""A checkpoint directory's plain fast tokenizer (tokenizer.json as saved, Llama 3's kind)
loads without transformers and matches transformers' AutoTokenizer; other kinds still load
through transformers."""
from __future__ import annotations

import json
import random

import pytest

from localsgl.store import hf

transformers = pytest.importorskip("transformers")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "naïve café — 中文 🎉", "<|start|>user\nhi<|eot|>",
         "1234567890 3.14159", ""]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎨"}]]


def _save(d, tokenizer_class: str, extra: dict | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = ["hello", "world", "the", "quick", "brown", "fox", "café", "tabs", "lead", "space"]
    corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eot|>", "<|start|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eot|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(d))
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    cfg.update(extra or {})
    cfg_file.write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "TokenizersBackend"])
def test_plain_fast_tokenizer_loads_light_and_matches_transformers(tmp_path, cls):
    d = _save(tmp_path, cls)
    ours = hf.load_tokenizer(d)
    assert type(ours).__name__ == "LightTokenizer"
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert (ours.eos_token_id, ours.bos_token_id, len(ours)) == (ref.eos_token_id, ref.bos_token_id, len(ref))
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == ref(text, add_special_tokens=special)["input_ids"]
        ids = ref.encode(text + "<|eot|>", add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    for chat in CHATS:
        for gen in (True, False):
            kw = dict(add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, **kw) == ref.apply_chat_template(chat, **kw)


@pytest.mark.parametrize("cls,extra", [("LlamaTokenizerFast", None), ("PreTrainedTokenizerFast", {"add_bos_token": True}),
                                       ("PreTrainedTokenizerFast", {"add_prefix_space": True})])
def test_other_tokenizers_are_left_to_transformers(tmp_path, cls, extra):
    d = _save(tmp_path, cls, extra)
    assert not hf.plain_fast_tokenizer(d)
    if cls == "PreTrainedTokenizerFast":
        assert type(hf.load_tokenizer(d)).__name__ != "LightTokenizer"
