"""Distillation's data: prompts (from templates, and ones the target writes itself), the target's answers to
them with its feature at every position, and resumable chunks of records in the run's folder.

The answers are ``specdec.generate``'s plain decoding; its ``feature_hook`` hands over the features the
target's cache kept while it answered, so no second pass over prompt + answer records them. Each objective
turns a batch of answers into its records (``DraftObjective.records``, ``HeadObjective.records``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.distill.config import DataConfig
from specdec.prompts import training_prompts

#: sampled training answers (DataConfig.sample_fraction of them): transformers' settings without top-k
SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=0)

#: rows sampled per round of ``self_written_prompts`` (one prefix, no padding), or gen_batch where that is
#: more (a GPU run's 1024). Not a speed-up on a 2-core CPU: a SmolLM2-135M decode step over 64 rows takes
#: 0.47 s, 3.3x one over 16 (0.14 s); it sets the file's grain
SELF_PROMPT_BATCH = 64


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


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
def self_written_prompts(target, tokenizer, n: int, file: Path, config: DataConfig, progress: bool = True,
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


def prompt_sources(target, tokenizer, config: DataConfig, out: Path, progress: bool = True) -> dict[str, list[str]]:
    """A run's prompts by source: templated ("train", "eval") and, with ``self_prompts``, self-written
    ("train_self", "eval_self"), the first ``eval_prompts`` of each held out. Written to ``out/prompts.json``."""
    templated = training_prompts(config.num_prompts + config.eval_prompts, seed=config.seed)
    written = self_written_prompts(target, tokenizer, config.self_prompts + config.eval_prompts,
                                   out / "self_prompts.json", config, progress, exclude=templated
                                   ) if config.self_prompts else []
    held = config.eval_prompts
    sources = {"train": templated[held:], "train_self": written[held:], "eval": templated[:held],
               "eval_self": written[:held]}
    (out / "prompts.json").write_text(json.dumps({"train": sources["train"] + sources["train_self"],
                                                  "eval": sources["eval"], "eval_self": sources["eval_self"]},
                                                 indent=1))
    return sources


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


def records_by_source(sources: dict[str, list[str]], out: Path, batch: int, make, held_out_make):
    """The records of every source of prompts (``make_chunks`` into ``out/data/<source>``, in batches of
    ``batch``; ``make(start, prompts)`` makes a batch of training records, ``held_out_make`` one of held-out
    records). -> (training records, {held-out source: records} for the sources that have prompts)."""
    made = {}
    for source, prompts in sources.items():
        held = source.startswith("eval")
        if prompts:
            made[source] = make_chunks(prompts, out / "data" / source.replace("_", "-"), batch,
                                       f"{'held-out answers' if held else 'target answers'} ({source})",
                                       held_out_make if held else make)
    return ([r for s in ("train", "train_self") for r in made.get(s, [])],
            {s: made[s] for s in ("eval", "eval_self") if s in made})


@dataclass
class Answer:
    """A prompt and the target's answer to it, cut through its first EOS (or at the length limit)."""

    ids: torch.Tensor  # [n] the prompt's ids, then the answer's
    prompt_len: int
    # [n - 1, hidden] the target's feature (last layer's output, before the final norm) at every position but
    # the last: position i's decides token i + 1, and no token follows the answer's last
    features: torch.Tensor


def _through_eos(answer: list[int], eos) -> int:
    """How many of the answer's tokens to keep: through its first EOS, or all."""
    return next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))


def answer(target, prompts: list[list[int]], max_new_tokens: int, eos: list[int], sampled: bool = False,
           generator=None) -> list[Answer]:
    """The native ``target``'s answers to ``prompts`` (token ids), batched: ``specdec.generate``'s plain
    decoding, greedy or (``sampled``) with ``SAMPLING``'s settings, ending at an id of ``eos``."""
    from specdec.speculative import generate

    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=target.device)  # [B, width]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    kept = []  # the features generate() hands over: [B, width + max_new_tokens, hidden], slot == position
    out = generate(target, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=sampled,
                   **SAMPLING, eos_token_id=eos, pad_token_id=None, generator=generator, feature_hook=kept.append)
    answers = []
    for row, prompt in enumerate(prompts):
        new = out[row, width:].tolist()
        n = len(prompt) + _through_eos(new, eos)
        answers.append(Answer(torch.tensor(prompt + new[:n - len(prompt)]), len(prompt), kept[0][row, :n - 1]))
    return answers


def _sampled(start: int, batch: int, fraction: float) -> bool:
    """Whether the batch of answers starting at prompt ``start`` is sampled: ``fraction`` of every 4 batches."""
    return (start // batch) % 4 < round(4 * fraction)


def answer_batch(target, tokenizer, config: DataConfig, start: int, prompts: list[str]) -> list[Answer]:
    """The target's answers to one batch of prompts, the batch from prompt ``start`` on (which seeds it and
    decides whether it is sampled)."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    generator = torch.Generator(target.device).manual_seed(config.seed + start)
    return answer(target, ids, config.max_new_tokens, sorted(_eos_ids(target)),
                  _sampled(start, config.gen_batch, config.sample_fraction), generator)
