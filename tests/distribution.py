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

import itertools
import os
import sys
import types

import torch
from scipy import stats as scipy_stats
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ALPHA = 1e-5  # false-alarm rate of one aggregate test
SEED = int(os.environ.get("SPECDEC_TEST_SEED", "0"))  # the statistical tests' seed (tests/mutation_check.py varies it)
MIN_EXPECTED = 5.0  # cells expected below this many counts are pooled


def warpers(temperature=1.0, top_k=0, top_p=1.0) -> LogitsProcessorList:
    """transformers' sampling warpers for these settings, in the order its generate() applies them."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def reference_joint(hf_model, prompt: list[int], new: int, knobs: dict, eos: int | None = None) -> torch.Tensor:
    """P(t_1 .. t_new) of ancestral sampling from a transformers model with its warpers, by enumeration.

    returns [S] * new with S = vocab + 1 symbols: ids, then END (after an EOS every later token is END)."""
    V = hf_model.config.vocab_size
    END, process = V, warpers(**knobs)
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


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; cells expected below MIN_EXPECTED pooled into one
    (cells of probability 0 must hold no counts: ``check`` says so apart)."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    expected = counts.sum() * probs
    small = expected < MIN_EXPECTED
    obs = torch.cat((counts[~small], counts[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def threshold(df: int, alpha: float = ALPHA) -> float:
    return float(scipy_stats.chi2.isf(alpha, df))


def noncentrality(probs: torch.Tensor, wrong: torch.Tensor, n: int) -> float:
    """lambda = n * sum((wrong - probs)^2 / probs) over the cells of probability > 0 (pooled as ``chi_square``
    pools them): the statistic's noncentral chi-square parameter when n rows come from ``wrong``."""
    p, q = probs.reshape(-1).double(), wrong.reshape(-1).double()
    small = n * p < MIN_EXPECTED
    p = torch.cat((p[~small], p[small].sum()[None]))
    q = torch.cat((q[~small], q[small].sum()[None]))
    keep = p > 0
    return float(n * ((q[keep] - p[keep]) ** 2 / p[keep]).sum())


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


def mutant(module: types.ModuleType, old: str, new: str) -> types.ModuleType:
    """A copy of ``module`` compiled from its source with ``old`` (which must occur once) replaced by ``new``:
    a deliberate bug for a test to show that it catches it, without touching the file."""
    import inspect
    import linecache

    source = inspect.getsource(module)
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in {module.__name__}"
    source = source.replace(old, new)
    name = f"<mutant of {module.__name__}: {new[:40]}>"
    # Triton reads a jit function's source through linecache: the mutated text must be what it finds
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    copy = types.ModuleType(module.__name__ + "_mutant")
    copy.__file__ = name
    sys.modules[copy.__name__] = copy  # (dataclasses look their module up there)
    exec(compile(source, name, "exec"), copy.__dict__)
    return copy
