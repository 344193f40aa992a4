"""Distribution tests with a stated false-alarm rate and a stated power.

The statistic is Pearson's chi-square over the cells of a joint distribution (the first few tokens of every
row), cells whose expected count is below MIN_EXPECTED pooled into one, against the chi-square quantile at
ALPHA: a correct sampler fails such a test with probability ALPHA (1e-5; the asymptotic chi-square law is
close at >= 5 expected counts a cell). Power against a wrong distribution ``q`` follows from the
noncentrality lambda = N * sum((q - p)^2 / p) (the noncentral chi-square law of the statistic under q).

References never come from the code under test: ``reference_joint`` runs transformers' own forward and its
logits processors (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, in generate()'s
order) on every prefix, and multiplies the conditionals.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import types

import torch
from scipy import stats as scipy_stats
from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

ALPHA = 1e-5  # false-alarm rate of one aggregate test
SEED = int(os.environ.get("SPECDEC_TEST_SEED", "0"))  # the statistical tests' seed (tests/mutation_check.py varies it)
MIN_EXPECTED = 5.0  # cells expected below this many counts are pooled


def warpers(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> LogitsProcessorList:
    """transformers' sampling warpers for these settings, in the order its generate() applies them."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    if min_p:
        out.append(MinPLogitsWarper(min_p))
    return out


def reference_joint(hf_model, prompt: list[int], new: int, knobs: dict, eos: int | None = None,
                    processors=()) -> torch.Tensor:
    """P(t_1 .. t_new) of ancestral sampling from a transformers model with its warpers, by enumeration;
    ``processors`` (transformers' logits processors) run before the warpers, as generate() runs them.

    returns [S] * new with S = vocab + 1 symbols: ids, then END (after an EOS every later token is END)."""
    V = hf_model.config.vocab_size
    END, process = V, LogitsProcessorList([*processors, *warpers(**knobs)])
    joint = torch.ones([1], dtype=torch.float64)  # over prefixes of length 0
    for step in range(new):
        combos = list(itertools.product(range(V + 1), repeat=step))
        prefixes = torch.tensor(combos, dtype=torch.long).reshape(len(combos), step)  # [(V+1)^step, step]
        ids = torch.cat((torch.tensor(prompt).expand(len(prefixes), -1), prefixes.clamp(max=V - 1)), dim=1)
        with torch.no_grad():
            scores = hf_model(ids).logits[:, -1].double()  # [rows, V]
        probs = process(ids, scores).softmax(dim=-1)
        ended = (prefixes == END).any(dim=1) if step else torch.zeros(1, dtype=torch.bool)
        if eos is not None and step:
            ended |= (prefixes == eos).any(dim=1)
        nxt = torch.cat((probs, torch.zeros(len(probs), 1, dtype=torch.float64)), dim=1)  # [rows, V + 1]
        nxt[ended] = 0.0
        nxt[ended, END] = 1.0
        joint = (joint.reshape(-1, 1) * nxt).reshape(-1)
    return joint.reshape([V + 1] * new)


def joint_counts(new_tokens: torch.Tensor, vocab: int, eos: int | None = None) -> torch.Tensor:
    """new_tokens [rows, >= new] as generate() returns them after the prompt (pad after an EOS or the end)
    -> counts [vocab + 1] * new over the same symbols as ``reference_joint``."""
    rows, new = new_tokens.shape[0], new_tokens.shape[1]
    symbols = new_tokens.clone()
    ended = torch.zeros(rows, dtype=torch.bool)
    for j in range(new):
        symbols[ended, j] = vocab
        if eos is not None:
            ended |= new_tokens[:, j] == eos
    cells = torch.zeros(rows, dtype=torch.long)
    for j in range(new):
        cells = cells * (vocab + 1) + symbols[:, j]
    return torch.bincount(cells, minlength=(vocab + 1) ** new).reshape([vocab + 1] * new).double()


def _pooled(expected: torch.Tensor) -> torch.Tensor:
    """Cell -> group: cells expected at >= MIN_EXPECTED alone; the rest pooled into one group, which takes the
    smallest of the others too until it reaches MIN_EXPECTED itself (a pooled cell far below it would
    make the chi-square law a poor guide to the false-alarm rate). expected [cells] -> group ids [cells]"""
    order = torch.argsort(expected)
    pooled = torch.zeros_like(expected, dtype=torch.bool)
    total = 0.0
    for i in order.tolist():
        if expected[i] >= MIN_EXPECTED and (total == 0.0 or total >= MIN_EXPECTED):
            break
        pooled[i], total = True, total + float(expected[i])
    groups = torch.arange(len(expected))
    groups[pooled] = -1
    return torch.unique(groups, return_inverse=True)[1]


def _grouped(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, x.double())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom over the cells pooled by ``_pooled`` (cells of
    probability 0 must hold no counts: ``check`` says so apart)."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    live = probs > 0
    counts, probs = counts[live], probs[live]
    groups = _pooled(counts.sum() * probs)
    obs, exp = _grouped(counts, groups), _grouped(counts.sum() * probs, groups)
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def threshold(df: int, alpha: float = ALPHA) -> float:
    return float(scipy_stats.chi2.isf(alpha, df))


def noncentrality(probs: torch.Tensor, wrong: torch.Tensor, n: int) -> float:
    """lambda = n * sum((wrong - probs)^2 / probs) over the cells pooled as ``chi_square`` pools them: the
    statistic's noncentral chi-square parameter when n rows come from ``wrong``."""
    p, q = probs.reshape(-1).double(), wrong.reshape(-1).double()
    live = p > 0
    groups = _pooled(n * p[live])
    p, q = _grouped(p[live], groups), _grouped(q[live], groups)
    return float(n * ((q - p) ** 2 / p).sum())


def power(lam: float, df: int, alpha: float = ALPHA) -> float:
    """P(the test at ``alpha`` with ``df`` degrees of freedom rejects) at noncentrality ``lam``."""
    return float(scipy_stats.ncx2.sf(threshold(df, alpha), df, lam))


def per_cell_violations(counts: torch.Tensor, probs: torch.Tensor) -> int:
    """Cells beyond |count - N p| <= 6 sqrt(N p (1 - p)) + 5 (a 6-sigma bound per cell; the +5 absorbs the
    discreteness at tiny N p)."""
    n = counts.sum()
    expected = n * probs
    return int(((counts - expected).abs() > 6 * torch.sqrt(expected * (1 - probs)) + 5).sum())


def check(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Assert that counts [S] * new were drawn from probs [S] * new: no impossible cell, no cell past its
    6-sigma bound, and chi-square below its ALPHA quantile over the joint and over each position's marginal
    (new + 1 tests: a false alarm <= (new + 1) * ALPHA, 4e-5 for three tokens). The marginals carry the power
    against a bias at one position (a few degrees of freedom); the joint, against wrong dependence."""
    assert int(counts[probs == 0].sum()) == 0, "an outcome of probability zero appeared"
    bad = per_cell_violations(counts, probs)
    assert bad == 0, f"{bad} cells beyond their 6-sigma bound"
    tables = [("joint", counts, probs)] + [
        (f"token {j + 1}", counts.sum(dim=[d for d in range(counts.dim()) if d != j]),
         probs.sum(dim=[d for d in range(probs.dim()) if d != j])) for j in range(counts.dim())
        if counts.dim() > 1]
    for name, c, p in tables:
        stat, df = chi_square(c, p)
        assert stat <= threshold(df), f"{name}: chi-square {stat:.1f} over {df} df > {threshold(df):.1f} (alpha {ALPHA:g})"


def rejects(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether ``check`` fails."""
    try:
        check(counts, probs)
    except AssertionError:
        return True
    return False


#: Deliberate bugs of the samplers, (file, old text, new text): the statistical tests' companions run each
#: one in-process (``mutant``) and must fail; tests/mutation_check.py places them in a copy of the checkout.
SAMPLER_BUGS = {
    "acceptance +10% (reference)": ("kernels/rejection_sample.py",
                                    "accept = (uniforms * p_draft < p_target) & in_row",
                                    "accept = (uniforms * p_draft < 1.1 * p_target) & in_row"),
    "acceptance +10% (Triton)": ("kernels/rejection_sample.py", "ok = going & (j < nd) & (u * p_d < p_t)",
                                 "ok = going & (j < nd) & (u * p_d < 1.1 * p_t)"),
    "residual max(0, p - 0.9 q) (reference)": ("kernels/rejection_sample.py",
                                               "residual = torch.clamp(target_n - torch.where(",
                                               "residual = torch.clamp(target_n - 0.9 * torch.where("),
    "residual max(0, p - 0.9 q) (Triton)": ("kernels/rejection_sample.py", "tl.maximum(t - d, 0.0)",
                                            "tl.maximum(t - 0.9 * d, 0.0)"),
    "deterministic draft kept in the residual (reference)": (
        "kernels/rejection_sample.py",
        "draft_n = (torch.arange(target_n.shape[-1], device=x_n.device) == x_n).to(target_n.dtype)",
        "draft_n = torch.zeros_like(target_n)"),
    "deterministic draft kept in the residual (Triton)": (
        "kernels/rejection_sample.py", "d = tl.where(v == tl.where(has_draft, one_hot_token, -1), 1.0, 0.0)",
        "d = tl.where(v == -1, 1.0, 0.0)"),
    "resample from the target on rejection": (
        "kernels/rejection_sample.py",
        "residual = torch.clamp(target_n - torch.where(has_draft, draft_n, 0.0), min=0.0)", "residual = target_n"),
    "top-p keeps one token fewer than the nucleus": (
        "specdec/sampling.py", "keep[rows[done]].scatter(1, ids[done], above[done] < top_p)",
        "keep[rows[done]].scatter(1, ids[done], (above[done] < top_p) & ((above[done] + top[done] < top_p) "
        "| (above[done] == 0)))"),
    "processors see a draft position without the drafts before it": (
        "specdec/processing.py", "self._processed(logits[:, i], state, drafts[:, :i])",
        "self._processed(logits[:, i], state, drafts[:, :0])"),
    "acceptance on the unprocessed target distribution": (
        "specdec/processing.py", "self._processed(logits[:, i], state, drafts[:, :i])",
        "(self._processed(logits[:, i], state, drafts[:, :i]) if i == logits.shape[1] - 1 else logits[:, i])"),
    "grammar drafts without their one-hot draft_probs": (
        "specdec/grammar.py", "probs[b, torch.arange(len(run)), torch.tensor(run)] = 1", "pass"),
    "draft tokens not drawn from draft_probs": (
        "specdec/proposers.py", "token = sample(p, state.generator)",
        "token = sample(p.sqrt() / p.sqrt().sum(-1, keepdim=True), state.generator)"),
}


def first_token(accept: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The first emitted token's distribution [V] when the first draft is kept with probability mass
    ``accept`` [V] and a rejection draws from ``residual`` [V] normalised: accept + (1 - sum accept) * r."""
    return accept + (1 - accept.sum()) * residual / residual.sum()


def bug(name: str, module: types.ModuleType) -> types.ModuleType:
    """``module`` with the bug SAMPLER_BUGS[name] in it."""
    _, old, new = SAMPLER_BUGS[name]
    return mutant(module, old, new)


def mutant(module: types.ModuleType, old: str, new: str) -> types.ModuleType:
    """A copy of ``module`` compiled from its source with ``old`` (which must occur once) replaced by ``new``:
    a deliberate bug for a test to show that it catches it, without touching the file."""
    import inspect
    import linecache

    source = inspect.getsource(module)
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in {module.__name__}"
    source = source.replace(old, new)
    name = f"<mutant of {module.__name__} {hashlib.sha1(new.encode()).hexdigest()[:12]}>"
    # Triton reads a jit function's source through linecache: the mutated text must be what it finds
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    copy = types.ModuleType(module.__name__ + "_mutant")
    copy.__file__ = name
    sys.modules[copy.__name__] = copy  # (dataclasses look their module up there)
    exec(compile(source, name, "exec"), copy.__dict__)
    return copy
