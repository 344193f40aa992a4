"""The independent-draft objective: a small Llama-shaped model (tied embeddings initialised from a PCA of the
target's) learns the target's top-``teacher_top_k`` distribution at every answer position (cross-entropy).
The result is a plain transformers checkpoint (config.json + model.safetensors + tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.distill.config import DraftConfig
from specdec.distill.data import Answer


@torch.no_grad()
def teacher_records(target, answers: list[Answer], top_k: int) -> list[dict]:
    """Per answer the prompt ids, the answer ids and the target's top-k logits at each answer position: its
    output layer over the features ``specdec.generate`` handed over (one product per answer position, ~a
    fifth of a forward's weights for SmolLM2-135M, batched per answer)."""
    records = []
    for a in answers:
        chose = a.features[a.prompt_len - 1:]  # [A, hidden]: the features that decided each answer token
        logits = target.lm_head(target.model.norm(chose)).float()  # [A, vocab]
        values, indices = logits.topk(top_k, dim=-1)  # [A, top_k]
        records.append({"prompt": a.ids[:a.prompt_len].clone(), "answer": a.ids[a.prompt_len:].clone(),
                        "values": values.half().cpu(), "indices": indices.int().cpu()})
    return records


def make_draft(target, config: DraftConfig, seed: int = 0):
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
    torch.manual_seed(seed)
    draft = LlamaForCausalLM(draft_config)
    with torch.no_grad():
        # The target's embedding rows projected on their top principal directions keep the geometry that
        # tells tokens apart (a random init spends the first thousand steps rediscovering it).
        embed = target.model.embed_tokens.weight.float()  # [vocab, target_hidden]
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
    """Cross-entropy of the draft against the teacher's top-k distribution, on answer positions only.

    ids, mask [B, T]; where [N] flat answer positions; values, indices [N, top_k] -> (loss, agreement)"""
    hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    hidden = hidden.flatten(0, 1)[where]  # [N, H]
    logprobs = F.log_softmax(draft.lm_head(hidden).float(), dim=-1)  # [N, vocab]
    teacher = F.softmax(values, dim=-1)  # [N, top_k], renormalised over the kept top-k
    loss = -(teacher * logprobs.gather(1, indices)).sum(-1).mean()
    agree = (logprobs.argmax(-1) == indices[:, 0]).float().mean()
    return loss, agree


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


def save_draft(draft, tokenizer, out: Path, dtype: str) -> None:
    saved = draft.to(getattr(torch, dtype))
    saved.config.dtype = dtype
    saved.save_pretrained(out)
    tokenizer.save_pretrained(out)
    draft.float()


class DraftObjective:
    """What the trainer and ``distill`` call for a small draft: ``records`` (of a batch of answers), ``make``,
    ``loss``, ``evaluate``, ``drafting`` (the model as it drafts: what its cost ratio is timed on) and ``save``."""

    def __init__(self, config: DraftConfig, target, tokenizer):
        if config.teacher_top_k > target.vocab_size:
            raise ValueError(f"teacher_top_k={config.teacher_top_k} exceeds the target's vocabulary of "
                             f"{target.vocab_size}")
        self.config, self.target, self.tokenizer = config, target, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def records(self, answers: list[Answer]) -> list[dict]:
        return teacher_records(self.target, answers, self.config.teacher_top_k)

    def make(self, records: list[dict], seed: int):
        return make_draft(self.target, self.config, seed)

    def loss(self, draft, records: list[dict]):
        return distill_loss(draft, *_batch(records, self.pad))

    def evaluate(self, draft, records: list[dict]) -> dict:
        return evaluate(draft, records, self.pad)

    def drafting(self, draft):
        return draft  # in float32, as the target runs: a small draft is loaded in the target's dtype

    def save(self, draft, out: Path) -> None:
        save_draft(draft, self.tokenizer, out, self.config.dtype)
