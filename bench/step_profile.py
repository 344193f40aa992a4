"""Where one plain decode step goes: the whole step (its layers in one C call, as the model runs them, and
in the Python loop over the same kernels), its linear layers timed inside the Python loop (with the norms,
SiLU and residual adds fused into them), and the rest ("glue": RoPE, cache writes, attention, embedding)
timed with the linear layers stubbed out.

    python bench/step_profile.py [--dtypes float32 bfloat16] [--steps 40] [--context 100]

Each figure is a median over --steps decode steps of one token at --context cached tokens, SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch
from specdec.bench.common import machine, timed

import specdec
from specdec.kernels.cpu_runner import CpuRunner


WARMUP = 3  # steps run before the timed ones


def _steps(model, context: int, steps: int, before_each=None) -> list[float]:
    """Seconds of each one-token step at ``context`` cached tokens (rolled back after each), warm-up
    steps excluded; ``before_each()`` runs before every step, warm-up included."""
    cache = model.new_cache(1, context + 2)
    model(torch.arange(1, context + 1)[None] % model.vocab_size, torch.arange(context)[None], cache)
    times = []
    for _ in range(steps + WARMUP):
        if before_each is not None:
            before_each()
        positions = cache.lengths[:, None].clone()
        times.append(timed(lambda: model(torch.tensor([[7]]), positions, cache))[1])
        cache.rollback(context)
    return times[WARMUP:]


@contextmanager
def _patched_linear(forward):
    original = CpuRunner.linear
    CpuRunner.linear = forward
    try:
        yield
    finally:
        CpuRunner.linear = original


def profile(model, context: int, steps: int) -> dict:
    inside = [0.0]  # seconds in the linear layers: the prefill's, then one sum per step

    def timed_linear(self, layer, x, _forward=CpuRunner.linear, **fused):
        out, seconds = timed(lambda: _forward(self, layer, x, **fused))
        inside[-1] += seconds
        return out

    whole = _steps(model, context, steps)
    model.runner.one_call = False  # the pieces below are timed around Python calls
    try:
        loop = _steps(model, context, steps)
        with _patched_linear(timed_linear):
            _steps(model, context, steps, before_each=lambda: inside.append(0.0))
        outputs = {}

        def stub(self, layer, x, **fused):  # a preallocated output of the right shape: the step minus its linear layers
            # (and minus the norms, SiLU and residual adds fused into them)
            key = (tuple(x.shape[:-1]), layer.out_features)
            if key not in outputs:
                outputs[key] = torch.zeros(*key[0], key[1], dtype=x.dtype)
            return outputs[key]

        with _patched_linear(stub):
            glue = _steps(model, context, steps)
    finally:
        model.runner.one_call = True
    return {"step_ms": 1e3 * statistics.median(whole), "python_loop_step_ms": 1e3 * statistics.median(loop),
            "linear_ms_inside_step": 1e3 * statistics.median(inside[1 + WARMUP:]),
            "glue_ms_linears_stubbed": 1e3 * statistics.median(glue)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}\n")
    print("| dtype | step ms | step ms, layers looped in Python | linear layers ms (inside the loop) "
          "| glue ms (linear layers stubbed) |")
    print("|---|---|---|---|---|")
    for name in args.dtypes:
        model, _ = specdec.load("smollm2-135m-instruct", dtype=getattr(torch, name))
        with torch.inference_mode():
            r = profile(model, args.context, args.steps)
        print(f"| {name} | {r['step_ms']:.1f} | {r['python_loop_step_ms']:.1f} | {r['linear_ms_inside_step']:.1f} "
              f"| {r['glue_ms_linears_stubbed']:.1f} |")


if __name__ == "__main__":
    main()
