"""The mutation check: named deliberate bugs, each of which the suite must catch at every seed.

    python tests/mutation_check.py [--seeds 0 1 2] [--only NAME ...] [--markdown]

The checkout's files (as in the working tree) are copied once into a temporary folder; for each mutant one
line is replaced there, the tests that guard it run from that copy (``pytest -x``, so a caught mutant stops
at its first failure) with SPECDEC_TEST_SEED set to each seed, and the line is restored. A mutant is caught
at a seed when pytest fails; first the same tests must pass unmutated at every seed (the statistical tests'
false alarms are 1e-5 a test). Runs one pytest at a time: about 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that guard this line

    def __post_init__(self):
        text = (ROOT / self.path).read_text()
        if text.count(self.old) != 1:
            raise ValueError(f"mutant {self.name}: {self.old!r} occurs {text.count(self.old)} times in {self.path}")


SAMPLING = ("tests/test_sampling.py", "-k", "every_path or ragged")
KERNEL = ("tests/test_kernels_sampler.py",)
MUTANTS = [
    Mutant("acceptance +10% (reference)", "kernels/rejection_sample.py",
           "accept = (uniforms * p_draft < p_target) & in_row",
           "accept = (uniforms * p_draft < 1.1 * p_target) & in_row", SAMPLING),
    Mutant("acceptance +10% (Triton)", "kernels/rejection_sample.py",
           "ok = going & (j < nd) & (u * p_d < p_t)", "ok = going & (j < nd) & (u * p_d < 1.1 * p_t)", KERNEL),
    Mutant("residual max(0, p - 0.9 q) (reference)", "kernels/rejection_sample.py",
           "residual = torch.clamp(target_n - torch.where(", "residual = torch.clamp(target_n - 0.9 * torch.where(",
           SAMPLING),
    Mutant("residual max(0, p - 0.9 q) (Triton)", "kernels/rejection_sample.py",
           "tl.maximum(t - d, 0.0)", "tl.maximum(t - 0.9 * d, 0.0)", KERNEL),
    Mutant("deterministic draft kept in the residual (reference)", "kernels/rejection_sample.py",
           "draft_n = (torch.arange(target_n.shape[-1], device=x_n.device) == x_n).to(target_n.dtype)",
           "draft_n = torch.zeros_like(target_n)", SAMPLING),
    Mutant("deterministic draft kept in the residual (Triton)", "kernels/rejection_sample.py",
           "d = tl.where(v == tl.where(has_draft, one_hot_token, -1), 1.0, 0.0)", "d = tl.where(v == -1, 1.0, 0.0)",
           KERNEL),
    Mutant("resample from the target on rejection", "kernels/rejection_sample.py",
           "residual = torch.clamp(target_n - torch.where(has_draft, draft_n, 0.0), min=0.0)",
           "residual = target_n", SAMPLING),
    Mutant("greedy accepts the second-best token", "kernels/rejection_sample.py",
           "choice = target_scores.argmax(dim=-1)  # [batch, k + 1]; first maximum on ties",
           "choice = target_scores.topk(2, dim=-1).indices[..., 1]", ("tests/test_speculative.py",)),
    Mutant("top-p keeps one token fewer than the nucleus", "specdec/sampling.py",
           "keep[rows[done]].scatter(1, ids[done], above[done] < top_p)",
           "keep[rows[done]].scatter(1, ids[done], (above[done] < top_p) & ((above[done] + top[done] < top_p) "
           "| (above[done] == 0)))", SAMPLING),
    Mutant("draft tokens not drawn from draft_probs", "specdec/proposers.py",
           "token = sample(p, state.generator)", "token = sample(p.sqrt() / p.sqrt().sum(-1, keepdim=True), "
           "state.generator)", SAMPLING),
    Mutant("rollback one slot short", "specdec/speculative.py",
           "cache.rollback(torch.where(state.active, state.num_tokens + num_accepted, cache.lengths))",
           "cache.rollback(torch.where(state.active, (state.num_tokens + num_accepted - 1).clamp(min=0), "
           "cache.lengths))", ("tests/test_speculative.py",)),
    Mutant("paged cache writes one slot off", "specdec/cache.py",
           "slots = self.block_table.gather(1, p // bs) * bs + p % bs",
           "slots = self.block_table.gather(1, p // bs) * bs + (p + 1) % bs", ("tests/test_engine.py",)),
    Mutant("paged pool leaks a released block", "specdec/cache.py",
           "self._free.extend(reversed(blocks))", "self._free.extend(reversed(blocks[1:]))",
           ("tests/test_engine.py",)),
    Mutant("n-gram proposes one token late", "specdec/proposers.py",
           "start = torch.where((start < 0) & (latest >= 0), latest + n, start)",
           "start = torch.where((start < 0) & (latest >= 0), latest + n + 1, start)", ("tests/test_ngram.py",)),
    Mutant("auto always picks k = 8", "specdec/speculative.py",
           "    def next(self, stats: SpecStats) -> int:\n        if not self.auto:",
           "    def next(self, stats: SpecStats) -> int:\n        return 8\n        if not self.auto:",
           ("tests/test_speculative.py", "-k", "auto")),
    Mutant("server ignores top_p", "specdec/server.py",
           "top_p = 1.0 if body.top_p is None else body.top_p", "top_p = 1.0",
           ("tests/test_server.py", "-k", "sampling")),
    Mutant("server ignores top_k", "specdec/server.py",
           "top_k = 0 if body.top_k is None else body.top_k", "top_k = 0", ("tests/test_server.py", "-k", "sampling")),
    Mutant("server ignores seed", "specdec/server.py",
           "seed=None if body.seed is None else body.seed % 2**64)", "seed=None)",
           ("tests/test_server.py", "-k", "sampling")),
    Mutant("usage counts draft tokens", "specdec/server.py",
           '"completion_tokens": len(text.ids),', '"completion_tokens": len(text.ids) + 1,',
           ("tests/test_server.py",)),
    Mutant("a preempted seeded request is re-seeded", "specdec/engine.py",
           "        seq.preemptions += 1\n", "        seq.preemptions += 1\n        seq.generator = None if "
           "seq.generator is None else torch.Generator(device=seq.generator.device).manual_seed(1234)\n",
           ("tests/test_engine.py", "-k", "preempt")),
]


def _copy_checkout(dest: Path) -> None:
    """The tracked files and the untracked ones git does not ignore, as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, out = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():  # deleted in the working tree
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out, follow_symlinks=False)


def _run(copy: Path, tests: tuple[str, ...], seed: int) -> bool:
    """Whether the tests pass in the copy at this seed."""
    env = dict(os.environ, SPECDEC_TEST_SEED=str(seed))
    out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                         env=env, capture_output=True, text=True)
    return out.returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="names (substrings) of the mutants to run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        _copy_checkout(copy)
        for tests in dict.fromkeys(m.tests for m in chosen):  # the unmutated baseline
            for seed in args.seeds:
                if not _run(copy, tests, seed):
                    print(f"baseline fails: {' '.join(tests)} at seed {seed}", file=sys.stderr)
                    return 1
        for m in chosen:
            path = copy / m.path
            text = path.read_text()
            path.write_text(text.replace(m.old, m.new))
            try:
                tick = time.perf_counter()
                caught = [not _run(copy, m.tests, seed) for seed in args.seeds]
            finally:
                path.write_text(text)
            rows.append((m, caught, time.perf_counter() - tick))
            print(f"{m.name}: caught at {sum(caught)}/{len(caught)} seeds ({rows[-1][2]:.0f} s)", file=sys.stderr)
    if args.markdown:
        print("| mutant | file | guarded by | caught at seeds " + " ".join(map(str, args.seeds)) + " |")
        print("|---|---|---|---|")
        for m, caught, _ in rows:
            print(f"| {m.name} | `{m.path}` | `{' '.join(m.tests)}` | {' '.join('yes' if c else 'NO' for c in caught)} |")
    return 0 if all(all(c) for _, c, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
