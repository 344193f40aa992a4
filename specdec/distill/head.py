"""The draft-head objective: a feature-conditioned head (``models/head.py``) learns the target's distribution
over the ids it keeps and the target's features, unrolled over its own predictions; its evaluation drafts
exactly as ``HeadProposer`` does. The result is a head folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.distill.config import HeadConfig
from specdec.distill.data import Answer, answer_batch


def feature_rows(answers: list[Answer]) -> list[dict]:
    """Per answer the ids of prompt + answer and the target's features (bfloat16, on the CPU; a step moves its
    batch): a head learns the features of text the target wrote itself."""
    return [{"prompt_len": a.prompt_len, "ids": a.ids, "feats": a.features.to("cpu", torch.bfloat16, copy=True)}
            for a in answers]


def feature_records(target, tokenizer, config, sample_fraction: float, start: int, prompts: list[str]) -> list[dict]:
    """One batch of a head's records as a run with ``config`` (a DataConfig, or a DistillConfig: it has the
    same fields) makes them, its answers sampled at ``sample_fraction`` (0: greedy, as held-out ones are)."""
    config = dataclasses.replace(config, sample_fraction=sample_fraction)
    return feature_rows(answer_batch(target, tokenizer, config, start, prompts))


def kept_vocabulary(records: list[dict], vocab_size: int, kept: int):
    """The ``kept`` ids the target uses most in ``records`` (prompts and answers), sorted. -> [kept]"""
    counts = torch.bincount(torch.cat([r["ids"] for r in records]), minlength=vocab_size)
    return counts.topk(min(kept, vocab_size)).indices.sort().values


def make_head(target, records: list[dict], config: HeadConfig, seed: int = 0):
    """A draft head for ``target``: its output layer starts as the target's own over the kept ids (rows of
    the target's output layer, its final norm), so its first job is only to predict the next feature."""
    from specdec.models.head import DraftHead

    torch.manual_seed(seed)
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
    """Right-padded ids, positions (-1 = padding), features [B, L, H] (float32; zero at each row's last
    position, whose feature no answer token needs) and the positions whose next token is an answer token
    [B, L] bool."""
    length = max(len(r["ids"]) for r in records)
    ids = torch.zeros(len(records), length, dtype=torch.long)
    positions = torch.full((len(records), length), -1)
    feats = torch.zeros(len(records), length, records[0]["feats"].shape[-1])
    answer = torch.zeros(len(records), length, dtype=torch.bool)
    for row, r in enumerate(records):
        n = len(r["ids"])
        ids[row, :n], positions[row, :n], feats[row, :n - 1] = r["ids"], torch.arange(n), r["feats"][:n - 1].float()
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
        ids, positions, feats, _ = (t.to(device) for t in _feature_batch([r]))  # [1, n], [1, n], [1, n, H]
        answer = ids[0]
        cache = head.new_cache(len(starts), n + max_k)
        full = head.new_cache(1, n + max_k)
        head(target.model.embed_tokens(ids).float(), _previous(feats), positions, full)  # from the target's features
        cache.keys[:], cache.values[:], cache.features[:] = full.keys, full.values, full.features
        cache.lengths = full.lengths.expand(len(starts)).clone()
        cache.rollback(starts)
        tokens, inputs, positions = answer[starts][:, None], feats[0, starts - 1][:, None], starts[:, None]
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


class HeadObjective:
    """What the trainer and ``distill`` call for a draft head: the same methods as ``DraftObjective``."""

    def __init__(self, config: HeadConfig, target, tokenizer):
        self.config, self.target, self.tokenizer = config, target, tokenizer

    def records(self, answers: list[Answer]) -> list[dict]:
        return feature_rows(answers)

    def make(self, records: list[dict], seed: int):
        return make_head(self.target, records, self.config, seed)

    def loss(self, head, records: list[dict]):
        return head_loss(head, self.target, records, self.config.unroll)

    def evaluate(self, head, records: list[dict]) -> dict:
        """``evaluate_head``'s figures, and the share of the answers' tokens the head can propose at all."""
        answers = torch.cat([r["ids"][r["prompt_len"]:] for r in records])
        coverage = torch.isin(answers, head.vocab_ids.cpu()).double().mean().item()
        return {**evaluate_head(head, self.target, records), "kept_vocab_coverage": coverage}

    def drafting(self, head):
        return head.to(getattr(torch, self.config.dtype))  # a head drafts in the dtype it was saved in

    def save(self, head, out: Path) -> None:
        head.cpu().save(out)
        self.tokenizer.save_pretrained(out)
