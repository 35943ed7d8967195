"""A tokenizer read from saved files (tokenizer.json, tokenizer_config.json, a chat
template) with the ``tokenizers`` library and jinja2 alone.

Importing transformers costs a command ~1.3 s and pulls in huggingface_hub's download
code; what the engine and the front ends need of a tokenizer is small: encode, decode,
the special tokens, the chat template. transformers' own fast tokenizers wrap the same
``tokenizers.Tokenizer``, so for files that transformers itself wrote (the conversion
cache of GGUF files, convert_cache.py) encoding and decoding agree with it by
construction; chat templates render in the environment transformers gives them (a
sandboxed jinja2 with trim_blocks/lstrip_blocks, loop controls, ``{% generation %}``
blocks, ``tojson``, ``raise_exception``, ``strftime_now``), which tests compare.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' clean_up_tokenization (applied by decode when the config asks for it)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# names a message's reasoning travels under; templates read one of them
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # {"content": "<s>", ...} (AddedToken as saved by older transformers)
        v = v.get("content")
    return v if isinstance(v, str) else None


class LightTokenizer:
    """The subset of a transformers tokenizer's interface that localsgl uses."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None):
        self._tok = tokenizer
        self.init_kwargs = config
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers skips the clean-up for BPE models (it would eat real spaces) unless forced
        forced = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self._cleanup_skipped = type(tokenizer.model).__name__ == "BPE" and not forced
        self.model_max_length = config.get("model_max_length")
        for name in _SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))

    @classmethod
    def from_dir(cls, path: str | Path) -> "LightTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), config, template)

    # ids of the special tokens -----------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self._id(t) for t in self.all_special_tokens) if i is not None]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, **_ignored) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encs = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs]}

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and not self._cleanup_skipped:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(i) for i in ids if i not in special]

    # chat template ------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None, **kwargs):
        """Render the chat template (as transformers does); ids when ``tokenize``."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat template")
        messages = [_alias_reasoning(m) for m in conversation]
        text = _compile(template).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _alias_reasoning(message: dict) -> dict:
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses the
        block to mark assistant tokens for training masks; inference needs only the text)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

    class SafeNamespace(jinja2.utils.Namespace):
        """A namespace without underscore-prefixed attributes (no route to Python internals)."""

        def __setitem__(self, name, value):
            check_name(name)
            super().__setitem__(name, value)

    def namespace(*args, **kwargs):
        attrs = dict(*args, **kwargs)
        for name in attrs:
            check_name(name)
        return SafeNamespace(attrs)

    class DictConstructor:
        """``dict(...)`` and ``dict.fromkeys(...)`` for templates, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # not jinja's own filter: that one escapes HTML characters, which templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = namespace
    env.globals["dict"] = DictConstructor()
    return env.from_string(template)
