"""Offline replay of the context-match chain over plain vLLM's greedy outputs.

    python benchmarks/replay_chain.py --model qwen-coder-1.5b --prompts spec-bench \
        --per-category 3 --max-tokens 64 [--outputs FILE.json]

Generates the prompts once with plain vLLM (or reads ``--outputs`` written by
an earlier run), then replays decoding with the chain
(``recycle.chain_tokens``: what followed the earliest earlier occurrence of
the longest 1-4 token suffix) and prints, per match length, how often the
chain's node at each depth is accepted, and the tokens per target forward
(S) and speed of three policies under a step-time curve (step time by
scheduled tokens, relative to one; ``--step-times``): vLLM ``ngram``'s (a
chain of 8 after a match of 2+ tokens), chains cut per match length and
depth by the measured rates, and chains cut per depth alone. Cutting uses
the rates of the same outputs (in-sample): an upper bound of what the
measured budget learns online.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.benchmark import collect_prompts, prompt_texts, resolve_model  # noqa: E402
from vllm_lookahead.proposers.recycle import CHAIN_MAX_NGRAM, chain_tokens  # noqa: E402

DEPTH = 8


def generate(model: str, sources: list[str], per_category: int, max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    prompts = collect_prompts(sources, per_category)
    llm = common.make_llm(model, common.Method("plain-vllm"), max_num_seqs=8,
                          enforce_eager=True)
    outputs = llm.generate(prompt_texts(model, prompts),
                           SamplingParams(temperature=0.0, max_tokens=max_tokens),
                           use_tqdm=False)
    return [{"category": p.category, "prompt": list(o.prompt_token_ids),
             "output": list(o.outputs[0].token_ids)} for p, o in zip(prompts, outputs)]


def accepted_length(chain: np.ndarray, future: list[int]) -> int:
    n = 0
    while n < len(chain) and n < len(future) and chain[n] >= 0 and chain[n] == future[n]:
        n += 1
    return n


def acceptance_by_match(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Steps with each match length (0: none) and, per match length and
    depth, the rate at which the chain's node there is accepted, at every
    position of the greedy outputs."""
    hits = np.zeros((CHAIN_MAX_NGRAM + 1, DEPTH))
    steps = np.zeros(CHAIN_MAX_NGRAM + 1)
    for record in records:
        text = np.asarray(record["prompt"] + record["output"], dtype=np.int32)
        start = len(record["prompt"])
        for p in range(len(record["output"])):
            chains, sizes = chain_tokens([text[:start + p]], DEPTH)
            steps[sizes[0]] += 1
            hits[sizes[0], :accepted_length(chains[0], record["output"][p:])] += 1
    return steps, hits / np.maximum(steps, 1)[:, None]


def replay(records: list[dict], depth_of, step_time) -> tuple[float, float]:
    """S and speed (tokens per unit of step time, plain = 1) of decoding with
    chains of ``depth_of(match_length)`` tokens."""
    tokens = steps = 0
    seconds = 0.0
    for record in records:
        text = np.asarray(record["prompt"] + record["output"], dtype=np.int32)
        start, output = len(record["prompt"]), record["output"]
        p = 0
        while p < len(output):
            chains, sizes = chain_tokens([text[:start + p]], DEPTH)
            chain = chains[0][:depth_of(int(sizes[0]))]
            chain = chain[chain >= 0]
            produced = min(accepted_length(chain, output[p:]) + 1, len(output) - p)
            tokens, steps, seconds = tokens + produced, steps + 1, seconds + step_time(1 + len(chain))
            p += produced
    return tokens / steps, tokens / seconds


def best_depth(rates: np.ndarray, step_time) -> int:
    """The chain length of the highest expected net gain: accepted tokens
    less the plain steps its extra time is worth."""
    net = [0.0] + [rates[:d].sum() - (step_time(1 + d) - 1) for d in range(1, DEPTH + 1)]
    return int(np.argmax(net))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-coder-1.5b")
    parser.add_argument("--prompts", nargs="+", default=["spec-bench"])
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--outputs", type=Path, help="greedy outputs (JSON): read if it "
                        "exists, else generated and written there")
    parser.add_argument("--step-times", default="1:1,2:1.03,4:1.19,7:1.46,17:2.22,33:3.4",
                        help="scheduled tokens:relative step time, interpolated (default: "
                        "Qwen2.5-Coder-1.5B fp32 at batch 1 on this 2-core CPU)")
    args = parser.parse_args()
    if args.outputs and args.outputs.exists():
        records = json.loads(args.outputs.read_text())
    else:
        records = generate(resolve_model(args.model), args.prompts, args.per_category,
                           args.max_tokens)
        if args.outputs:
            args.outputs.write_text(json.dumps(records))
    sizes, times = zip(*(map(float, pair.split(":")) for pair in args.step_times.split(",")))
    step_time = lambda n: float(np.interp(n, sizes, times))  # noqa: E731
    steps, rates = acceptance_by_match(records)
    print("match length | steps | acceptance of the chain's node at depth 1..8")
    for size in range(1, CHAIN_MAX_NGRAM + 1):
        print(f"{size} | {int(steps[size])} | {' '.join(f'{r:.3f}' for r in rates[size])}")
    matched = steps[1:] @ rates[1:] / max(steps[1:].sum(), 1)
    policies = {
        "vLLM ngram (8 after a 2+ token match)": lambda size: DEPTH if size >= 2 else 0,
        "cut per match length and depth": lambda size: best_depth(rates[size], step_time)
        if size else 0,
        "cut per depth alone": lambda size: best_depth(matched, step_time) if size else 0,
    }
    for name, depth_of in policies.items():
        s, speed = replay(records, depth_of, step_time)
        print(f"{name}: S {s:.3f}, {speed:.3f}x plain")


if __name__ == "__main__":
    main()
