"""Every GPU check in one call (one H100 or H200, under 8 minutes), in order of what a lease must not lose:

1. the card and the software (torch, triton, transformers versions) and its copy bandwidth;
2. the fused rejection sampler against its PyTorch reference: bit for bit, and timed;
3. verification attention (Triton, paged pool) against torch's SDPA on the same data: error and time;
4. end to end on a small random model in float32 on CUDA: plain greedy through the Triton kernels against the
   PyTorch references, and speculative greedy (a random draft model, a synthetic proposer, the paged
   engine, CUDA graphs of the layers) against plain greedy, token for token;
5. the benchmark's GPU mode (bench/large_model.py): Llama-3-8B shape, random bfloat16 weights, without and
   with CUDA graphs;
6. the kernel test files on CUDA (pytest, with a time limit).

A section that fails is recorded with its traceback and the next one runs; gpu_check.json is rewritten after
every section (to $OUT when set), so a call cut off by its time limit still brings back what it finished.

    python bench/gpu_check.py            # on a CUDA machine
    python bench/gpu_check.py --smoke    # tiny sizes on the CPU through Triton's interpreter (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _bench(fn, device, repeats=20):
    """Median seconds of fn(); CUDA events on the GPU."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class Report(dict):
    """The JSON report, written after every section; a section's exception is kept, not raised."""

    def __init__(self, path: Path, **fields):
        super().__init__(fields, errors={}, seconds={})
        self.path = path

    @contextlib.contextmanager
    def section(self, name: str):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self["errors"][name] = traceback.format_exc()
            print(f"\x1b[31m{name} failed:\x1b[0m\n{self['errors'][name]}", flush=True)
        finally:
            self["seconds"][name] = round(time.perf_counter() - start, 1)
            self.path.write_text(json.dumps(self, indent=2, default=str))


def sampler(report, device):
    import torch

    from specdec.kernels.rejection_sample import rejection_sample_reference, rejection_sample_triton

    for vocab in ((32000, 128256) if device == "cuda" else (1000,)):
        batch, k = (32, 4) if device == "cuda" else (2, 2)
        gen = torch.Generator(device=device).manual_seed(0)
        target = torch.softmax(torch.randn(batch, k + 1, vocab, device=device, generator=gen), -1)
        draft = torch.softmax(torch.randn(batch, k, vocab, device=device, generator=gen), -1)
        drafts = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
        nd = torch.full((batch,), k, device=device)
        u = torch.rand(batch, k, device=device, generator=gen)
        e = torch.empty(batch, vocab, device=device).exponential_(generator=gen)
        a = (drafts, draft, target, nd, u, e)
        same = all(torch.equal(x, y) for x, y in zip(rejection_sample_triton(*a), rejection_sample_reference(*a)))
        kernel_s = _bench(lambda: rejection_sample_triton(*a), device)
        ref_s = _bench(lambda: rejection_sample_reference(*a), device)
        report["sampler"].append({"vocab": vocab, "batch": batch, "k": k, "kernel_us": kernel_s * 1e6,
                                  "reference_us": ref_s * 1e6, "speedup": ref_s / kernel_s, "bit_identical": same})
        print(report["sampler"][-1], flush=True)


def attention(report, device, bandwidth):
    import torch
    import torch.nn.functional as F

    from specdec.kernels.verify_attention import verify_attention_triton

    # Llama-3-8B attention layout: 32 query heads, 8 kv heads, head_dim 128, bfloat16, pool blocks of 16
    heads, kv_heads, head_dim, block = (32, 8, 128, 16) if device == "cuda" else (4, 2, 64, 16)
    shapes = ([(b, c, t) for b in (1, 8, 32) for c in (512, 4096, 16384) for t in (1, 5, 9)] if device == "cuda"
              else [(2, 40, 1), (2, 40, 5)])
    for batch, context, T in shapes:
        total = context + T
        blocks_per_seq = -(-total // block)
        perm = torch.randperm(batch * blocks_per_seq, device=device)
        table = perm.reshape(batch, blocks_per_seq).to(torch.int32)
        k_pool = torch.randn(batch * blocks_per_seq, block, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        q = torch.randn(batch, T, heads, head_dim, device=device, dtype=torch.bfloat16)
        ctx = torch.full((batch,), context, device=device)
        qlen = torch.full((batch,), T, device=device)
        got = verify_attention_triton(q, k_pool, v_pool, table, ctx, qlen)  # [batch, T, heads, head_dim]
        kernel_s = _bench(lambda: verify_attention_triton(q, k_pool, v_pool, table, ctx, qlen), device)
        # the same kernel with every (sequence, kv head, query tile) in one program: what splitting buys
        one_s = _bench(lambda: verify_attention_triton(q, k_pool, v_pool, table, ctx, qlen, num_splits=1), device)
        # SDPA on the same data laid out contiguously (its best case: no block table to follow)
        k_dense = k_pool[table.long()].reshape(batch, -1, kv_heads, head_dim)[:, :total].transpose(1, 2).contiguous()
        v_dense = v_pool[table.long()].reshape(batch, -1, kv_heads, head_dim)[:, :total].transpose(1, 2).contiguous()
        mask = torch.arange(total, device=device)[None, :] <= (context + torch.arange(T, device=device))[:, None]
        sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_dense, v_dense,  # noqa: E731
                                                      attn_mask=mask, enable_gqa=True)
        # the error against float32 SDPA: what both bfloat16 results should be near (values ~ N(0, 1))
        exact = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k_dense.float(), v_dense.float(),
                                               attn_mask=mask, enable_gqa=True).transpose(1, 2)
        sdpa_s = _bench(sdpa, device)
        nbytes = 2 * batch * total * kv_heads * head_dim * 2  # keys and values, bfloat16, read once
        row = {"batch": batch, "context": context, "T": T, "kernel_us": kernel_s * 1e6, "sdpa_us": sdpa_s * 1e6,
               "unsplit_kernel_us": one_s * 1e6,
               "kernel_gbs": nbytes / kernel_s / 1e9, "fraction_of_bandwidth": nbytes / kernel_s / 1e9 / bandwidth,
               "kernel_max_err": (got.float() - exact).abs().max().item(),
               "sdpa_max_err": (sdpa().transpose(1, 2).float() - exact).abs().max().item()}
        report["attention"].append(row)
        print(row, flush=True)
        k_pool = v_pool = k_dense = v_dense = exact = got = None  # free before the next shape


def end_to_end(report, device):
    """Greedy equivalences on a small random float32 model on the device, recorded as booleans."""
    import torch

    import specdec
    from specdec.bench.harness import SyntheticProposer
    from specdec.bench.large_model import random_model
    from specdec.engine import Engine, RequestParams

    target = random_model("tiny", device, torch.float32, seed=0)
    draft = random_model("tiny", device, torch.float32, seed=1)
    with torch.no_grad():  # random init gives near-uniform logits; sharper ones make realistic greedy paths
        target.lm_head.weight.mul_(8.0)
        draft.lm_head.weight.mul_(8.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, target.vocab_size, (4, 24), generator=gen).to(device)  # [4, 24]

    def run(proposer=None, k=4, **sampling):
        return specdec.generate(target, ids, draft_model=proposer, num_draft_tokens=k, max_new_tokens=40,
                                eos_token_id=[], **(sampling or {"do_sample": False}))

    @contextlib.contextmanager
    def reference_kernels():  # the PyTorch references on CUDA too (kernels/dispatch.py)
        os.environ["SPECDEC_REFERENCE_KERNELS"] = "1"
        try:
            yield
        finally:
            del os.environ["SPECDEC_REFERENCE_KERNELS"]

    plain = run()
    with reference_kernels():
        reference = run()
    checks = {"plain_triton_equals_plain_reference": torch.equal(plain, reference),
              "draft_model_k4_equals_plain": torch.equal(run(draft, 4), plain),
              "draft_model_auto_equals_plain": torch.equal(run(draft, "auto"), plain)}
    rows = list(plain)  # equal-length prompts: no padding
    for rate in (0.3, 0.9):
        synthetic = SyntheticProposer(rows, rate, torch.Generator().manual_seed(1))
        checks[f"synthetic_{rate}_k6_equals_plain"] = torch.equal(run(synthetic, 6), plain)
    # the paged engine: continuous batching over the pool, through the same kernels
    engine = Engine(target, draft, num_draft_tokens=3, max_num_seqs=4, kv_blocks=64, block_size=16,
                    eos_token_id=[])
    for i, row in enumerate(ids.tolist()):
        engine.add_request(row, RequestParams(max_new_tokens=40), f"r{i}")
    emitted = {f"r{i}": [] for i in range(len(ids))}
    while engine.has_unfinished():
        for out in engine.step():
            emitted[out.request_id] += out.new_token_ids
    checks["engine_with_draft_equals_plain"] = all(
        emitted[f"r{i}"] == plain[i, ids.shape[1]:].tolist() for i in range(len(ids)))
    # sampling: the same seed through kernels and references draws the same tokens unless logits differ
    def sampled():
        return run(draft, 4, do_sample=True, temperature=0.7, top_p=0.9,
                   generator=torch.Generator(device=device).manual_seed(0))

    by_kernels = sampled()
    with reference_kernels():
        by_references = sampled()
    if device == "cuda":  # CUDA graphs of the layers (LlamaModel.use_cuda_graphs): the same tokens
        target.use_cuda_graphs()
        try:
            checks["graphs_plain_equals_plain"] = torch.equal(run(), plain)
            checks["graphs_draft_model_k4_equals_plain"] = torch.equal(run(draft, 4), plain)
            synthetic = SyntheticProposer(rows, 0.6, torch.Generator().manual_seed(2))
            checks["graphs_synthetic_0.6_k8_equals_plain"] = torch.equal(run(synthetic, 8), plain)
        finally:
            target.use_cuda_graphs(False)
    report["end_to_end"] = {**checks, "sampled_tokens_same_kernels_vs_references":
                            (by_kernels == by_references).float().mean().item()}
    print(report["end_to_end"], flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=150, help="seconds for the kernel test files")
    parser.add_argument("--only", nargs="+", help="run only these sections (machine always runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SPECDEC_TRITON_ON_CPU"] = "1"  # the whole model through the kernels, as on CUDA
    import torch

    device = "cpu" if args.smoke else "cuda"
    report = Report(Path(os.environ.get("OUT", ".")) / "gpu_check.json", date=time.strftime("%Y-%m-%d"),
                    attention=[], sampler=[])

    with report.section("machine"):
        import transformers
        import triton

        from specdec.bench.common import bandwidth_gbs

        report.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)",
                      torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
        report["copy_bandwidth_gbs"] = bandwidth_gbs(1024 if device == "cuda" else 4, repeats=10, device=device)
        print(report["device"], report["torch"], report["triton"], report["transformers"],
              f"copy {report['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    bandwidth = report.get("copy_bandwidth_gbs", float("nan"))

    from specdec.bench.large_model import report as large_model_report

    def large_model(cuda_graphs: bool):
        name = "large_model_graphs" if cuda_graphs else "large_model"
        report[name] = large_model_report(
            device, "llama3-8b" if device == "cuda" else "tiny", torch.bfloat16 if device == "cuda" else torch.float32,
            cuda_graphs=cuda_graphs, **({} if device == "cuda" else dict(ks=(1, 2), batch_sizes=(1, 2), tokens=8)))

    def kernel_tests():
        try:
            tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels_attention.py",
                                    "tests/test_kernels_sampler.py"], capture_output=True, text=True,
                                   timeout=args.test_timeout)
            report["kernel_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout else tests.stderr[-500:]
            if tests.returncode != 0:
                report["kernel_tests_output"] = tests.stdout[-4000:] + tests.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            report["kernel_tests"] = f"cut off after {args.test_timeout} s"
            report["kernel_tests_output"] = str(e.stdout or "")[-4000:]
        print("kernel tests on CUDA:", report["kernel_tests"], flush=True)

    sections = {"sampler": lambda: sampler(report, device), "attention": lambda: attention(report, device, bandwidth),
                "end_to_end": lambda: end_to_end(report, device), "large_model": lambda: large_model(False)}
    if not args.smoke:  # (graphs need a GPU; the interpreter runs the kernel tests in CI already)
        sections.update(large_model_graphs=lambda: large_model(True), kernel_tests=kernel_tests)
    for name, run in sections.items():
        if not args.only or name in args.only:
            with report.section(name):
                run()

    print(f"\n{report.get('device')}, {report['date']}; copy bandwidth {bandwidth:.0f} GB/s\n")
    print("| batch | context | T | kernel µs | unsplit µs | SDPA µs | kernel GB/s | of bandwidth "
          "| max err kernel / SDPA |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in report["attention"]:
        print(f"| {r['batch']} | {r['context']} | {r['T']} | {r['kernel_us']:.0f} | {r['unsplit_kernel_us']:.0f} "
              f"| {r['sdpa_us']:.0f} "
              f"| {r['kernel_gbs']:.0f} | {100 * r['fraction_of_bandwidth']:.0f}% "
              f"| {r['kernel_max_err']:.4f} / {r['sdpa_max_err']:.4f} |")
    print("\n| vocab | batch | k | kernel µs | reference µs | speedup | bit-identical |\n|---|---|---|---|---|---|---|")
    for r in report["sampler"]:
        print(f"| {r['vocab']} | {r['batch']} | {r['k']} | {r['kernel_us']:.0f} | {r['reference_us']:.0f} "
              f"| {r['speedup']:.1f}x | {r['bit_identical']} |")
    for name in ("large_model", "large_model_graphs"):
        if name in report:
            big = report[name]
            print(f"\n{big['preset']}, CUDA graphs {big['cuda_graphs']}: plain {big['plain_tokens_per_s']:.1f} tok/s = "
                  f"{100 * big['fraction_of_roofline']:.0f}% of the HBM roofline ({big['roofline_tokens_per_s']:.0f} "
                  "tok/s); verification pass of k + 1 tokens / plain step: "
                  + ", ".join(f"k={k}: {v:.2f}" for k, v in big["verification_cost"].items()))
    print("sections failed:", ", ".join(report["errors"]) or "none", "; seconds:", report["seconds"])


if __name__ == "__main__":
    main()
