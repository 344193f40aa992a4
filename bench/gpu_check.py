"""Every GPU check in one call (one H100, under 8 minutes): the kernel tests on CUDA, verification attention
against torch's SDPA on the same data, the fused rejection sampler against its PyTorch reference, and the
card's copy bandwidth. Prints one table; writes gpu_check.json (to $OUT when set).

    python bench/gpu_check.py            # on a CUDA machine
    python bench/gpu_check.py --smoke    # tiny sizes on the CPU through Triton's interpreter (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from specdec.kernels.rejection_sample import (
        rejection_sample_reference,
        rejection_sample_triton,
    )
    from specdec.kernels.verify_attention import verify_attention_triton

    device = "cpu" if args.smoke else "cuda"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)",
              "date": time.strftime("%Y-%m-%d"), "attention": [], "sampler": []}
    if not args.smoke:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_kernels_attention.py",
                                "tests/test_kernels_sampler.py"], capture_output=True, text=True)
        report["kernel_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout else tests.stderr[-500:]
        print("kernel tests on CUDA:", report["kernel_tests"])

    big = torch.empty(2**28 if device == "cuda" else 2**20, dtype=torch.float32, device=device)
    copy_s = _bench(lambda: big.clone(), device, repeats=10)
    bandwidth = 2 * big.numel() * 4 / copy_s / 1e9
    report["copy_bandwidth_gbs"] = bandwidth
    big = None  # free the buffer before the attention shapes

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
        kernel_s = _bench(lambda: verify_attention_triton(q, k_pool, v_pool, table, ctx, qlen), device)
        # SDPA on the same data laid out contiguously (its best case: no block table to follow)
        k_dense = k_pool[table.long()].reshape(batch, -1, kv_heads, head_dim)[:, :total].transpose(1, 2).contiguous()
        v_dense = v_pool[table.long()].reshape(batch, -1, kv_heads, head_dim)[:, :total].transpose(1, 2).contiguous()
        mask = torch.arange(total, device=device)[None, :] <= (context + torch.arange(T, device=device))[:, None]
        sdpa_s = _bench(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_dense, v_dense, attn_mask=mask,
                                                               enable_gqa=True), device)
        nbytes = 2 * batch * total * kv_heads * head_dim * 2  # keys and values, bfloat16, read once
        row = {"batch": batch, "context": context, "T": T, "kernel_us": kernel_s * 1e6, "sdpa_us": sdpa_s * 1e6,
               "kernel_gbs": nbytes / kernel_s / 1e9, "fraction_of_bandwidth": nbytes / kernel_s / 1e9 / bandwidth}
        report["attention"].append(row)
        k_pool = v_pool = k_dense = v_dense = None  # free before the next shape

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

    print(f"\n{report['device']}, {report['date']}; copy bandwidth {bandwidth:.0f} GB/s\n")
    print("| batch | context | T | kernel µs | SDPA µs | kernel GB/s | of bandwidth |\n|---|---|---|---|---|---|---|")
    for r in report["attention"]:
        print(f"| {r['batch']} | {r['context']} | {r['T']} | {r['kernel_us']:.0f} | {r['sdpa_us']:.0f} "
              f"| {r['kernel_gbs']:.0f} | {100 * r['fraction_of_bandwidth']:.0f}% |")
    print("\n| vocab | batch | k | kernel µs | reference µs | speedup | bit-identical |\n|---|---|---|---|---|---|---|")
    for r in report["sampler"]:
        print(f"| {r['vocab']} | {r['batch']} | {r['k']} | {r['kernel_us']:.0f} | {r['reference_us']:.0f} "
              f"| {r['speedup']:.1f}x | {r['bit_identical']} |")
    # the benchmark's GPU mode: Llama-3-8B shape, random bfloat16 weights (bench/large_model.py)
    from specdec.bench.large_model import report as large_model_report

    big = large_model_report(device, "llama3-8b" if device == "cuda" else "tiny",
                             torch.bfloat16 if device == "cuda" else torch.float32,
                             **({} if device == "cuda" else dict(ks=(1, 2), batch_sizes=(1, 2), tokens=8)))
    report["large_model"] = big
    print(f"\n{big['preset']}: plain {big['plain_tokens_per_s']:.1f} tok/s = "
          f"{100 * big['fraction_of_roofline']:.0f}% of the HBM roofline ({big['roofline_tokens_per_s']:.0f} tok/s)")
    print("verification pass of k + 1 tokens / plain step: "
          + ", ".join(f"k={k}: {v:.2f}" for k, v in big["verification_cost"].items()))
    out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
