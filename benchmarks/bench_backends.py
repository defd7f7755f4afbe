"""Tree mode on each attention backend vLLM runs on this machine, in one run:
plain vLLM and lookahead's tree (static and measured budget) with vLLM's
CPU_ATTN backend and with its FLEX_ATTENTION backend (the CUDA backends'
LBNHC KV layout, run on CPU), greedy outputs compared with plain vLLM on
the same backend.

    python benchmarks/bench_backends.py --model smollm2 --num-prompts 8

Prints tokens/s, tokens per target forward (S), accepted tokens per
verified node and identity per (backend, method); ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SHIPPED_PROMPTS, SPEC_BENCH, Method, chat_prompts, load_prompts, lookahead_method,
    run_method,
)

DEFAULT_PROMPTS = SPEC_BENCH if SPEC_BENCH.exists() else SHIPPED_PROMPTS

# Engine settings per backend. FLEX on CPU: 16-token cache blocks under
# 128-token mask blocks, so FLEX builds its block mask the generic way
# (Inductor's CPU code cannot lower the direct one).
BACKENDS = {"CPU_ATTN": {},
            "FLEX_ATTENTION": {"attention_config": {"backend": "FLEX_ATTENTION",
                                                    "flex_attn_kv_block_size": 128},
                               "block_size": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="a registry key of vllm_lookahead.models or a local HF directory")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                        help="Spec-Bench-format JSONL file (category, turns)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tree-k", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    model = args.model
    if not Path(model).is_dir():
        from vllm_lookahead.models import ensure_model
        model = str(ensure_model(model))
    prompts = chat_prompts(model, load_prompts(args.prompts, args.num_prompts))
    methods = [Method("plain-vllm"), lookahead_method(args.tree_k, budget="static"),
               lookahead_method(args.tree_k)]
    rows = []
    for backend in args.backends.split(","):
        plain = None
        for method in methods:
            print(f"[{backend}] {method.name} ...", flush=True)
            result = run_method(model, method, prompts, args.max_tokens, args.batch_size,
                                dtype=args.dtype, enforce_eager=True, **BACKENDS[backend])
            plain = plain or result
            rows.append({"backend": backend, **result.summary(),
                         "accepted_per_node": round(result.accepted_tokens
                                                    / max(result.draft_tokens, 1), 3),
                         "speedup": round(result.tokens_per_s / plain.tokens_per_s, 3),
                         "identical": result.token_ids == plain.token_ids})
    print(f"\n{len(prompts)} prompts from {args.prompts}, batch {args.batch_size}, "
          f"{args.max_tokens} tokens, {args.dtype}, eager")
    print(f"{'backend':<16}{'method':<24}{'tok/s':>8}{'vs plain':>10}{'S':>7}"
          f"{'acc/node':>10}{'identical':>11}")
    for r in rows:
        print(f"{r['backend']:<16}{r['method']:<24}{r['tokens_per_s']:>8.2f}"
              f"{r['speedup']:>9.2f}x{r['compression']:>7.2f}{r['accepted_per_node']:>10.3f}"
              f"{'yes' if r['identical'] else 'NO':>11}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
