"""The mutation check: named deliberate bugs, each of which the suite must catch.

    python tests/mutation_check.py [--seeds 0 1 2] [--only NAME ...] [--markdown]

The checkout's files (as in the working tree) are copied once into a temporary folder; for each mutant one
line is replaced there, the tests that guard it run from that copy (``pytest -x``, so a caught mutant stops
at its first failure) and the line is restored. A bug guarded by statistical tests runs at every seed
(SPECDEC_TEST_SEED), the others once (their tests draw nothing at random). A mutant is caught where a test
fails (pytest's exit code 1) or the tests hang; any other exit stops the check, as does a baseline failure:
first the same tests must pass unmutated (the statistical tests' false alarms are 1e-5 a test). One pytest
at a time: about 40 minutes on a 2-core CPU.
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

from distribution import SAMPLER_BUGS  # (this folder is on sys.path when the script runs)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that guard this line
    seeded: bool = False  # guarded by statistical tests: run at every seed (the others' tests draw nothing)

    def __post_init__(self):
        text = (ROOT / self.path).read_text()
        if text.count(self.old) != 1:
            raise ValueError(f"mutant {self.name}: {self.old!r} occurs {text.count(self.old)} times in {self.path}")


SAMPLING = ("tests/test_sampling.py", "-k", "every_path or ragged")
KERNEL = ("tests/test_kernels_sampler.py",)
SERVER_SAMPLING = ("tests/test_server.py", "-k", "seed or filter or top_k")
#: the statistical tests that run a file's sampler code (the rest of the samplers: SAMPLING; Triton: KERNEL)
GUARDS = {"specdec/processing.py": ("tests/test_processing.py", "-k", "processed_sampling"),
          "specdec/grammar.py": ("tests/test_grammar.py", "-k", "constrained_sampling")}
MUTANTS = [
    *(Mutant(name, path, old, new, KERNEL if "(Triton)" in name else GUARDS.get(path, SAMPLING), seeded=True)
      for name, (path, old, new) in SAMPLER_BUGS.items()),
    Mutant("greedy accepts the second-best token", "kernels/rejection_sample.py",
           "choice = target_scores.argmax(dim=-1)  # [batch, k + 1]; first maximum on ties",
           "choice = target_scores.topk(2, dim=-1).indices[..., 1]", ("tests/test_speculative.py",)),
    Mutant("rollback one slot short", "specdec/speculative.py",
           "cache.rollback(torch.where(state.active, state.num_tokens + num_accepted, cache.lengths))",
           "cache.rollback(torch.where(state.active, (state.num_tokens + num_accepted - 1).clamp(min=0), "
           "cache.lengths))", ("tests/test_speculative.py",)),
    Mutant("contiguous cache keeps one slot too many on rollback", "specdec/cache.py",
           "        self.lengths = lengths.clone()\n", "        self.lengths = torch.minimum(lengths + 1, self.lengths)\n",
           ("tests/test_cache.py", "tests/test_speculative.py")),
    Mutant("head drafts from the feature of its own position", "specdec/proposers.py",
           "features = target.features_at(positions - 1)", "features = target.features_at(positions)",
           ("tests/test_head.py",)),
    Mutant("head's one-call drafts run their later steps one position late", "kernels/cpu_head.c",
           "a->next[b] + s - 1;", "a->next[b] + s;", ("tests/test_head.py",)),
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
    Mutant("server ignores top_p", "specdec/server/serving.py",
           "top_p = 1.0 if body.top_p is None else body.top_p", "top_p = 1.0",
           SERVER_SAMPLING),
    Mutant("server ignores top_k", "specdec/server/serving.py",
           "top_k = 0 if body.top_k is None else body.top_k", "top_k = 0", SERVER_SAMPLING),
    Mutant("server ignores seed", "specdec/server/serving.py",
           "seed=None if body.seed is None else body.seed % 2**64,", "seed=None,",
           SERVER_SAMPLING),
    Mutant("usage counts draft tokens", "specdec/server/handle.py",
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


TIMEOUT = 1200  # seconds for one pytest run: a mutant that hangs the tests (a pool that never frees) is caught


def _run(copy: Path, tests: tuple[str, ...], seed: int) -> str:
    """'pass', 'fail' (a test failed: pytest's exit code 1) or 'hang' for the tests in the copy at this seed;
    any other outcome (a collection or usage error) is raised: it would count a broken setup as caught."""
    env = dict(os.environ, SPECDEC_TEST_SEED=str(seed))
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "hang"
    if out.returncode not in (0, 1):
        raise RuntimeError(f"pytest {' '.join(tests)} exited {out.returncode}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return "pass" if out.returncode == 0 else "fail"


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
        for tests, seeded in dict.fromkeys((m.tests, m.seeded) for m in chosen):  # the unmutated baseline
            for seed in args.seeds if seeded else args.seeds[:1]:
                if _run(copy, tests, seed) != "pass":
                    print(f"baseline fails: {' '.join(tests)} at seed {seed}", file=sys.stderr)
                    return 1
        for m in chosen:
            path = copy / m.path
            text = path.read_text()
            path.write_text(text.replace(m.old, m.new))
            try:
                tick = time.perf_counter()
                caught = [_run(copy, m.tests, seed) != "pass" for seed in (args.seeds if m.seeded else args.seeds[:1])]
            finally:
                path.write_text(text)
            rows.append((m, caught, time.perf_counter() - tick))
            print(f"{m.name}: caught at {sum(caught)}/{len(caught)} seeds ({rows[-1][2]:.0f} s)", file=sys.stderr)
    if args.markdown:
        print("| mutant | file | guarded by | caught |")
        print("|---|---|---|---|")
        for m, caught, _ in rows:
            seeds = args.seeds if m.seeded else ["(deterministic tests)"]
            verdict = ", ".join(f"{'yes' if c else 'NO'} at seed {s}" if m.seeded else ("yes" if c else "NO")
                                for s, c in zip(seeds, caught))
            print(f"| {m.name} | `{m.path}` | `{' '.join(m.tests)}` | {verdict} |")
    return 0 if all(all(c) for _, c, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
