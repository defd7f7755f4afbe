"""Demo: greedy generation with the lookahead proposer next to plain vLLM.

Prints tokens/s, tokens per target forward, mean accepted tokens per
drafted step, and whether the outputs are token-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SPEC_BENCH, Method, chat_prompts, load_prompts, lookahead_method, ngram_method,
    run_method,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF model directory "
                        "(default: SmolLM2-135M-Instruct, fetched and converted once)")
    parser.add_argument("--prompts", default=str(SPEC_BENCH),
                        help="Spec-Bench-format JSONL file (category, turns)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8,
                        help="num_speculative_tokens of linear mode and vLLM ngram")
    parser.add_argument("--tree-k", type=int, default=16,
                        help="num_speculative_tokens of tree mode (nodes per tree)")
    parser.add_argument("--compare-ngram", action="store_true",
                        help="also run vLLM's built-in ngram method")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from vllm_lookahead.models import ensure_model
        model = str(ensure_model("smollm2"))
    prompts = chat_prompts(model, load_prompts(args.prompts, args.num_prompts))
    print(f"model: {model}\nprompts: {len(prompts)} from {args.prompts}, "
          f"batch {args.batch_size}, max_tokens {args.max_tokens}", flush=True)

    methods = [Method("plain-vllm"), lookahead_method(args.tree_k),
               lookahead_method(args.k, mode="linear")]
    if args.compare_ngram:
        methods.append(ngram_method(args.k))
    results = []
    for method in methods:
        print(f"running {method.name} ...", flush=True)
        results.append(run_method(model, method, prompts, args.max_tokens,
                                  args.batch_size))
    plain = results[0]
    identical = all(r.token_ids == plain.token_ids for r in results)
    print()
    print("tok/fwd: output tokens per target forward; accepted/step: draft tokens "
          "accepted per drafted step (vLLM's mean acceptance length minus 1)")
    print(f"{'method':<18}{'tokens':>8}{'tok/s':>9}{'speedup':>9}{'tok/fwd':>9}"
          f"{'accepted/step':>15}{'identical':>11}")
    for r in results:
        same = "yes" if r.token_ids == plain.token_ids else "NO"
        print(f"{r.method:<18}{r.output_tokens:>8}{r.tokens_per_s:>9.2f}"
              f"{r.tokens_per_s / plain.tokens_per_s:>8.2f}x{r.compression:>9.2f}"
              f"{r.mean_accepted_per_draft:>15.2f}{same:>11}")
    print(f"\noutputs identical to plain vLLM: {'yes' if identical else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": model, "identical": identical,
             "results": [r.summary() for r in results]}, indent=2))
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
