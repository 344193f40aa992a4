"""Load benchmark of the serving stack: throughput and latency percentiles against concurrency, with and
without speculation, through the OpenAI-compatible HTTP API on loopback.

The server (Engine + FastAPI app under uvicorn) runs in this process, on 127.0.0.1 and a free port; each
concurrency level runs a closed loop of ``c`` clients, each sending streaming chat requests (greedy, the
prompts of bench/prompts/ in turn) back to back, bounded by a request count and a duration per level.

    python bench/load.py                          # SmolLM2-135M-Instruct, c = 1 4 16 32, plain / ngram k=4 / ngram auto
    python bench/load.py --concurrency 1 4 --max-tokens 32 --level-seconds 20 --threads 1 --json out.json

Reported per (mode, concurrency): aggregate completion tokens/s, time to first token and inter-token
latency (per request: (last token time - first token time) / (tokens - 1)) at p50/p90/p99, the engine's
tokens per target forward, acceptance rate and mean k per step (what the "auto" controller chose).

``--rounds N`` runs every mode N times, alternating (plain, draft, plain, draft, ...), each round on a fresh
engine: the table then shows medians over rounds, and each mode's ITL and tokens/s against plain are also
given round by round (the same round's plain run, minutes apart at most), since on a shared machine the
drift between two sequential runs is as large as the effects measured.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

MODES = {"plain": (None, 1), "ngram-k4": ("ngram", 4), "ngram-auto": ("ngram", "auto"),
         **{f"draft-k{k}": ("model", k) for k in (1, 2, 3, 4)}, "draft-auto": ("model", "auto")}  # the --draft model


def prompts() -> list[str]:
    """Every held-out prompt, categories interleaved (chat, code, explanation, math, rewriting, chat, ...)."""
    from specdec.bench.common import CATEGORIES, load_prompts

    by_category = load_prompts(sorted(CATEGORIES)).values()
    return [p for group in zip(*by_category) for p in group]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    text, tokens = "", 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += content
    end = time.perf_counter()
    itl = (last - first) / (tokens - 1) if first is not None and tokens > 1 and last > first else None
    return {"prompt": prompt, "text": text, "tokens": tokens, "ttft": (first or end) - start, "itl": itl,
            "e2e": end - start}


async def level(url: str, model: str, concurrency: int, requests: int, seconds: float, max_tokens: int,
                pool: list[str]) -> tuple[list[dict], float]:
    """A closed loop of ``concurrency`` clients until ``requests`` are sent or ``seconds`` have passed."""
    issued = 0
    results: list[dict] = []
    deadline = time.perf_counter() + seconds

    async def client(http):
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            prompt = pool[issued % len(pool)]
            issued += 1
            results.append(await one_request(http, url, model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return results, time.perf_counter() - start


def summary(results: list[dict], wall: float, before, after) -> dict:
    tokens = sum(r["tokens"] for r in results)
    steps = {k: after.steps_by_k.get(k, 0) - before.steps_by_k.get(k, 0) for k in after.steps_by_k}
    n_steps = sum(steps.values())
    proposed, accepted = after.proposed - before.proposed, after.accepted - before.accepted
    emitted, rows = after.emitted - before.emitted, after.row_passes - before.row_passes
    itl = [r["itl"] for r in results if r["itl"] is not None]
    ttft = [r["ttft"] for r in results]
    return {
        "requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p90": percentile(itl, 90), "itl_p99": percentile(itl, 99),
        "itl_mean": statistics.fmean(itl) if itl else None,
        "e2e_p50": percentile([r["e2e"] for r in results], 50),
        "engine_steps": n_steps, "mean_k": sum(k * n for k, n in steps.items()) / n_steps if n_steps else 0.0,
        "steps_by_k": {str(k): n for k, n in sorted(steps.items()) if n},
        "acceptance": accepted / proposed if proposed else None,
        "tokens_per_target_forward": emitted / rows if rows else None,
    }


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["plain", "ngram-k4", "ngram-auto"], choices=list(MODES))
    parser.add_argument("--draft", help="draft model (name, folder or .gguf) for the draft-* modes")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--min-requests", type=int, default=3,
                        help="requests per level: max(this, concurrency) (one wave at high concurrency)")
    parser.add_argument("--level-seconds", type=float, default=30.0, help="no new requests after this long")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-blocks", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a CPU shared with another busy process, 1 "
                             "avoids OpenMP barriers waiting for a descheduled thread")
    parser.add_argument("--rounds", type=int, default=1, help="run every mode this many times, alternating")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    if any(c < 1 or c > 64 for c in args.concurrency) or args.max_tokens < 1 or args.level_seconds <= 0:
        parser.error("concurrency must lie in 1..64, max-tokens >= 1, level-seconds > 0")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if any(m.startswith("draft") for m in args.modes) and not args.draft:
        parser.error("the draft-* modes need --draft")

    import specdec
    from specdec.models.loading import load_draft
    from specdec.server import EngineLoop, InProcessServer, Metrics, ServerConfig, create_app

    from specdec.bench.common import machine

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    target, tokenizer = specdec.load(args.model, dtype=args.dtype)
    draft_model = load_draft(args.draft, args.dtype) if args.draft else None
    pool = prompts()
    report = {"machine": machine(), "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "levels": []}
    texts: dict[tuple, dict[str, str]] = {}
    for round_, mode in itertools.product(range(args.rounds), args.modes):  # rounds alternate the modes
        draft, k = MODES[mode]
        draft = draft_model if draft == "model" else draft
        engine = specdec.Engine(target, draft, num_draft_tokens=k, max_num_seqs=args.max_num_seqs,
                                kv_blocks=args.kv_blocks, block_size=16)
        worker = EngineLoop(engine, Metrics())
        app = create_app(engine, tokenizer, ServerConfig(model_name=args.model, max_queued=64), worker=worker)
        with InProcessServer(app) as server:
            failed = []

            def clients(engine=engine, mode=mode, url=server.url, round_=round_):
                try:
                    run_levels(args, engine, mode, url, pool, report, texts, round_)
                except BaseException as err:  # noqa: BLE001 - re-raised on the main thread below
                    failed.append(err)
                finally:
                    worker.stop()

            thread = threading.Thread(target=clients, name="load-clients")
            thread.start()
            worker.run()  # the engine on the main thread, the one that loaded the model (see EngineLoop)
            thread.join()
            if failed:
                raise failed[0]

    # greedy outputs of speculative modes against plain at the same concurrency (float32 batching may flip
    # near-ties; the float64 tests hold exact identity)
    for row in report["levels"]:
        plain = texts.get((row["round"], "plain", row["concurrency"]), {})
        mine = texts[(row["round"], row["mode"], row["concurrency"])]
        common = [p for p in mine if p in plain]
        row["same_text"] = [sum(mine[p] == plain[p] for p in common), len(common)]

    report["medians"] = medians(report["levels"])
    report["against_plain_by_round"] = against_plain(report["levels"])
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def run_levels(args, engine, mode: str, url: str, pool: list[str], report: dict, texts: dict, round_: int = 0):
    """The warm-up and every concurrency level of one mode against the server at ``url``."""
    asyncio.run(level(url, args.model, 1, 1, 60, 8, pool))  # warm-up: first-call costs
    for c in args.concurrency:
        before = engine.stats
        results, wall = asyncio.run(level(url, args.model, c, max(args.min_requests, c), args.level_seconds,
                                          args.max_tokens, pool))
        row = {"mode": mode, "concurrency": c, "round": round_, **summary(results, wall, before, engine.stats)}
        report["levels"].append(row)
        texts[(round_, mode, c)] = {r["prompt"]: r["text"] for r in results}
        print(f"{mode:>10} c={c:<3} round {round_} {row['tokens_per_second']:7.1f} tok/s  "
              f"ttft p50 {fmt(row['ttft_p50'])} s  "
              f"itl p50 {fmt(row['itl_p50'], '.3f')} s  mean k {row['mean_k']:.2f}  "
              f"tok/fwd {fmt(row['tokens_per_target_forward'])}  ({row['requests']} requests, "
              f"{wall:.1f} s)", file=sys.stderr, flush=True)
        deadline = time.time() + 5  # every request has ended: within a step its blocks are back
        while engine.pool.num_used and time.time() < deadline:
            time.sleep(0.05)
        row["kv_blocks_used_after"] = engine.pool.num_used
        if args.json:  # after every level: a run stopped by its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2))


MEDIAN_FIELDS = ("tokens_per_second", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "itl_p99",
                 "tokens_per_target_forward", "acceptance", "mean_k")


def _by_level(levels: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in levels:
        groups.setdefault((r["mode"], r["concurrency"]), []).append(r)
    return groups


def medians(levels: list[dict]) -> list[dict]:
    """One row per (mode, concurrency): the median of each figure over the rounds, requests and identical
    texts summed."""
    rows = []
    for (mode, c), rs in _by_level(levels).items():
        row = {"mode": mode, "concurrency": c, "rounds": len(rs), "requests": sum(r["requests"] for r in rs)}
        for key in MEDIAN_FIELDS:
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        same = [r["same_text"] for r in rs if r["same_text"][1]]
        row["same_text_as_plain"] = f"{sum(a for a, _ in same)}/{sum(b for _, b in same)}" if same else "-"
        rows.append(row)
    return rows


def against_plain(levels: list[dict]) -> list[dict]:
    """Each speculative mode's ITL p50 and tokens/s over the same round's plain run, round by round."""
    plain = {(r["round"], r["concurrency"]): r for r in levels if r["mode"] == "plain"}
    out = []
    for (mode, c), rs in _by_level(levels).items():
        pairs = [(r, plain[r["round"], c]) for r in rs if mode != "plain" and (r["round"], c) in plain]
        if pairs:
            out.append({"mode": mode, "concurrency": c,
                        "itl_p50_ratio": [r["itl_p50"] / p["itl_p50"] for r, p in pairs
                                          if r["itl_p50"] and p["itl_p50"]],
                        "tokens_per_second_ratio": [r["tokens_per_second"] / p["tokens_per_second"] for r, p in pairs]})
    return out


def table(report: dict) -> str:
    levels = report["medians"]
    base = {r["concurrency"]: r for r in levels if r["mode"] == "plain"}
    one = {r["mode"]: r for r in levels if r["concurrency"] == 1}
    header = ("| mode | concurrency | rounds | requests | tokens/s | vs 1 client | vs plain "
              "| TTFT p50 / p90 / p99 (s) | "
              "ITL p50 / p90 / p99 (ms) | tokens/target fwd | acceptance | mean k | same text as plain |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in levels:
        c = r["concurrency"]
        vs_one = r["tokens_per_second"] / one[r["mode"]]["tokens_per_second"] if r["mode"] in one else None
        vs_plain = r["tokens_per_second"] / base[c]["tokens_per_second"] if c in base else None
        ms = [None if r[f"itl_p{q}"] is None else 1000 * r[f"itl_p{q}"] for q in (50, 90, 99)]
        lines.append(
            f"| {r['mode']} | {c} | {r['rounds']} | {r['requests']} | {r['tokens_per_second']:.1f} | {fmt(vs_one)}x | "
            f"{fmt(vs_plain)}x | {fmt(r['ttft_p50'])} / {fmt(r['ttft_p90'])} / {fmt(r['ttft_p99'])} | "
            f"{fmt(ms[0], '.0f')} / {fmt(ms[1], '.0f')} / {fmt(ms[2], '.0f')} "
            f"| {fmt(r['tokens_per_target_forward'])} | "
            f"{fmt(r['acceptance'])} | {r['mean_k']:.2f} | {r['same_text_as_plain']} |")
    if report["against_plain_by_round"]:
        lines.append("\nAgainst the same round's plain run (round by round; median):\n")
        for r in report["against_plain_by_round"]:
            itl, tps = r["itl_p50_ratio"], r["tokens_per_second_ratio"]
            lines.append(f"- {r['mode']} at {r['concurrency']} client(s): ITL p50 "
                         f"{', '.join(f'{x:.2f}' for x in itl)}x "
                         f"(median {fmt(statistics.median(itl) if itl else None)}x); "
                         f"tokens/s {', '.join(f'{x:.2f}' for x in tps)}x (median {statistics.median(tps):.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
