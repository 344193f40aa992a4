"""The cost model and SpecStats, the figures of one generate() call (as README.md's "Benchmark" and "How it
works" sections name them).

Every cost-model figure is computed here, once: the draft cost ratio c, the verification cost v(k), the
expected tokens E(alpha, k), the predicted speedup and the round budget. SpecStats, the k controller
(``speculative.DraftLength``), distillation's evaluation and the benchmark call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def synchronize(device) -> None:
    """Wait for the work queued on ``device``, so that a host timer measures it (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expected_tokens(alpha: float, k: int) -> float:
    """E = (1 - alpha^(k+1)) / (1 - alpha): expected tokens emitted per target pass with k drafts."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speedup(tokens_per_round: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Speedup over plain decoding at batch 1: a round emits ``tokens_per_round`` tokens (a plain step one)
    and costs k draft steps of c plain steps each plus a verification pass of v(k) plain steps."""
    return tokens_per_round / (k * cost_ratio + verify_cost)


def predicted_speedup(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0,
                      fill: float = 1.0) -> float:
    """Tokens a round emits over what it costs in plain steps: (1 + fill * (E - 1)) / (k * c + v(k)).

    verify_cost  v(k): a verification pass over k + 1 tokens in plain steps (1: Leviathan et al. 2023's
                 assumption, which makes this their E / (k * c + 1))
    fill         the share of asked-for drafts a proposer offers (1 for a draft model; n-gram lookup's match
                 rate: a row without a match gains nothing)"""
    return speedup(1.0 + fill * (expected_tokens(alpha, k) - 1.0), k, cost_ratio, verify_cost)


def cost_ratio(draft_seconds: float, draft_passes: int, target_seconds: float, target_passes: int) -> float | None:
    """c = seconds per draft forward / seconds per target forward (None without both timings)."""
    if not draft_passes or not target_passes or not target_seconds:
        return None
    return (draft_seconds / draft_passes) / (target_seconds / target_passes)


def median_ratio(times: list[float], unit_times: list[float]) -> float:
    """median(times) / median(unit_times): c from alternating draft and target step timings, v(k) from a
    k + 1-token pass's and a one-token pass's (medians, so that a burst of machine noise hits neither)."""
    import statistics

    return statistics.median(times) / statistics.median(unit_times)


def round_budget(round_seconds: float, verify_seconds: float, draft_seconds: float,
                 plain_step_seconds: float) -> dict:
    """Where a speculative round's time goes, in plain steps: each figure over the wall time of one plain step
    of the same batch in the same run. ``round`` (the run's wall time over its target passes) = ``verify``
    (the target pass over k + 1 tokens, acceptance and rollback) + ``draft`` (drafting k tokens, the draft's
    own sampling included) + ``rest`` (commit, the k controller, the loop; and, as for the plain step, a
    share of the prefill).

    A round emits tokens_per_forward tokens per row where a plain step emits 1, so speedup ~ tokens per
    forward / round: speculation pays when a round brings more tokens than it costs plain steps. (Not to the
    digit: tokens/s is a median over repeats and the budget sums every pass; rows that finish early at batch
    > 1 bend it too.)"""
    cost, verify, draft = (x / plain_step_seconds for x in (round_seconds, verify_seconds, draft_seconds))
    return {"round": cost, "verify": verify, "draft": draft, "rest": cost - verify - draft}


@dataclass
class SpecStats:
    requested: int = 0  # drafts asked of the proposer (k per active row, fewer near max_new_tokens)
    proposed: int = 0  # draft tokens offered to the target (an n-gram lookup without a match offers none)
    accepted: int = 0  # draft tokens the target kept
    # drafts a grammar gave (the tokens it forces, then the text it forces, tokenized: specdec/grammar.py), the
    # target kept; they are not counted in proposed / accepted, which measure the draft model
    forced: int = 0
    forced_offered: int = 0  # drafts a grammar offered
    emitted: int = 0  # tokens appended to the output (accepted + recovered/bonus, cut at EOS and max_new_tokens)
    target_passes: int = 0  # target forwards; the first one also prefills the prompt
    draft_passes: int = 0  # draft forwards, its prefill and catch-up included
    target_seconds: float = 0.0  # spent in target passes after the first (the prefill is not a decode step)
    draft_seconds: float = 0.0  # spent drafting in those same steps
    timed_target_passes: int = 0
    timed_draft_passes: int = 0
    pass_seconds_by_k: dict[int, float] = field(default_factory=dict)  # timed target passes, summed per k
    passes_by_k: dict[int, int] = field(default_factory=dict)  # how many of them
    wall_seconds: float = 0.0
    steps_by_k: dict[int, int] = field(default_factory=dict)  # how often each k was used (auto mode)
    reached_at: list[int] = field(default_factory=list)  # [k] drafts at position i whose predecessors were all accepted
    accepted_at: list[int] = field(default_factory=list)  # [k] drafts accepted at position i
    row_passes: int = 0  # (row, target pass) pairs: the denominator of tokens per target forward

    def record(self, proposed: int, reached_at: list[int], accepted_at: list[int], emitted: int, rows: int,
               k: int) -> None:
        grow = len(reached_at) - len(self.reached_at)
        if grow > 0:
            self.reached_at += [0] * grow
            self.accepted_at += [0] * grow
        for i, (r, a) in enumerate(zip(reached_at, accepted_at)):
            self.reached_at[i] += r
            self.accepted_at[i] += a
        self.proposed += proposed
        self.accepted += sum(accepted_at)
        self.emitted += emitted
        self.row_passes += rows
        self.target_passes += 1
        self.steps_by_k[k] = self.steps_by_k.get(k, 0) + 1

    def record_pass(self, k: int, target_seconds: float, draft_seconds: float) -> None:
        """Timing of one decode step (not the prefill) that drafted k tokens."""
        self.target_seconds += target_seconds
        self.draft_seconds += draft_seconds
        self.timed_target_passes += 1
        self.timed_draft_passes += k
        self.pass_seconds_by_k[k] = self.pass_seconds_by_k.get(k, 0.0) + target_seconds
        self.passes_by_k[k] = self.passes_by_k.get(k, 0) + 1

    def merge(self, other: SpecStats) -> None:
        """Add another call's figures to these (a benchmark sums the calls of one configuration)."""
        for name, value in other.__dict__.items():
            mine = getattr(self, name)
            if isinstance(value, dict):
                for k, v in value.items():
                    mine[k] = mine.get(k, 0) + v
            elif isinstance(value, list):
                mine += [0] * (len(value) - len(mine))
                for i, v in enumerate(value):
                    mine[i] += v
            else:
                setattr(self, name, mine + value)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Emitted tokens per (sequence, target pass); plain decoding scores exactly 1.0."""
        return self.emitted / self.row_passes if self.row_passes else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """P(position i accepted | positions < i accepted)."""
        return [a / r if r else 0.0 for r, a in zip(self.reached_at, self.accepted_at)]

    @property
    def mean_k(self) -> float:
        return self.proposed / self.row_passes if self.row_passes else 0.0

    @property
    def cost_ratio(self) -> float | None:
        """c = seconds per draft forward / seconds per target forward (measured; None without a draft)."""
        return cost_ratio(self.draft_seconds, self.timed_draft_passes, self.target_seconds, self.timed_target_passes)

    @property
    def predicted_speedup(self) -> float | None:
        c = self.cost_ratio
        if c is None:
            return None
        return predicted_speedup(self.acceptance_rate, round(self.mean_k), c)

    @property
    def round_seconds(self) -> float | None:
        """Wall time per target pass (a plain run's: one plain step), the prefill's share included."""
        return self.wall_seconds / self.target_passes if self.target_passes else None

    def round_budget(self, plain_step_seconds: float) -> dict | None:
        """``round_budget`` of this run against a plain step of the same batch (None without a timed pass)."""
        passes = self.timed_target_passes
        if not passes or not plain_step_seconds:
            return None
        return round_budget(self.round_seconds, self.target_seconds / passes, self.draft_seconds / passes,
                            plain_step_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.emitted / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        fields = dict(self.__dict__)
        for name in ("steps_by_k", "pass_seconds_by_k", "passes_by_k"):
            fields[name] = {str(k): v for k, v in getattr(self, name).items()}
        for name in ("acceptance_rate", "tokens_per_target_forward", "per_position_acceptance", "mean_k",
                     "cost_ratio", "predicted_speedup", "tokens_per_second"):
            fields[name] = getattr(self, name)
        return fields

    def __str__(self) -> str:
        def fmt(x):
            return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

        rows = [
            ("emitted tokens", self.emitted),
            ("target passes", self.target_passes),
            ("tokens per target forward", self.tokens_per_target_forward),
            ("proposed / accepted", f"{self.proposed} / {self.accepted}"),
            ("acceptance rate", self.acceptance_rate if self.proposed else None),
            *([("grammar drafts offered / kept", f"{self.forced_offered} / {self.forced}")]
              if self.forced_offered else []),
            ("per-position acceptance", " ".join(f"{r:.2f}" for r in self.per_position_acceptance) or "-"),
            ("draft passes", self.draft_passes),
            ("draft cost ratio c", self.cost_ratio),
            ("predicted speedup", self.predicted_speedup),
            ("tokens/s", self.tokens_per_second),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {fmt(value)}" for name, value in rows)
