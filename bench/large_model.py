"""GPU mode of ``specdec bench``: a model of realistic size with random weights (Llama-3-8B shape, bfloat16).

Three figures, each about the system rather than a draft's quality:
- plain decode tokens/s against the HBM roofline (copy bandwidth measured in the same run / weight bytes);
- the cost of one verification pass over k + 1 tokens relative to one plain step, k = 1..8 (the number that
  decides whether speculation can pay: on a memory-bound step it stays near 1);
- synthetic-acceptance speedup curves for batch 1..64: drafts that the target accepts with a chosen
  probability and that cost nothing, so the curve is the best any draft of that acceptance could do, and
  the batch size where it falls under 1.0 is where speculation stops paying.

Random weights give near-uniform logits, and that is a trap for the synthetic proposer, which replays the
plain greedy output: in bfloat16 on a GPU the matrix products of a (k + 1)-token verification pass and of a
one-token step are tiled differently and round differently, and with near-uniform logits that flips argmax
near-ties. On an H200 with a plainly random model, every row departed from plain greedy within 64 tokens,
after which the replayed drafts were all wrong and the curves measured nothing. So the synthetic runs use a
*predictable* random model (``random_model(..., predictable=True)``): its greedy next token is a fixed random
permutation of the current one, with a margin of ~80 logits that no rounding reaches. Every layer still runs
in full on random weights of the full shape, so its timings are those of any model of that shape. On the CPU
the ``tiny`` preset runs the same code in seconds (tests/test_bench.py).
"""

from __future__ import annotations

import statistics

import torch

PRESETS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 500000.0}),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def random_model(preset: str, device, dtype, seed: int = 0, predictable: bool = False):
    """A native Llama of the preset's shape, weights ~ N(0, 0.02), made directly on ``device``.

    predictable: the layers' output projections scaled down 200x, so the residual stream stays the input
    token's embedding e (|e| = 0.02 sqrt(hidden)) plus ~1% of noise, and the output layer's row of token
    perm[x] set to e_x: the logit of perm[x] is |e|^2 / rms(e) = 0.02 * hidden (82 for Llama-3-8B) against
    ~N(0, 0.02 sqrt(hidden)) (1.3) for every other token. Greedy decoding walks the permutation."""
    from specdec.models.llama import LlamaModel
    from specdec.models.loading import _finish
    from transformers import LlamaConfig

    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaModel(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
        if predictable:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(0.005)
                layer.mlp.down_proj.weight.mul_(0.005)
            perm = torch.randperm(config.vocab_size, generator=gen, device=device)
            model.lm_head.weight[perm] = model.model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(device).float()
    return _finish(model, None, device=device)


def report(device="cuda", preset: str = "llama3-8b", dtype=torch.bfloat16, ks=range(1, 9),
           batch_sizes=(1, 2, 4, 8, 16, 32, 64), rates=(0.5, 0.7, 0.9), synthetic_k: int = 4, tokens: int = 64,
           prompt_len: int = 128, progress: bool = True, cuda_graphs: bool = False) -> dict:
    """cuda_graphs: the target replays its layers as CUDA graphs (``LlamaModel.use_cuda_graphs``); every
    generate() call captures its shapes anew, inside the timed region."""
    from specdec.bench.common import bandwidth_gbs, timed, verification_cost, weight_bytes
    from specdec.bench.harness import break_even
    from specdec.bench.methods import SyntheticProposer

    import specdec

    model = random_model(preset, device, dtype, predictable=True)
    if cuda_graphs:
        model.use_cuda_graphs()
    weights = weight_bytes(model)
    bandwidth = 1e9 * bandwidth_gbs(1024 if torch.device(device).type == "cuda" else 64, device=device)
    gen = torch.Generator().manual_seed(0)
    on_gpu = torch.device(device).type == "cuda"
    out = {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "cuda_graphs": cuda_graphs,
           "weight_bytes": weights, "bandwidth_gbs": bandwidth / 1e9,
           "device": torch.cuda.get_device_name() if on_gpu else "cpu"}

    def generate(ids, draft=None, k=4):  # -> (its output, seconds)
        return timed(lambda: specdec.generate(model, ids, draft_model=draft, num_draft_tokens=k,
                                              max_new_tokens=tokens, eos_token_id=[], do_sample=False,
                                              return_dict_in_generate=True), device)

    ids = torch.randint(3, model.vocab_size, (1, prompt_len), generator=gen).to(device)
    generate(ids)  # warm-up: kernel compilation, allocator
    plain = statistics.median(generate(ids)[1] for _ in range(3))
    out["plain_tokens_per_s"] = tokens / plain
    out["roofline_tokens_per_s"] = bandwidth / weights
    out["fraction_of_roofline"] = out["plain_tokens_per_s"] / out["roofline_tokens_per_s"]
    out["verification_cost"] = verification_cost(model, list(ks), context=512, repeats=10, device=device)
    if progress:
        costs = ", ".join(f"k={k}: {v:.2f}" for k, v in out["verification_cost"].items())
        print(f"plain {out['plain_tokens_per_s']:.1f} tok/s = {100 * out['fraction_of_roofline']:.0f}% of the "
              f"roofline; verification pass / plain step: {costs}", flush=True)

    curves = {}
    for batch in batch_sizes:
        ids = torch.randint(3, model.vocab_size, (batch, prompt_len), generator=gen).to(device)
        reference, plain_s = generate(ids)
        rows = [seq for seq in reference.sequences]  # no padding: every prompt has prompt_len tokens
        speedups, departed = [], []
        for rate in rates:
            proposer = SyntheticProposer(rows, rate, torch.Generator().manual_seed(batch))
            res, secs = generate(ids, proposer, synthetic_k)
            # counted, not raised: a departure is a finding to report beside the timings (a verification
            # pass over k + 1 tokens whose argmax differs from the one-token step's, e.g. a near-tie that
            # another matrix-product tiling rounds the other way), and the run goes on
            departed.append(int((res.sequences != reference.sequences).any(dim=1).sum()))
            speedups.append(plain_s / secs)
        curves[batch] = {"plain_tokens_per_s": batch * tokens / plain_s, "rates": list(rates),
                         "speedups": speedups, "break_even_rate": break_even(list(rates), speedups),
                         "rows_departed": departed}
        if progress:
            print(f"batch {batch}: plain {batch * tokens / plain_s:.0f} tok/s, synthetic speedups "
                  + ", ".join(f"{r:g}: {s:.2f}x" for r, s in zip(rates, speedups))
                  + (f"; \x1b[31m{sum(departed)} row(s) departed from plain greedy\x1b[0m" if sum(departed) else ""),
                  flush=True)
    out["synthetic"] = {"k": synthetic_k, "curves": curves}
    out["mismatches"] = sum(sum(c["rows_departed"]) for c in curves.values())
    return out
