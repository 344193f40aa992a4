"""``specdec distill``: train a small draft for a target by knowledge distillation on the target's own text.

Three resumable stages, each writing into the output folder:

1. **generate** — the target answers varied prompts (``specdec.prompts``), batched; each answer is kept
   with the target's top-``teacher_top_k`` logits at every answer position (transformers' ``generate``
   returns them, so the teacher costs no extra pass). On-policy: the draft learns the text it will be asked
   to predict. Chunks land in ``data/`` one batch at a time; a restart skips the finished ones.
2. **train** — a Llama-shaped draft (tied embeddings initialised from a PCA of the target's) minimises the
   cross-entropy against the teacher's top-k distribution on answer positions. ``trainer.pt`` is saved every
   ``checkpoint_every`` steps and on Ctrl-C; ``--resume`` continues from it.
3. **evaluate** — on held-out prompts: greedy agreement (the acceptance rate a greedy verifier will see,
   given the target's own prefix), expected tokens per target forward for k = 1..8, and the draft's cost
   ratio c timed against the target with the native models. Written to ``eval.json``.

The result is a plain transformers checkpoint (config.json + model.safetensors + tokenizer files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.prompts import training_prompts


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    # draft shape: for a 49152-token vocabulary the tied output layer is 49152 x hidden_size, so hidden_size
    # sets most of the cost (256: 12.6 M of the draft's ~16 M parameters); layers are cheap by comparison.
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    # data
    num_prompts: int = 1200
    eval_prompts: int = 60
    max_new_tokens: int = 128
    gen_batch: int = 32
    sample_fraction: float = 0.25  # answers sampled at temperature 0.7 / top_p 0.9 instead of greedy
    teacher_top_k: int = 32
    # training
    steps: int = 2000
    batch_size: int = 8  # answers per step (~1000 answer tokens)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    seed: int = 0
    dtype: str = "bfloat16"  # of the saved weights: 2 bytes a parameter keeps the shipped draft under 40 MB

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "num_prompts",
                     "eval_prompts", "max_new_tokens", "gen_batch", "teacher_top_k", "steps", "batch_size",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                             f"which must divide by num_kv_heads={self.num_kv_heads}")
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in [0, 1], got sample_fraction={self.sample_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got lr={self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got dtype={self.dtype!r}")


def _load_target(target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models.loading import checkpoint_folder

    folder = checkpoint_folder(target, "target")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"target={str(target)!r} has no usable tokenizer ({err}); distillation needs one to "
                         f"turn prompts into ids and to ship with the draft") from None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@torch.no_grad()
def generate_data(model, tokenizer, prompts: list[str], folder: Path, config: DistillConfig, desc: str) -> None:
    """Chunks ``folder/NNNNN.pt``: per answer the prompt ids, answer ids and the teacher's top-k logits."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(model)
    batches = range(0, len(prompts), config.gen_batch)
    for start in tqdm(batches, desc=desc, unit="batch"):
        chunk = folder / f"{start:05d}.pt"
        if chunk.exists():
            continue  # resumed: made by an earlier run
        ids = [_prompt_ids(tokenizer, p) for p in prompts[start:start + config.gen_batch]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # [B, width], left-padded
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        sample = (start // config.gen_batch) % 4 < round(4 * config.sample_fraction)
        torch.manual_seed(config.seed + start)  # transformers samples from the global generator
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=config.max_new_tokens,
                             do_sample=sample, temperature=0.7 if sample else None, top_p=0.9 if sample else None,
                             top_k=None, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        answers = out.sequences[:, width:]  # [B, new]
        logits = torch.stack(out.logits, dim=1)  # [B, new, vocab]: the target's raw logits for each answer token
        values, indices = logits.float().topk(config.teacher_top_k, dim=-1)  # [B, new, top_k]
        records = []
        for row, prompt in enumerate(ids):
            answer = answers[row].tolist()
            n = next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))  # through the first EOS
            records.append({"prompt": torch.tensor(prompt), "answer": torch.tensor(answer[:n]),
                            "values": values[row, :n].half(), "indices": indices[row, :n].int()})
        tmp = chunk.with_suffix(".tmp")
        torch.save(records, tmp)
        os.replace(tmp, chunk)


def load_data(folder: Path) -> list[dict]:
    return [r for chunk in sorted(folder.glob("*.pt")) for r in torch.load(chunk)]


def make_draft(target, config: DistillConfig):
    """A Llama draft sharing the target's tokenizer, its tied embedding a PCA projection of the target's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = target.config
    draft_config = LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps, rope_parameters=getattr(tc, "rope_parameters", None),
        tie_word_embeddings=True, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
    )
    torch.manual_seed(config.seed)
    draft = LlamaForCausalLM(draft_config)
    with torch.no_grad():
        # The target's embedding rows projected on their top principal directions keep the geometry that
        # tells tokens apart (a random init spends the first thousand steps rediscovering it).
        embed = target.get_input_embeddings().weight.float()  # [vocab, target_hidden]
        q = min(config.hidden_size, embed.shape[1])
        _, _, directions = torch.pca_lowrank(embed, q=q, center=True, niter=4)  # [target_hidden, q]
        projected = embed @ directions  # [vocab, q]
        projected *= 0.02 / projected.std()  # HF's init scale: logits start near uniform
        draft.get_input_embeddings().weight[:, :q] = projected
    draft.generation_config.pad_token_id = target.generation_config.pad_token_id
    draft.generation_config.eos_token_id = target.generation_config.eos_token_id
    draft.generation_config.bos_token_id = target.generation_config.bos_token_id
    return draft


def _batch(records: list[dict], pad: int):
    """Right-padded prompt + answer[:-1], and the answer positions' flat indices into [B * T]."""
    seqs = [torch.cat([r["prompt"], r["answer"][:-1]]) for r in records]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    where = []
    for row, (s, r) in enumerate(zip(seqs, records)):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
        first = len(r["prompt"]) - 1  # the position whose next token is the answer's first
        where.append(row * width + torch.arange(first, first + len(r["answer"])))
    values = torch.cat([r["values"] for r in records]).float()  # [N, top_k]
    indices = torch.cat([r["indices"] for r in records]).long()  # [N, top_k]
    return ids, mask, torch.cat(where), values, indices


def distill_loss(draft, ids, mask, where, values, indices):
    """Cross-entropy of the draft against the teacher's top-k distribution, on answer positions only."""
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    hidden = hidden.flatten(0, 1)[where]  # [N, H]
    logprobs = F.log_softmax(draft.lm_head(hidden).float(), dim=-1)  # [N, vocab]
    teacher = F.softmax(values, dim=-1)  # [N, top_k], renormalised over the kept top-k
    loss = -(teacher * logprobs.gather(1, indices)).sum(-1).mean()
    agree = (logprobs.argmax(-1) == indices[:, 0]).float().mean()
    return loss, agree


def train(draft, records: list[dict], out: Path, config: DistillConfig, pad: int, resume: bool, progress=True):
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))

    def lr_at(step):  # linear warm-up, cosine to a tenth
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    state_file = out / "trainer.pt"
    step, history = 0, []
    if resume and state_file.exists():
        state = torch.load(state_file, weights_only=False)
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]

    def save():
        tmp = state_file.with_suffix(".tmp")
        torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "history": history}, tmp)
        os.replace(tmp, state_file)

    # The order of examples is a function of (seed, epoch): a resumed run sees the batches it would have seen.
    per_epoch = max(1, len(records) // config.batch_size)
    draft.train()
    bar = tqdm(total=config.steps, initial=step, desc="distill", unit="step", disable=not progress)
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        while step < config.steps and not interrupted:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            picked = [records[i] for i in order[offset * config.batch_size:(offset + 1) * config.batch_size].tolist()]
            loss, agree = distill_loss(draft, *_batch(picked, pad))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append((step, loss.item(), agree.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree.item():.2f}")
            if step % config.checkpoint_every == 0:
                save()
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        save()
    draft.eval()
    if interrupted:
        raise KeyboardInterrupt(f"stopped at step {step}; continue with --resume")
    return history


@torch.no_grad()
def evaluate(draft, records: list[dict], pad: int, max_k: int = 8) -> dict:
    """Held-out figures: greedy agreement per answer position given the target's own prefix, and for each k
    the expected tokens per target forward (1 + accepted run, capped at k, averaged over start positions)."""
    draft.eval()
    runs, agreed, total = [], 0, 0
    for start in range(0, len(records), 8):
        ids, mask, where, _, indices = _batch(records[start:start + 8], pad)
        hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)[where]
        hits = draft.lm_head(hidden).argmax(-1) == indices[:, 0]  # [N]
        agreed += hits.sum().item()
        total += hits.numel()
        offset = 0
        for r in records[start:start + 8]:
            row = hits[offset:offset + len(r["answer"])].tolist()
            offset += len(r["answer"])
            run = 0
            for hit in reversed(row):  # run of agreements starting at each position
                run = run + 1 if hit else 0
                runs.append(run)
    runs = torch.tensor(runs, dtype=torch.float64)
    return {"agreement": agreed / max(1, total), "answer_tokens": total,
            "tokens_per_target_forward": {k: 1 + runs.clamp(max=k).mean().item() for k in range(1, max_k + 1)}}


@torch.no_grad()
def cost_ratio(draft, target, context: int = 64, repeats: int = 30) -> float:
    """c: one draft decode step over one target decode step (native models, batch 1, ``context`` tokens in
    the cache), medians of ``repeats`` alternating timings so that machine noise hits both alike."""
    import statistics

    from specdec.models.loading import as_native

    natives = [as_native(draft), as_native(target)]
    caches = [m.new_cache(1, context + 1) for m in natives]
    for m, cache in zip(natives, caches):
        m(torch.ones(1, context, dtype=torch.long), torch.arange(context)[None], cache)
    times = [[], []]
    one, position = torch.ones(1, 1, dtype=torch.long), torch.tensor([[context]])
    for _ in range(repeats):
        for i, (m, cache) in enumerate(zip(natives, caches)):
            cache.rollback(context)
            start = time.perf_counter()
            m(one, position, cache)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def save_draft(draft, tokenizer, out: Path, config: DistillConfig) -> None:
    dtype = getattr(torch, config.dtype)
    saved = draft.to(dtype)
    saved.config.dtype = config.dtype
    saved.save_pretrained(out)
    tokenizer.save_pretrained(out)
    draft.float()


def distill(target, out, config: DistillConfig = DistillConfig(), resume: bool = False, progress: bool = True) -> dict:
    """Train a draft for ``target`` into the folder ``out``; returns the held-out evaluation."""
    out = Path(out)
    if out.exists() and not resume:
        raise ValueError(f"out={str(out)!r} exists; pass resume=True (--resume) to continue the run in it, "
                         f"or choose a new folder")
    model, tokenizer = _load_target(target)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"target": str(target), "config": dataclasses.asdict(config)}
    settings_file = out / "distill.json"
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        if before != settings:
            raise ValueError(f"out={str(out)!r} holds a run with other settings ({before}); resume it with those")
    else:
        settings_file.write_text(json.dumps(settings, indent=2))

    prompts = training_prompts(config.num_prompts + config.eval_prompts, seed=config.seed)
    (out / "prompts.json").write_text(json.dumps({"train": prompts[config.eval_prompts:],
                                                  "eval": prompts[:config.eval_prompts]}, indent=1))
    generate_data(model, tokenizer, prompts[config.eval_prompts:], out / "data" / "train", config, "target answers")
    generate_data(model, tokenizer, prompts[:config.eval_prompts], out / "data" / "eval", config, "held-out answers")
    records = load_data(out / "data" / "train")
    held_out = load_data(out / "data" / "eval")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    draft = make_draft(model, config)
    started = time.perf_counter()
    history = train(draft, records, out, config, pad, resume, progress)
    report = evaluate(draft, held_out, pad)
    report["cost_ratio_c"] = cost_ratio(draft, model)
    report["train_seconds_this_run"] = time.perf_counter() - started
    losses = [loss for _, loss, _ in history]
    report["initial_loss"] = sum(losses[:10]) / max(1, len(losses[:10]))  # means of the first and last 10 steps
    report["final_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
    report["parameters"] = sum(p.numel() for p in draft.parameters())
    save_draft(draft, tokenizer, out, config)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report
