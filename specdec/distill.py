"""``specdec distill``: train a small draft for a target by knowledge distillation on the target's own text.

Three resumable stages, each writing into the output folder:

1. **generate** — the target answers varied prompts (``specdec.prompts``' templates, plus with
   ``self_prompts`` user messages it wrote itself: ``self_written_prompts``), batched; each answer is kept
   with the target's top-``teacher_top_k`` logits at every answer position (transformers' ``generate``
   returns them, so the teacher costs no extra pass). On-policy: the draft learns the text it will be asked
   to predict. Chunks land in ``data/<source>/`` one batch at a time; a restart skips the finished ones,
   and a run resumed with more prompts (``GROWABLE``) only makes the new ones.
2. **train** — a Llama-shaped draft (tied embeddings initialised from a PCA of the target's) minimises the
   cross-entropy against the teacher's top-k distribution on answer positions. ``trainer.pt`` is saved every
   ``checkpoint_every`` steps and on Ctrl-C; ``--resume`` continues from it.
3. **evaluate** — on held-out prompts: greedy agreement (the acceptance rate a greedy verifier will see,
   given the target's own prefix), expected tokens per target forward for k = 1..8, and the draft's cost
   ratio c timed against the target with the native models. Written to ``eval.json``.

The result is a plain transformers checkpoint (config.json + model.safetensors + tokenizer files).

With ``head=True`` (``--head``) the same three stages train a draft head (``models/head.py``) instead: the
native target answers, then runs once more over prompt + answer to record its feature at every position;
the head learns the target's distribution over the ids it keeps and the target's features, unrolled over
its own predictions; the evaluation drafts exactly as ``HeadProposer`` does. The result is a head folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.prompts import training_prompts
from specdec.sampling import SamplingConfig, sample
from specdec.stats import median_ratio, synchronize


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
    # prompts the target writes itself (``self_written_prompts``), on top of the num_prompts from templates;
    # eval_prompts more of them are held out
    self_prompts: int = 0
    max_prompt_tokens: int = 64
    # training
    steps: int = 2000
    batch_size: int = 8  # answers per step (~1000 answer tokens)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    seed: int = 0
    dtype: str = "bfloat16"  # of the saved weights: 2 bytes a parameter keeps the shipped draft under 40 MB
    # a feature-conditioned draft head (models/head.py) instead of a small model: ``head=True`` (``--head``,
    # whose other defaults are HEAD's); num_layers is then the head's layer count
    head: bool = False
    kept_vocab: int = 8192  # ids the head can propose: the most frequent in the training prompts and answers
    unroll: int = 2  # training passes: the first reads the target's features, each next one the previous pass's

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "num_prompts",
                     "eval_prompts", "max_new_tokens", "gen_batch", "teacher_top_k", "steps", "batch_size",
                     "checkpoint_every", "kept_vocab", "unroll", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                             f"which must divide by num_kv_heads={self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:  # RoPE turns pairs of features
            raise ValueError(f"hidden_size / num_heads must be even, got hidden_size={self.hidden_size} and "
                             f"num_heads={self.num_heads} (head size {self.hidden_size // self.num_heads})")
        if self.head and self.max_new_tokens < 2:  # it learns the token after next: one answer token teaches nothing
            raise ValueError(f"a head run needs max_new_tokens >= 2, got max_new_tokens={self.max_new_tokens}")
        if self.self_prompts < 0:
            raise ValueError(f"self_prompts must be >= 0, got self_prompts={self.self_prompts}")
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in [0, 1], got sample_fraction={self.sample_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got lr={self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got dtype={self.dtype!r}")


#: settings a resumed run may change: more prompts (or another batch size) add chunks to the data it has
GROWABLE = ("num_prompts", "self_prompts", "gen_batch")


def _fixed(settings: dict) -> dict:
    return {**settings, "config": {k: v for k, v in settings["config"].items() if k not in GROWABLE}}


#: ``--head``'s defaults: one layer like the target's; answers in batches of 64 (the native model answers and
#: records its features in one go: SmolLM2 0.39 s an answer at 64 rows on a 2-core CPU); steps of 16 answers
#: (~2500 positions, ~2 passes each)
HEAD = dict(head=True, num_layers=1, num_prompts=900, gen_batch=64, steps=600, batch_size=16, lr=1e-3, warmup=50,
            weight_decay=0.0, checkpoint_every=50)


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


#: rows sampled per round of ``self_written_prompts`` (one prefix, no padding), or gen_batch where that is
#: more (a GPU run's 1024). Not a speed-up on a 2-core CPU: a SmolLM2-135M decode step over 64 rows takes
#: 0.47 s, 3.3x one over 16 (0.14 s); it sets the file's grain
SELF_PROMPT_BATCH = 64


def _user_turn_prefix(tokenizer) -> list[int]:
    """The ids a conversation starts with up to where the user's first message goes (system prompt included);
    BOS alone for a tokenizer without a chat template (or one that puts the message first)."""
    prefix = []
    if tokenizer.chat_template:
        marker = "@@specdec-user-message@@"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        if marker not in text:
            raise ValueError("self_prompts: the chat template does not show the user's message verbatim")
        prefix = tokenizer(text[:text.index(marker)], add_special_tokens=False)["input_ids"]
    if not prefix and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id]
    if not prefix:
        raise ValueError("self_prompts needs a tokenizer with a chat template or a BOS token to start from")
    return prefix


def _prompt_key(text: str) -> str:
    """Prompts equal but for case, punctuation and spacing are one prompt."""
    return " ".join(re.findall(r"\w+", text.casefold()))


@torch.no_grad()
def self_written_prompts(target, tokenizer, n: int, file: Path, config: DistillConfig, progress: bool = True,
                         exclude=()):
    """``n`` distinct user messages written by the target itself (Magpie, Xu et al. 2024): from its chat
    template's opening up to the user's message it samples what a user would say (temperature 1, top-p 0.95),
    so the prompts are as varied as the chat data it was tuned on, not as narrow as any template list. A
    message counts when it ends with EOS within ``max_prompt_tokens``, has at least three words and is new (not
    one already kept or in ``exclude`` but for case and punctuation): on SmolLM2-135M ~75% of samples; the
    rest ramble on. Kept in ``file`` after each round (seeded by its index), so a resumed run continues where
    it stopped and a finished one reuses them. Gives up after 20 rounds in a row without a new prompt."""
    from tqdm.auto import tqdm

    from specdec.speculative import generate

    state = json.loads(file.read_text()) if file.exists() else {"rounds": 0, "prompts": []}
    prefix = _user_turn_prefix(tokenizer)
    eos = _eos_ids(target)
    seen = {_prompt_key(p) for p in [*state["prompts"], *exclude]}
    rows_per_round = max(SELF_PROMPT_BATCH, config.gen_batch)
    bar = tqdm(total=n, initial=min(n, len(state["prompts"])), desc="self-written prompts", unit="prompt",
               disable=not progress)
    barren = 0  # rounds in a row that added nothing
    while len(state["prompts"]) < n:
        if barren == 20:
            raise ValueError(f"self_prompts: 20 rounds of {rows_per_round} samples in a row made no new prompt "
                             f"({len(state['prompts'])} of {n} so far); the target does not write user messages")
        before = len(state["prompts"])
        rows = torch.tensor([prefix] * rows_per_round, device=target.device)  # [R, P]: one prefix, no padding
        generator = torch.Generator(target.device).manual_seed(config.seed * 1_000_003 + state["rounds"])
        out = generate(target, rows, max_new_tokens=config.max_prompt_tokens, do_sample=True, temperature=1.0,
                       top_p=0.95, top_k=0, eos_token_id=sorted(eos), generator=generator)
        for row in out[:, len(prefix):].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip() if end is not None else ""
            if len(text.split()) >= 3 and _prompt_key(text) not in seen and len(state["prompts"]) < n:
                seen.add(_prompt_key(text))
                state["prompts"].append(text)
                bar.update(1)
        state["rounds"] += 1
        barren = 0 if len(state["prompts"]) > before else barren + 1
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, file)
    bar.close()
    return state["prompts"][:n]


def make_chunks(prompts: list[str], folder: Path, batch: int, desc: str, make) -> list[dict]:
    """Resumable, growable data: ``folder/START-STOP.pt`` holds the records ``make(START, prompts[START:STOP])``
    made (one batch). Prompts no chunk covers are made in batches of ``batch``: a run resumed with more
    prompts, or with another batch size, adds to what is there. -> the records of ``prompts``, in order."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    chunks = {tuple(map(int, f.stem.split("-"))): f for f in folder.glob("*-*.pt")}
    chunks = {(start, stop): f for (start, stop), f in chunks.items() if start < len(prompts)}  # (fewer prompts)
    straddling = [f.name for (start, stop), f in chunks.items() if stop > len(prompts)]
    if straddling:
        raise ValueError(f"{folder} holds {straddling[0]}, made for more than these {len(prompts)} prompts: "
                         f"resume with at least {max(stop for _, stop in chunks)}")
    covered = {i for start, stop in chunks for i in range(start, stop)}
    todo = []  # [start, stop) batches of consecutive uncovered prompts
    for i in range(len(prompts)):
        if i in covered:
            continue
        if todo and todo[-1][1] == i and i - todo[-1][0] < batch:
            todo[-1][1] = i + 1
        else:
            todo.append([i, i + 1])
    for start, stop in tqdm(todo, desc=desc, unit="batch"):
        chunk = folder / f"{start:05d}-{stop:05d}.pt"
        tmp = chunk.with_suffix(".tmp")
        torch.save(make(start, prompts[start:stop]), tmp)
        os.replace(tmp, chunk)  # atomic: an interrupted run leaves whole chunks only
        chunks[start, stop] = chunk
    return [r for _, f in sorted(chunks.items()) for r in torch.load(f)]


def _sampled(start: int, batch: int, fraction: float) -> bool:
    """Whether the batch of answers starting at prompt ``start`` is sampled: ``fraction`` of every 4 batches."""
    return (start // batch) % 4 < round(4 * fraction)


def _through_eos(answer: list[int], eos: set[int]) -> int:
    """How many of the answer's tokens to keep: through its first EOS, or all."""
    return next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))


@torch.no_grad()
def teacher_records(model, tokenizer, config: DistillConfig, start: int, prompts: list[str]) -> list[dict]:
    """One batch for a small draft: per answer the prompt ids, answer ids and the teacher's top-k logits."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos_ids(model)
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # [B, width], left-padded
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    sample = _sampled(start, config.gen_batch, config.sample_fraction)
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
        n = _through_eos(answer, eos)
        records.append({"prompt": torch.tensor(prompt), "answer": torch.tensor(answer[:n]),
                        "values": values[row, :n].half(), "indices": indices[row, :n].int()})
    return records


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


def train(draft, records: list[dict], out: Path, config: DistillConfig, loss_of, resume: bool, progress=True):
    """AdamW on ``loss_of(records of one step) -> (loss, agreement)``, checkpointed in ``out/trainer.pt``."""
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
        state = torch.load(state_file, weights_only=False, map_location="cpu")  # (a GPU run resumes anywhere)
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
            loss, agree = loss_of(picked)
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


def _decode_step(model, context: int, head_of=None):
    """A closure running one decode step of ``model`` (batch 1, ``context`` tokens cached); a draft head
    needs its target (``head_of``) for the token embedding and a feature."""
    cache, device = model.new_cache(1, context + 1), model.device
    ids, positions = torch.ones(1, context, dtype=torch.long, device=device), torch.arange(context, device=device)[None]
    one, position = torch.ones(1, 1, dtype=torch.long, device=device), torch.tensor([[context]], device=device)
    if head_of is None:
        model(ids, positions, cache)
        return lambda: (cache.rollback(context), model(one, position, cache))
    embed = head_of.model.embed_tokens
    features = torch.zeros(1, context, model.config.target_hidden_size, dtype=head_of.dtype, device=device)
    model(embed(ids), features, positions, cache)
    return lambda: (cache.rollback(context), model(embed(one), features[:, :1], position, cache))


@torch.no_grad()
def cost_ratio(draft, target, context: int = 64, repeats: int = 30) -> float:
    """c: one draft decode step over one target decode step (native models, batch 1, ``context`` tokens in
    the cache), medians of ``repeats`` alternating timings so that machine noise hits both alike."""
    from specdec.models.head import DraftHead
    from specdec.models.loading import as_native

    target = as_native(target)
    steps = [_decode_step(draft, context, head_of=target) if isinstance(draft, DraftHead)
             else _decode_step(as_native(draft), context), _decode_step(target, context)]
    times = [[], []]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            synchronize(target.device)
            start = time.perf_counter()
            step()
            synchronize(target.device)
            times[i].append(time.perf_counter() - start)
    return median_ratio(times[0], times[1])


def feature_records(target, tokenizer, config: DistillConfig, sample_fraction: float, start: int,
                    prompts: list[str]) -> list[dict]:
    """One batch for a draft head: per answer the ids of prompt + answer and the target's feature (last
    layer's output, bfloat16) at every position. The native target answers in a cache that keeps its
    features (``answer_with_features``): a head learns the features of text the target wrote itself."""
    eos = _eos_ids(target)
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    sample = _sampled(start, config.gen_batch, sample_fraction)
    sampling = SamplingConfig(do_sample=sample, temperature=0.7, top_p=0.9)
    generator = torch.Generator(target.device).manual_seed(config.seed + start)
    answers, feats = answer_with_features(target, ids, config.max_new_tokens, eos, sampling, generator)
    answers, feats = answers.cpu(), feats.bfloat16().cpu()  # records live on the CPU; a step takes its batch
    records = []
    for row, prompt in enumerate(ids):
        answer = answers[row].tolist()
        n = len(prompt) + _through_eos(answer, eos)
        records.append({"prompt_len": len(prompt), "ids": torch.tensor(prompt + answer)[:n],
                        "feats": feats[row, :n].clone()})
    return records


@torch.inference_mode()
def answer_with_features(target, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                         sampling: SamplingConfig, generator=None):
    """The native ``target`` answers the ``prompts`` (token ids) as ``specdec.generate`` would, one decode
    step at a time, in a cache that keeps every position's feature: no second pass over prompt + answer to
    record them (that pass cost as much as the answers). Greedy answers are ``specdec.generate``'s; rows run
    until every row has answered an EOS or ``max_new_tokens`` (tokens after a row's EOS are the caller's to
    drop). -> answers [B, new], features [B, >= P + new, hidden] (slot == position)"""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P] right-padded, as the native model takes
    positions = torch.full((len(prompts), width), -1)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], positions[row, :len(prompt)] = torch.tensor(prompt), torch.arange(len(prompt))
    ids, positions = ids.to(target.device), positions.to(target.device)
    lengths = (positions >= 0).sum(1)  # [B]
    cache = target.new_cache(len(prompts), width + max_new_tokens, features=True)
    logits = target(ids, positions, cache, logits_index=(lengths - 1)[:, None])  # [B, 1, vocab]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=target.device)
    answers, eos = [], torch.tensor(sorted(eos), device=target.device)
    for _ in range(max_new_tokens):
        logits = logits[:, -1]  # [B, vocab]
        token = logits.argmax(-1) if sampling.greedy else sample(sampling.probs(logits), generator)  # [B]
        answers.append(token)
        logits = target(token[:, None], lengths[:, None], cache)  # (the last one only writes its feature)
        lengths = lengths + 1
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
    return torch.stack(answers, 1), cache.features


def kept_vocabulary(records: list[dict], vocab_size: int, kept: int):
    """The ``kept`` ids the target uses most in ``records`` (prompts and answers), sorted. -> [kept]"""
    counts = torch.bincount(torch.cat([r["ids"] for r in records]), minlength=vocab_size)
    return counts.topk(min(kept, vocab_size)).indices.sort().values


def make_head(target, records: list[dict], config: DistillConfig):
    """A draft head for ``target``: its output layer starts as the target's own over the kept ids (rows of
    the target's output layer, its final norm), so its first job is only to predict the next feature."""
    from specdec.models.head import DraftHead

    torch.manual_seed(config.seed)
    head = DraftHead.for_target(target.config, kept_vocabulary(records, target.vocab_size, config.kept_vocab),
                                num_layers=config.num_layers).to(target.device, torch.float32)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
        head.body.model.embed_tokens.weight.copy_(target.lm_head.weight[head.vocab_ids].float())
        head.body.model.norm.weight.copy_(target.model.norm.weight.float())
    return head


def _feature_batch(records: list[dict]):
    """Right-padded ids, positions (-1 = padding), features [B, L, H] (float32) and the positions whose next
    token is an answer token [B, L] bool."""
    length = max(len(r["ids"]) for r in records)
    ids = torch.zeros(len(records), length, dtype=torch.long)
    positions = torch.full((len(records), length), -1)
    feats = torch.zeros(len(records), length, records[0]["feats"].shape[-1])
    answer = torch.zeros(len(records), length, dtype=torch.bool)
    for row, r in enumerate(records):
        n = len(r["ids"])
        ids[row, :n], positions[row, :n], feats[row, :n] = r["ids"], torch.arange(n), r["feats"].float()
        answer[row, r["prompt_len"] - 1:n - 1] = True
    return ids, positions, feats, answer


def _previous(feats):
    """Each position's predecessor's feature (zeros for position 0). [B, L, H] -> [B, L, H]"""
    return torch.cat((torch.zeros_like(feats[:, :1]), feats[:, :-1]), dim=1)


def _unit(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def head_loss(head, target, records: list[dict], unroll: int):
    """Cross-entropy against the target's distribution over the kept ids plus a smooth-L1 pull of the
    predicted features towards the target's (direction only: the output layer reads them through a norm),
    on answer positions; summed over ``unroll`` passes, each fed the previous pass's predictions at every
    position, so the head also learns to draft on from its own features (at inference only the drafted
    positions read its own; the context reads the target's: an approximation, as in EAGLE)."""
    ids, positions, feats, answer = (t.to(head.device) for t in _feature_batch(records))
    length = ids.shape[1]
    with torch.no_grad():
        embeds = target.model.embed_tokens(ids).float()  # [B, L, H]
        want = target.model.norm(feats[answer]) @ target.lm_head.weight[head.vocab_ids].float().T  # [N, kept]
        teacher = F.softmax(want, dim=-1)
    # the output layer (over 8192 kept ids, half of the head's weights) only at the answer positions, which
    # are consecutive in each row: ~55% of a padded batch of SmolLM2's answers
    counts = answer.sum(1)  # [B]
    j = torch.arange(int(counts.max()), device=head.device)
    index = (answer.long().argmax(1)[:, None] + j).clamp(max=length - 1)  # [B, A]
    valid = j < counts[:, None]  # [B, A]: index[valid] lists answer.nonzero() in its order
    loss, inputs, agree = 0.0, _previous(feats), None
    for _ in range(unroll):
        cache = head.new_cache(len(records), length)
        logits = head(embeds, inputs, positions, cache, logits_index=index)  # [B, A, kept]
        predicted = cache.features[:, :length]  # [B, L, H]
        logprobs = F.log_softmax(logits[valid], dim=-1)
        loss = loss - (teacher * logprobs).sum(-1).mean() + F.smooth_l1_loss(_unit(predicted[answer]),
                                                                           _unit(feats[answer]))
        if agree is None:
            agree = (logprobs.argmax(-1) == teacher.argmax(-1)).float().mean()
        inputs = _previous(predicted)
    return loss, agree


@torch.no_grad()
def evaluate_head(head, target, records: list[dict], max_k: int = 8) -> dict:
    """Held-out figures of a head drafting as ``HeadProposer`` does: from every answer position s (the
    pending token), the head's cache holds positions < s made from the target's features, and it drafts
    ``max_k`` tokens on its own features; a draft run is accepted while it matches the target's greedy
    answer (a run that reaches the end of the answer stops there). Reports per-k expected tokens per target
    forward and per-position acceptance; ``answer_tokens`` counts the start positions."""
    runs = []
    for r in records:
        n, device = len(r["ids"]), head.device
        starts = torch.arange(r["prompt_len"], n - 1, device=device)  # [S] pending positions with a next token
        if len(starts) == 0:
            continue
        answer = r["ids"].to(device)
        ids, feats = answer[None], r["feats"].to(device).float()[None]  # [1, n], [1, n, H]
        embeds = target.model.embed_tokens(ids).float()
        cache = head.new_cache(len(starts), n + max_k)
        full = head.new_cache(1, n + max_k)
        head(embeds, _previous(feats), torch.arange(n, device=device)[None], full)  # all from the target's features
        cache.keys[:], cache.values[:], cache.features[:] = full.keys, full.values, full.features
        cache.lengths = full.lengths.expand(len(starts)).clone()
        cache.rollback(starts)
        tokens, inputs, positions = ids[0, starts][:, None], feats[0, starts - 1][:, None], starts[:, None]
        hits = []
        for j in range(max_k):
            logits = head(target.model.embed_tokens(tokens).float(), inputs, positions, cache)
            tokens = head.vocab_ids[logits[:, -1].argmax(-1)][:, None]  # [S, 1]
            truth = answer[(starts + j + 1).clamp(max=n - 1)]
            hits.append((tokens[:, 0] == truth) & (starts + j + 1 < n))
            inputs = cache.features_at(positions)
            positions = positions + 1
        runs.append(torch.stack(hits, 1).long().cumprod(1).sum(1).cpu())  # [S] leading matches
    runs = torch.cat(runs).double()
    reached = [(runs >= i).sum().item() for i in range(max_k)]
    return {"first_draft_agreement": (runs >= 1).double().mean().item(), "answer_tokens": len(runs),
            "per_position_acceptance": [(runs >= i + 1).sum().item() / max(1, reached[i]) for i in range(max_k)],
            "tokens_per_target_forward": {k: 1 + runs.clamp(max=k).mean().item() for k in range(1, max_k + 1)}}


def save_draft(draft, tokenizer, out: Path, config: DistillConfig) -> None:
    dtype = getattr(torch, config.dtype)
    saved = draft.to(dtype)
    saved.config.dtype = config.dtype
    saved.save_pretrained(out)
    tokenizer.save_pretrained(out)
    draft.float()


def distill(target, out, config: DistillConfig = DistillConfig(), resume: bool = False, progress: bool = True,
            device="cpu") -> dict:
    """Train a draft for ``target`` into the folder ``out``; returns the held-out evaluation. ``device``: where
    a head's run answers and trains ("cuda" on a GPU; the data is kept on the CPU either way)."""
    out = Path(out)
    device = _device(device, config)
    if out.exists() and not resume:
        raise ValueError(f"out={str(out)!r} exists; pass resume=True (--resume) to continue the run in it, "
                         f"or choose a new folder")
    if out.exists() and not (out / "distill.json").is_file():  # resume continues a run; it overwrites nothing else
        raise ValueError(f"out={str(out)!r} is not a distill run's folder (no distill.json): nothing to resume; "
                         f"choose a new folder")
    model, tokenizer = _load_target(target)
    from specdec.models.llama import ARCHITECTURES  # (models imports specdec: at call time)

    if model.config.model_type not in ARCHITECTURES:
        raise ValueError(f"target={str(target)!r} is a {model.config.model_type!r} model; distill trains drafts "
                         f"for the native architectures ({', '.join(ARCHITECTURES)})")
    if config.teacher_top_k > model.config.vocab_size:
        raise ValueError(f"teacher_top_k={config.teacher_top_k} exceeds the target's vocabulary of "
                         f"{model.config.vocab_size}")
    if config.head:
        from specdec.models.loading import from_transformers

        model = from_transformers(model).to(device)  # the native model writes the features a head learns from
    out.mkdir(parents=True, exist_ok=True)
    settings = {"target": str(target), "config": dataclasses.asdict(config)}
    settings_file = out / "distill.json"
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        # a run made before a setting existed ran with its default
        before["config"] = {**dataclasses.asdict(DistillConfig()), **before.get("config", {})}
        if _fixed(before) != _fixed(settings):
            raise ValueError(f"out={str(out)!r} holds a run with other settings ({before}); resume it with those "
                             f"(only {', '.join(GROWABLE)} may change: the data grows)")
    settings_file.write_text(json.dumps(settings, indent=2))

    templated = training_prompts(config.num_prompts + config.eval_prompts, seed=config.seed)
    written = self_written_prompts(model, tokenizer, config.self_prompts + config.eval_prompts,
                                   out / "self_prompts.json", config, progress, exclude=templated
                                   ) if config.self_prompts else []
    sources = {"train": templated[config.eval_prompts:], "train_self": written[config.eval_prompts:],
               "eval": templated[:config.eval_prompts], "eval_self": written[:config.eval_prompts]}
    (out / "prompts.json").write_text(json.dumps({"train": sources["train"] + sources["train_self"],
                                                  "eval": sources["eval"], "eval_self": sources["eval_self"]},
                                                 indent=1))
    if config.head:
        return _distill_head(model, tokenizer, sources, out, config, resume, progress)
    records, held_out = _data(sources, out, config, functools.partial(teacher_records, model, tokenizer, config))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    draft = make_draft(model, config)
    started = time.perf_counter()
    history = train(draft, records, out, config, lambda picked: distill_loss(draft, *_batch(picked, pad)), resume,
                    progress)
    report = _by_source(lambda rs: evaluate(draft, rs, pad), held_out)
    report["cost_ratio_c"] = cost_ratio(draft, model)
    report["train_seconds_this_run"] = time.perf_counter() - started
    return _finish(report, history, draft, lambda: save_draft(draft, tokenizer, out, config), out)


def _device(device, config: DistillConfig) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device") from None
    if device.type != "cpu" and not config.head:
        raise ValueError(f"device={str(device)!r}: a small draft trains on the CPU only; --device is for --head runs")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: distill runs on cpu or cuda")
    return device


def _data(sources: dict[str, list[str]], out: Path, config: DistillConfig, make, held_out_make=None):
    """The records of every source of prompts (``make_chunks`` into ``out/data/<source>``; ``make(start,
    prompts)`` makes a batch, ``held_out_make`` one of held-out prompts if they differ). -> (training records,
    {held-out source: records} for the sources that have prompts)."""
    made = {}
    for source, prompts in sources.items():
        held = source.startswith("eval")
        if prompts:
            made[source] = make_chunks(prompts, out / "data" / source.replace("_", "-"), config.gen_batch,
                                       f"{'held-out answers' if held else 'target answers'} ({source})",
                                       (held_out_make or make) if held else make)
    return ([r for s in ("train", "train_self") for r in made.get(s, [])],
            {s: made[s] for s in ("eval", "eval_self") if s in made})


def _by_source(evaluate_on, held_out: dict[str, list]) -> dict:
    """The evaluation over all held-out answers; with self-written prompts too, also one per source."""
    report = evaluate_on([r for records in held_out.values() for r in records])
    if len(held_out) > 1:
        report["by_source"] = {source: evaluate_on(records) for source, records in held_out.items()}
    return report


def _finish(report: dict, history, draft, save, out: Path) -> dict:
    losses = [loss for _, loss, _ in history]
    report["initial_loss"] = sum(losses[:10]) / max(1, len(losses[:10]))  # means of the first and last 10 steps
    report["final_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
    report["parameters"] = sum(p.numel() for p in draft.parameters())
    save()
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def _distill_head(target, tokenizer, sources: dict, out: Path, config: DistillConfig, resume: bool, progress: bool):
    # held-out answers greedy: the evaluation compares greedy drafts with the target's greedy tokens
    records, held_out = _data(sources, out, config,
                              functools.partial(feature_records, target, tokenizer, config, config.sample_fraction),
                              functools.partial(feature_records, target, tokenizer, config, 0.0))
    head = make_head(target, records, config)
    started = time.perf_counter()
    history = train(head, records, out, config, lambda picked: head_loss(head, target, picked, config.unroll),
                    resume, progress)
    report = _by_source(lambda rs: evaluate_head(head, target, rs), held_out)
    answers = torch.cat([r["ids"][r["prompt_len"]:] for records in held_out.values() for r in records])
    report["kept_vocab_coverage"] = torch.isin(answers, head.vocab_ids.cpu()).double().mean().item()
    saved = head.to(getattr(torch, config.dtype))
    report["cost_ratio_c"] = cost_ratio(saved, target)  # (on the run's device: c on a GPU is not c on a CPU)
    report["train_seconds_this_run"] = time.perf_counter() - started
    saved = saved.cpu()

    def save():
        saved.save(out)
        tokenizer.save_pretrained(out)

    return _finish(report, history, saved, save, out)
