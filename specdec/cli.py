"""The ``specdec`` command line: ``specdec generate [PROMPT]`` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def _generate(args) -> int:
    import torch
    from transformers import TextStreamer

    import specdec

    model, tokenizer = specdec.load(args.model, dtype=args.dtype)
    draft = None
    if args.draft:
        draft, _ = specdec.load(args.draft, dtype=args.dtype)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if tokenizer.chat_template and not args.no_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    k = args.num_draft_tokens
    if k != "auto":
        if not k.isdigit():
            raise ValueError(f"-k/--num-draft-tokens must be an integer >= 1 or 'auto', got {k!r}")
        k = int(k)
    out = specdec.generate(
        model, ids, draft_model=draft, num_draft_tokens=k, max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), return_dict_in_generate=True,
    )
    s = out.stats
    print(f"\n-- {s.emitted} tokens in {s.wall_seconds:.2f} s: {s.tokens_per_second:.1f} tokens/s "
          f"({args.model}, {model.dtype}{', draft ' + args.draft if args.draft else ''})", file=sys.stderr)
    print(s, file=sys.stderr)
    return 0


def _distill(args) -> int:
    import dataclasses

    from specdec.distill import DistillConfig, distill

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    report = distill(args.target, args.out, config, resume=args.resume)
    per_k = report["tokens_per_target_forward"]
    best = max(per_k, key=lambda k: per_k[k] / (k * report["cost_ratio_c"] + 1))
    print(f"held-out greedy agreement {report['agreement']:.3f} over {report['answer_tokens']} answer tokens; "
          f"c = {report['cost_ratio_c']:.3f}; tokens per target forward at k={best}: {per_k[best]:.2f}; "
          f"draft saved in {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding, lossless and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text, streamed, then print the statistics table")
    gen.add_argument("prompt", nargs="?", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="registered name, checkpoint folder or .gguf file")
    gen.add_argument("--draft", default=None, help="draft model: registered name, folder or .gguf file")
    gen.add_argument("-k", "--num-draft-tokens", default="4", help="drafts per step, or 'auto'")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    dis = sub.add_parser("distill", help="train a draft for a target by distillation on the target's own answers")
    dis.add_argument("--target", default=DEFAULT_MODEL, help="registered name, checkpoint folder or .gguf file")
    dis.add_argument("--out", required=True, help="output folder (must not exist unless --resume)")
    dis.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "num_prompts",
                 "eval_prompts", "max_new_tokens", "gen_batch", "teacher_top_k", "steps", "batch_size",
                 "warmup", "checkpoint_every", "seed"):
        dis.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    dis.add_argument("--lr", type=float)
    dis.add_argument("--sample-fraction", type=float, dest="sample_fraction")
    dis.add_argument("--dtype", choices=["float32", "bfloat16"], help="of the saved weights (default bfloat16)")
    args = parser.parse_args(argv)
    try:
        return {"generate": _generate, "distill": _distill}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"specdec {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
