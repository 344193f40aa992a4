"""xgrammar against llguidance on the default model's tokenizer and three JSON schemas of realistic shape: the
time to compile a schema, the time to compute one token's mask (median over a generation), and whether every
finished output is valid JSON of its schema. Logits are random (a bias towards quotes, braces and digits ends
strings): this measures the grammar engines, not a model. The choice of specdec/grammar.py rests on it.

    pip install xgrammar llguidance jsonschema && python bench/grammar_engines.py
"""
import json
import statistics
import time

import jsonschema
import torch

import specdec

_, tok = specdec.load("smollm2-135m-instruct")
V = 49152  # the model's vocabulary (the tokenizer's ids and none past them)
STEPS = 1500  # tokens at most a generation
SCHEMAS = {
    "api-response": {"type": "object", "required": ["status", "code", "data"], "properties": {
        "status": {"type": "string", "enum": ["ok", "error"]}, "code": {"type": "integer"},
        "data": {"type": "object", "required": ["id", "items"], "properties": {
            "id": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}}}}},
    "tool-call": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string", "enum": ["get_weather", "search"]},
        "arguments": {"type": "object", "required": ["city", "unit", "days"], "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}},
    "form": {"type": "object", "required": ["first_name", "last_name", "age", "email", "newsletter", "country"],
             "properties": {"first_name": {"type": "string"}, "last_name": {"type": "string"},
                            "age": {"type": "integer"}, "email": {"type": "string"}, "newsletter": {"type": "boolean"},
                            "country": {"type": "string", "enum": ["FR", "DE", "US", "JP"]}}},
}
ENDERS = torch.tensor([float(tok.decode([i]) in set('"},]0123456789')) * 6.0 for i in range(V)])  # [V]


def xgrammar_matcher(schema: str):
    """-> (fill(bitmask), apply(logits, bitmask), accept(id) -> bool, done() -> bool, bitmask)"""
    import xgrammar as xgr

    if not hasattr(xgrammar_matcher, "info"):
        xgrammar_matcher.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    compiled = xgr.GrammarCompiler(xgrammar_matcher.info, cache_enabled=False).compile_json_schema(
        schema, any_whitespace=False)
    m = xgr.GrammarMatcher(compiled)
    return (lambda mask: m.fill_next_token_bitmask(mask, 0), xgr.apply_token_bitmask_inplace, m.accept_token,
            m.is_terminated, xgr.allocate_token_bitmask(1, V))


def llguidance_matcher(schema: str):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    if not hasattr(llguidance_matcher, "tokenizer"):
        llguidance_matcher.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=V)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(llguidance_matcher.tokenizer, grammar)
    return (lambda mask: lt.fill_next_token_bitmask(m, mask, 0), lt.apply_token_bitmask_inplace, m.consume_token,
            m.is_stopped, lt.allocate_token_bitmask(1, V))


def run(make, schema: dict, seed: int):
    """One constrained generation from random logits: compile seconds, median mask seconds, tokens, valid."""
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    fill, apply, accept, done, mask = make(json.dumps(schema))
    compile_seconds = time.perf_counter() - start
    ids, times = [], []
    while len(ids) < STEPS and not done():
        logits = torch.randn(1, V, generator=g) * 3 + ENDERS
        start = time.perf_counter()
        fill(mask)
        apply(logits, mask)
        times.append(time.perf_counter() - start)
        token = int(torch.softmax(logits, -1).multinomial(1, generator=g))
        assert accept(token)
        ids.append(token)
    try:
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), schema)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    return compile_seconds, statistics.median(times), len(ids), valid


def main() -> None:
    print(f"| engine | schema | compile (ms) | mask (us/token) | tokens | finished | valid |\n|---|---|---|---|---|---|---|")
    for name, make in (("xgrammar", xgrammar_matcher), ("llguidance", llguidance_matcher)):
        run(make, SCHEMAS["form"], 99)  # the tokenizer's own setup, out of the timings
        for schema_name, schema in SCHEMAS.items():
            runs = [run(make, schema, seed) for seed in range(5)]
            print(f"| {name} | {schema_name} | {statistics.median(r[0] for r in runs) * 1e3:.1f} | "
                  f"{statistics.median(r[1] for r in runs) * 1e6:.0f} | {statistics.median(r[2] for r in runs):.0f} | "
                  f"{sum(r[2] < STEPS for r in runs)}/5 | {sum(r[3] for r in runs)}/5 |")


if __name__ == "__main__":
    main()
