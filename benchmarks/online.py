"""Online load sweep: ``vllm serve`` on loopback, a real HTTP client sending
Poisson arrivals at several request rates, per method.

    python benchmarks/online.py --rates 0.25,0.5,1 --num-requests 16

For each method a server starts (``python -m vllm_lookahead.serve``), the
same prompts are sent at each rate (streamed completions, greedy), and the
client records time to first token, time per output token, end-to-end
latency and output throughput. Results go to ``online.json`` / ``online.md``
in ``--out``; the streamed texts are compared with plain vLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchmark import (  # noqa: E402
    build_methods, collect_prompts, machine, prompt_texts, resolve_model,
)
from benchmarks.common import REPO, Method  # noqa: E402

STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm_lookahead.serve`` for one method, logging to a file."""

    def __init__(self, model: str, method: Method, max_num_seqs: int, log: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vllm_lookahead.serve", model,
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                   "--max-model-len", "2048", "--max-num-seqs", str(max_num_seqs),
                   "--kv-cache-memory-bytes", str(1 << 30), "--seed", "0"]
        if method.speculative_config:
            command += ["--speculative-config", json.dumps(method.speculative_config)]
        if method.additional_config:
            command += ["--additional-config", json.dumps(method.additional_config)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ), start_new_session=True)

    async def ready(self, session) -> None:
        import aiohttp

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}; "
                                   f"see {self.log.name}")
            try:
                async with session.get(f"{self.base}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            # A starting server has no event to wait on: poll.
            await asyncio.sleep(1)
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


async def _one(session, base: str, model: str, prompt: str, max_tokens: int,
               delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    stamps, text = [], []
    async with session.post(f"{base}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        tokens = 0
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    stamps.append(time.perf_counter())
                    text.append(choice["text"])
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else end - start
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if stamps and tokens > 1 else None
    return {"start": start, "end": end, "ttft": ttft, "tpot": tpot, "tokens": tokens,
            "text": "".join(text)}


async def sweep(server: Server, model: str, prompts: list[str], rates: list[float],
                max_tokens: int, seed: int) -> list[dict[str, Any]]:
    import random

    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await server.ready(session)
        await _one(session, server.base, model, prompts[0], 4, 0.0)  # warm-up
        rows = []
        for rate in rates:
            rng = random.Random(seed)
            delays, t = [], 0.0
            for _ in prompts:
                delays.append(t)
                t += rng.expovariate(rate)
            results = await asyncio.gather(*[
                _one(session, server.base, model, p, max_tokens, d)
                for p, d in zip(prompts, delays)])
            span = max(r["end"] for r in results) - min(r["start"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            tpots = [r["tpot"] for r in results if r["tpot"] is not None]
            rows.append({
                "rate": rate, "requests": len(results), "output_tokens": tokens,
                "throughput": round(tokens / span, 2),
                "ttft_ms_mean": round(1e3 * statistics.mean(r["ttft"] for r in results), 1),
                "ttft_ms_p90": round(1e3 * sorted(r["ttft"] for r in results)[
                    int(0.9 * (len(results) - 1))], 1),
                "tpot_ms_mean": round(1e3 * statistics.mean(tpots), 1) if tpots else None,
                "latency_s_mean": round(statistics.mean(r["end"] - r["start"]
                                                        for r in results), 2),
                "texts": [r["text"] for r in results],
            })
            print(f"  rate {rate}/s: {rows[-1]['throughput']} tok/s, TTFT "
                  f"{rows[-1]['ttft_ms_mean']} ms, TPOT {rows[-1]['tpot_ms_mean']} ms",
                  flush=True)
        return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Online sweep, model `{Path(results['model']).name}`, "
             f"{results['num_requests']} requests per rate (Poisson arrivals), "
             f"{results['max_tokens']} new tokens, greedy, max_num_seqs "
             f"{results['max_num_seqs']}; commit {results['machine']['commit']}.", "",
             "| rate req/s | method | tok/s | TTFT ms (mean / p90) | TPOT ms | latency s "
             "| identical |", "| --- | --- | --- | --- | --- | --- | --- |"]
    plain = {r["rate"]: r for r in results["methods"].get("plain-vllm", [])}
    for rate in results["rates"]:
        for method, rows in results["methods"].items():
            row = next((r for r in rows if r["rate"] == rate), None)
            if row is None:
                continue
            same = plain.get(rate) and row["texts"] == plain[rate]["texts"]
            lines.append(f"| {rate} | {method} | {row['throughput']} | {row['ttft_ms_mean']} / "
                         f"{row['ttft_ms_p90']} | {row['tpot_ms_mean']} | "
                         f"{row['latency_s_mean']} | {'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft-model")
    parser.add_argument("--prompts", nargs="+", default=["spec-bench"])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--rates", default="0.25,0.5,1,2", help="requests per second")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--methods", default="plain,lookahead-linear,lookahead-tree")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tree-k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "online")
    args = parser.parse_args()
    model = resolve_model(args.model)
    methods = build_methods(args.methods.split(","), args.k, args.tree_k,
                            resolve_model(args.draft_model))
    rates = [float(r) for r in args.rates.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_texts(model, collect_prompts(args.prompts, per_category=10**6)
                           [:args.num_requests])
    results = {"machine": machine(), "model": model, "rates": rates,
               "num_requests": len(prompts), "max_tokens": args.max_tokens,
               "max_num_seqs": args.max_num_seqs, "methods": {}}
    for method in methods:
        print(f"{method.name}: starting server", flush=True)
        server = Server(model, method, args.max_num_seqs, args.out / f"{method.name}.log")
        try:
            results["methods"][method.name] = asyncio.run(
                sweep(server, model, prompts, rates, args.max_tokens, args.seed))
        finally:
            server.stop()
    (args.out / "online.json").write_text(json.dumps(results, indent=1))
    (args.out / "online.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
