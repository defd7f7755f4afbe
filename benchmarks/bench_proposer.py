"""Host time of the lookahead proposer in tree mode, per engine step.

Runs the proposer alone (no engine) on synthetic histories: every step it
drafts the batch's trees (pool lookup, window, layout: ``propose``) and takes
a verification result (window update, pool insert: ``observe_verification``),
as inside vLLM. The tree layout runs either as the compiled op (one call per
step) or as its Python reference (a loop over requests), to show what the
compiled op saves.

    python benchmarks/bench_proposer.py --batch-sizes 1,8,32,64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_lookahead import LookaheadProposer, ops  # noqa: E402
from vllm_lookahead import vllm as vllm_patches  # noqa: E402
from vllm_lookahead.proposers.jacobi import reference_tree_layouts  # noqa: E402
from vllm_lookahead.tree.protocol import BatchInfo, DraftInputs, Verification  # noqa: E402

LAYOUTS = {"compiled": ops.lookahead_tree_layout,
           "python": reference_tree_layouts}


def make_proposer(batch: int, max_len: int, lookahead: dict) -> LookaheadProposer:
    vllm_patches.apply_all()  # the proposer checks that the vLLM plugin is active
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=64),
        model_config=SimpleNamespace(max_model_len=max_len, get_vocab_size=lambda: 32000,
                                     dtype=torch.float32, get_sliding_window=lambda: None),
        device_config=SimpleNamespace(device_type="cpu"),
        scheduler_config=SimpleNamespace(max_num_seqs=batch),
        additional_config={"lookahead": {"budget": "static", "max_tree_tokens": 0,
                                         **lookahead}},
    )
    return LookaheadProposer(config)


def run(batch: int, steps: int, prompt_len: int, vocab: int, lookahead: dict,
        seed: int = 0) -> float:
    """Mean host seconds per step (propose + observe_verification)."""
    rng = np.random.default_rng(seed)
    max_len = prompt_len + steps + 1
    proposer = make_proposer(batch, max_len, lookahead)
    # A small vocabulary, so the pool finds continuations as on real text.
    tokens = rng.integers(0, vocab, size=(batch, max_len), dtype=np.int32)
    req_ids = [f"r{i}" for i in range(batch)]
    lengths = np.full(batch, prompt_len, dtype=np.int32)
    elapsed, timed = 0.0, 0
    for step in range(steps):
        started = time.perf_counter()
        proposer.bind_batch(BatchInfo(req_ids, [True] * batch, True, [prompt_len] * batch,
                                      [None] * batch, scheduled_tokens=0))
        drafts = proposer.draft(DraftInputs(
            [[int(tokens[i, n - 1])] for i, n in enumerate(lengths)], lengths, tokens)).tokens
        cu_rows = np.concatenate([[0], np.cumsum([len(d) + 1 for d in drafts])])
        argmax = rng.integers(0, vocab, size=int(cu_rows[-1])).astype(np.int32)
        proposer.observe_verification(Verification(
            req_ids, argmax, cu_rows, np.zeros(batch, np.int64),
            np.full((batch, max(1, max(len(d) for d in drafts))), -1, np.int64)))
        if step >= 3:  # warm-up: window levels fill, pools from the prompt
            elapsed += time.perf_counter() - started
            timed += 1
        lengths += 1
    return elapsed / timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=200)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--guesses", type=int, default=3)
    parser.add_argument("--ngram", type=int, default=3)
    args = parser.parse_args()
    lookahead = {"window": args.window, "guesses": args.guesses, "ngram": args.ngram}
    print(f"tree mode W={args.window} G={args.guesses} N={args.ngram}, static budget, "
          f"{args.steps} steps, host ms per step (propose + observe_verification)")
    print("| batch | compiled layout | Python layout | saved |")
    print("| --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times = {}
        for name, layout in LAYOUTS.items():
            ops.lookahead_tree_layout = layout
            try:
                times[name] = run(batch, args.steps, args.prompt_len, args.vocab, lookahead)
            finally:
                ops.lookahead_tree_layout = LAYOUTS["compiled"]
        print(f"| {batch} | {1e3 * times['compiled']:.2f} | {1e3 * times['python']:.2f} | "
              f"{1 - times['compiled'] / times['python']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
