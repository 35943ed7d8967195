"""50 generated JSON schemas through the embedded model: every output parses and validates
(jsonschema), at temperature 0 and 1, run as concurrent batches.

The schemas bound every output (strings by maxLength or a pattern, arrays by maxItems,
numbers by multipleOf, objects closed by additionalProperties false) so that each finishes
well within max_tokens."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from localsgl import SamplingParams

N_SCHEMAS = 50
MAX_TOKENS = 200


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["int", "num", "bool", "enum", "str", "pattern", "null", "const"])
    if kind == "int":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "num":  # multipleOf bounds the digits: a bare number may run on (1.0000…) to max_tokens
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100]), "multipleOf": rng.choice([0.5, 0.25])}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "north", "south", "yes", "no"], rng.randint(2, 4))}
    if kind == "str":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(3, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[A-Z][a-z]{1,8}$", "^[0-9]{3}-[0-9]{2}$"])}
    if kind == "null":
        return {"type": "null"}
    return {"const": rng.choice(["v1", 7, True])}


def _value(rng: random.Random, depth: int) -> dict:
    r = rng.random()
    if depth < 2 and r < 0.25:
        return _object(rng, depth + 1)
    if depth < 2 and r < 0.45:
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "city", "score", "tags", "ok", "color", "items", "meta", "when", "kind"],
                       rng.randint(1, 4))
    props = {n: _value(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def generated_schemas(n: int = N_SCHEMAS, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = _object(rng)
        if i % 10 == 9:  # a few whose root is an array of objects
            s = {"type": "array", "items": s, "minItems": 1, "maxItems": 2}
        out.append(s)
    return out


def test_schemas_are_varied():
    text = json.dumps(generated_schemas())
    for feature in ('"additionalProperties": false', '"enum"', '"pattern"', '"minimum"', '"maxItems"', '"required": []',
                    '"type": "number"', '"type": "array"', '"const"'):
        assert feature in text, feature
    nested = sum('"properties"' in json.dumps(p) for s in generated_schemas() for p in s.get("properties", {}).values())
    assert nested >= 5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_validates(engine, temperature):
    schemas = generated_schemas()
    prompts = [[{"role": "user", "content": "Reply with a small JSON example."}]] * len(schemas)
    params = [SamplingParams(json_schema=s, temperature=temperature, seed=i, max_tokens=MAX_TOKENS)
              for i, s in enumerate(schemas)]
    ids = [engine.apply_chat_template(p) for p in prompts]
    outs = engine.generate(ids, params)
    for s, o in zip(schemas, outs):
        assert o.finish_reason == "stop", (o.finish_reason, o.text, s)
        value = json.loads(o.text)
        jsonschema.validate(value, s)
        assert not _whitespace_outside_strings(o.text), o.text  # compact by default


def _whitespace_outside_strings(text: str) -> bool:
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in " \t\r\n":
            return True
    return False


def test_pretty_output_parses(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "temps": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "temps", "sunny"], "additionalProperties": False}
    outs = engine.generate(["Weather as JSON:"] * 2, [SamplingParams(json_schema=schema, json_whitespace="pretty",
                                                                   temperature=t, seed=5, max_tokens=MAX_TOKENS)
                                                    for t in (0.0, 1.0)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
