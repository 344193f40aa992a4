"""The ``specdec`` command line: ``specdec generate [PROMPT]`` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
DEFAULT_HEAD = "smollm2-135m-instruct-head"  # the default model's draft head (models/smollm2-135m-instruct-head)


class _Timing:
    """A streamer that times the stream and forwards it: the first put after the prompt ends the prefill step,
    so decoding speed counts the tokens after it over the time after it."""

    def __init__(self, forward=None):
        self.forward, self.puts, self.first_tokens = forward, [], 0

    def put(self, value):
        self.puts.append(time.perf_counter())
        if len(self.puts) == 2:  # (the first put is the prompt)
            self.first_tokens = value.numel()
        if self.forward is not None:
            self.forward.put(value)

    def end(self):
        self.puts.append(time.perf_counter())
        if self.forward is not None:
            self.forward.end()

    @property
    def prefill_seconds(self) -> float:
        return self.puts[1] - self.puts[0] if len(self.puts) > 2 else 0.0

    def decode_rate(self, emitted: int) -> float | None:
        """Tokens per second after the first step (its prefill is a one-time cost of the prompt)."""
        if len(self.puts) < 3 or emitted <= self.first_tokens or self.puts[-1] <= self.puts[1]:
            return None
        return (emitted - self.first_tokens) / (self.puts[-1] - self.puts[1])


def _draft_name(model: str, draft: str | None) -> str | None:
    """--draft left out: the default model's shipped head, n-gram lookup for any other; 'none': plain."""
    draft = draft if draft is not None else (DEFAULT_HEAD if model == DEFAULT_MODEL else "ngram")
    return None if draft in ("none", "") else draft


def _num_draft_tokens(k: str):
    if k == "auto":
        return k
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"-k/--num-draft-tokens must be an integer >= 1 or 'auto', got {k!r}")
    return int(k)


def _prompt_ids(args, tokenizer):
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if tokenizer.chat_template and not args.no_chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _generate(args) -> int:
    """Speculative decoding streamed, its statistics, then plain decoding of the same prompt: the speedup, and
    (greedy) whether the outputs are identical. One-time costs are reported apart from decoding speed.
    Under torchrun (``torchrun --nproc-per-node N -m specdec generate ...``) the target is split over the ranks."""
    import specdec
    from specdec.kernels import cpu
    from specdec.models.loading import checkpoint_folder, load_draft

    k = _num_draft_tokens(args.num_draft_tokens)
    draft_name = _draft_name(args.model, args.draft)
    costs, tick = {}, time.perf_counter()
    checkpoint_folder(args.model)  # a GGUF file is converted to a float checkpoint on its first use, then cached
    costs["checkpoint"], tick = time.perf_counter() - tick, time.perf_counter()
    model, tokenizer = specdec.load(args.model, dtype=args.dtype, quantize=args.quantize,
                                    activations=args.activations)
    draft = load_draft(draft_name, args.dtype) if draft_name else None
    costs["loading"], tick = time.perf_counter() - tick, time.perf_counter()
    if model.device.type == "cpu":
        cpu.available()  # builds the C kernels on a machine's first run
        costs["C kernels"], tick = time.perf_counter() - tick, time.perf_counter()
    with _tensor_parallel(model):
        return _compare(args, model, tokenizer, draft, draft_name, k, costs, tick)


@contextlib.contextmanager
def _tensor_parallel(model):
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPUs, NCCL on GPUs; a peer silent for
    parallel.TIMEOUT seconds fails the collective), keep this rank's share of ``model`` (specdec/parallel.py), and
    let rank 0 alone print; every rank computes alike. Without torchrun: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch.distributed as dist

    from specdec.parallel import TIMEOUT, shard

    dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        shard(model)
        with open(os.devnull, "w") as devnull, contextlib.ExitStack() as quiet:
            if dist.get_rank() != 0:
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
            yield
    finally:
        dist.destroy_process_group()


def _compare(args, model, tokenizer, draft, draft_name, k, costs, tick) -> int:
    """generate's run and report, from the loaded models on (see _generate)."""
    import torch
    from transformers import TextStreamer

    import specdec

    ids = _prompt_ids(args, tokenizer)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k)

    def run(draft_model, streamer, max_new_tokens=args.max_new_tokens):
        return specdec.generate(model, ids, torch.ones_like(ids), draft_model=draft_model, num_draft_tokens=k,
                                max_new_tokens=max_new_tokens, **sampling, streamer=streamer,
                                generator=torch.Generator().manual_seed(args.seed), return_dict_in_generate=True)

    for warm in dict.fromkeys((draft, None)):  # warm-up: the first call of each path below (in order: ranks alike)
        run(warm, None, max_new_tokens=min(8, args.max_new_tokens))
    costs["warm-up"] = time.perf_counter() - tick
    timing = _Timing(TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    out = run(draft, timing)
    label = f"{args.model}, {model.dtype}, " + (f"draft {draft_name}, k = {k}" if draft else "plain decoding")
    print(f"\n-- {label}: {out.stats.emitted} tokens, decoding {_rate(timing.decode_rate(out.stats.emitted))}",
          file=sys.stderr)
    if draft is None:
        print(out.stats, file=sys.stderr)
        _print_costs(costs, timing)
        return 0
    plain_timing = _Timing()
    plain = run(None, plain_timing)
    print(out.stats, file=sys.stderr)
    budget = out.stats.round_budget(plain.stats.round_seconds)
    if budget:
        print(f"{'round budget':<25}  {budget['round']:.2f} plain steps = verify {budget['verify']:.2f} + draft "
              f"{budget['draft']:.2f} + rest {budget['rest']:.2f}", file=sys.stderr)
    spec_rate, plain_rate = timing.decode_rate(out.stats.emitted), plain_timing.decode_rate(plain.stats.emitted)
    print(f"-- plain decoding of the same prompt: {plain.stats.emitted} tokens, decoding {_rate(plain_rate)}",
          file=sys.stderr)
    speedup = (f"speedup {spec_rate / plain_rate:.2f}x over plain decoding" if spec_rate and plain_rate
               else "too few tokens to time decoding")
    same = torch.equal(out.sequences, plain.sequences)
    if not sampling["do_sample"]:
        verdict = ("the two outputs are identical, token for token" if same else
                   "WARNING: the greedy outputs differ (a bug: speculative greedy must equal plain greedy)")
    else:
        verdict = "sampled: both follow the target's distribution, the draws differ"
    print(f"-- {speedup}; {verdict}", file=sys.stderr)
    _print_costs(costs, timing)
    return 0 if same or sampling["do_sample"] else 1


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f} tokens/s"


def _print_costs(costs: dict, timing: _Timing) -> None:
    costs = dict(costs, prefill=timing.prefill_seconds)
    print("-- not in the speeds above (one-time costs; a machine's first run converts the GGUF and builds the C "
          "kernels, both cached for later runs): " + ", ".join(f"{name} {s:.2f} s" for name, s in costs.items()),
          file=sys.stderr)


DISTILL_HELP = {
    "self_prompts": "add N prompts the target writes itself (sampled from its chat template's empty user turn)",
    "max_prompt_tokens": "longest self-written prompt in tokens (default 64; longer samples are dropped)",
}


def _distill(args) -> int:
    import dataclasses

    from specdec.distill import HEAD, DistillConfig, distill
    from specdec.stats import speedup

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "head"}
    config = DistillConfig(**{**(HEAD if args.head else {}), **given})
    report = distill(args.target, args.out, config, resume=args.resume, device=args.device)
    per_k = report["tokens_per_target_forward"]
    best = max(per_k, key=lambda k: speedup(per_k[k], int(k), report["cost_ratio_c"]))
    agreement = report.get("agreement", report.get("first_draft_agreement"))
    print(f"held-out greedy agreement {agreement:.3f} over {report['answer_tokens']} answer tokens; "
          f"c = {report['cost_ratio_c']:.3f}; tokens per target forward at k={best}: {per_k[best]:.2f}; "
          f"{'head' if args.head else 'draft'} saved in {args.out}", file=sys.stderr)
    return 0


def _bench(args) -> int:
    import dataclasses
    from pathlib import Path

    from specdec.bench.harness import BenchConfig, configure, main

    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if k in fields and v is not None}
    if args.draft in ("none", ""):
        given["draft"] = None
    if args.head in ("none", ""):
        given["head"] = None
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick is --preset quick; got --preset {args.preset!r} beside it")
    config = configure("quick" if args.quick else args.preset, **given)
    main(config, json_path=Path(args.json) if args.json else None, plot_dir=Path(args.plot) if args.plot else None)
    return 0


def _serve(args) -> int:
    from specdec.server import serve

    k = _num_draft_tokens(args.num_draft_tokens)
    return serve(args.model, _draft_name(args.model, args.draft), host=args.host, port=args.port, num_draft_tokens=k,
                 max_num_seqs=args.max_num_seqs, kv_blocks=args.kv_blocks, block_size=args.block_size,
                 max_queued=args.max_queued, dtype=args.dtype, quantize=args.quantize,
                 activations=args.activations, grace_seconds=args.grace, tensor_parallel=args.tensor_parallel,
                 replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas)


def _target_arguments(parser) -> None:
    """The target's flags, as generate and serve take them."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name, checkpoint folder or .gguf file")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float64"],
                        help="of the target (default float32); auto: the file's own (a .gguf keeps its quantized "
                             "blocks; see --activations)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantize the target's linear layers at load")
    parser.add_argument("--activations", choices=["int8", "float"], default="int8",
                        help="what quantized layers multiply with (int8: blocks of 32, as llama.cpp; float: exact "
                             "dequantized weights)")


def _generate_parser(sub) -> None:
    """specdec generate"""
    gen = sub.add_parser("generate", help="generate text, streamed, then print the statistics table")
    _target_arguments(gen)
    gen.add_argument("prompt", nargs="?", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--draft", default=None, help="'ngram', or a draft model or head: registered name, folder or "
                     ".gguf file (a head runs in the dtype it was saved in)")
    gen.add_argument("-k", "--num-draft-tokens", default="auto",
                     help="drafts per step, or 'auto' (default: k picked each step from measured acceptance and cost)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")

def _distill_parser(sub) -> None:
    """specdec distill"""
    dis = sub.add_parser("distill", help="train a draft for a target by distillation on the target's own answers")
    dis.add_argument("--target", default=DEFAULT_MODEL, help="registered name, checkpoint folder or .gguf file")
    dis.add_argument("--out", required=True, help="output folder (must not exist unless --resume)")
    dis.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "num_prompts",
                 "eval_prompts", "max_new_tokens", "gen_batch", "teacher_top_k", "steps", "batch_size",
                 "warmup", "checkpoint_every", "seed", "kept_vocab", "unroll", "self_prompts", "max_prompt_tokens"):
        dis.add_argument("--" + name.replace("_", "-"), type=int, dest=name, help=DISTILL_HELP.get(name))
    dis.add_argument("--head", action="store_true",
                     help="train a feature-conditioned draft head (models/head.py) instead of a small model")
    dis.add_argument("--lr", type=float)
    dis.add_argument("--sample-fraction", type=float, dest="sample_fraction")
    dis.add_argument("--dtype", choices=["float32", "bfloat16"], help="of the saved weights (default bfloat16)")
    dis.add_argument("--device", default="cpu", help="where a --head run answers and trains: cpu (default) or cuda")

def _bench_parser(sub) -> None:
    """specdec bench"""
    from specdec.bench.harness import PRESETS
    from specdec.bench.methods import CONSTRAINTS, METHODS

    ben = sub.add_parser("bench", help="specdec against transformers and the memory roofline, side by side")
    ben.add_argument("--preset", help="a named configuration; the flags given beside it override its settings: "
                     + "; ".join(f"{name}: {p.doc}" for name, p in PRESETS.items()))
    ben.add_argument("--model", help=f"target (default {DEFAULT_MODEL})")
    ben.add_argument("--draft", help="draft model for hf-assisted/draft/auto ('none': no draft)")
    ben.add_argument("--head", help="draft head for head/head-auto ('none': no head)")
    ben.add_argument("--methods", nargs="+", help="; ".join(f"{name}: {m.doc}" for name, m in METHODS.items()))
    ben.add_argument("--ks", nargs="+", type=int, help="k values for the draft (1..16)")
    ben.add_argument("--modes", nargs="+", help="greedy and/or sampling (temperature 0.7, top_p 0.9)")
    ben.add_argument("--batch-sizes", nargs="+", type=int, dest="batch_sizes")
    ben.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    ben.add_argument("--repeats", type=int)
    ben.add_argument("--prompts-per-category", type=int, dest="prompts_per_category")
    ben.add_argument("--categories", nargs="+")
    ben.add_argument("--constraints", nargs="+", choices=CONSTRAINTS,
                     help="structured output: run each method on bench/prompts/structured/ (each prompt with its "
                     "JSON schema) unconstrained (free), masked by the schema (schema), and masked with forced "
                     "drafts (forced); --prompts-per-category then counts those prompts")
    ben.add_argument("--dtype", choices=["float32", "bfloat16", "float64"])
    ben.add_argument("--weights", choices=["float", "gguf", "int8", "int4"],
                     help="the target's weights: the float copy (default), the GGUF file's own blocks, or quantized")
    ben.add_argument("--head-quantize", choices=["int8", "int4"], dest="head_quantize",
                     help="quantize the draft head (default: float)")
    ben.add_argument("--activations", choices=["int8", "float"],
                     help="what quantized layers multiply with (default int8: blocks of 32, as llama.cpp)")
    ben.add_argument("--llama-cpp", action="store_true", dest="llama_cpp", default=None,
                     help="also time llama.cpp's llama-bench on the same GGUF file ($SPECDEC_LLAMA_BENCH or PATH)")
    ben.add_argument("--synthetic-rates", nargs="+", type=float, dest="synthetic_rates")
    ben.add_argument("--synthetic-k", type=int, dest="synthetic_k")
    ben.add_argument("--seed", type=int)
    ben.add_argument("--json", help="write every figure and the machine description to this file")
    ben.add_argument("--plot", help="write PNG plots into this folder")
    ben.add_argument("--quick", action="store_true", help=f"--preset quick: {PRESETS['quick'].doc}")

def _serve_parser(sub) -> None:
    """specdec serve"""
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching + speculation")
    _target_arguments(srv)
    srv.add_argument("--draft", default=None, help="'ngram', 'none', or a draft model or head name/folder/.gguf "
                     f"(default: {DEFAULT_HEAD} for the default model, 'ngram' for any other)")
    srv.add_argument("-k", "--num-draft-tokens", default="auto", help="drafts per step, or 'auto' (default)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    srv.add_argument("--max-queued", type=int, default=64, help="requests waiting beyond those (more: 429)")
    srv.add_argument("--kv-blocks", type=int, default=1024, help="KV pool blocks (of --block-size positions)")
    srv.add_argument("--block-size", type=int, default=16)
    srv.add_argument("--grace", type=float, default=10.0, help="seconds running requests get after SIGTERM")
    srv.add_argument("--tensor-parallel", type=int, default=1, dest="tensor_parallel",
                     help="split the target over this many processes (gloo; this process is rank 0 and serves)")
    srv.add_argument("--replicas", type=int, default=1,
                     help="engine replicas behind Ray Serve's HTTP proxy (each a process with its own engine)")
    srv.add_argument("--min-replicas", type=int, dest="min_replicas", help="Ray Serve autoscaling: fewest replicas")
    srv.add_argument("--max-replicas", type=int, dest="max_replicas", help="Ray Serve autoscaling: most replicas")

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding, lossless and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_generate_parser, _distill_parser, _bench_parser, _serve_parser):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return {"generate": _generate, "distill": _distill, "bench": _bench, "serve": _serve}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"specdec {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
