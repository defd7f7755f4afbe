"""Choose the linear-mode defaults from measurements.

Generates the greedy reference once with plain vLLM (cached as JSON), then
replays it through ``LookaheadProposer`` for each configuration: at every
step the proposer drafts from the true history, the draft is accepted up to
its first mismatch with the reference, and the request advances by the
accepted tokens plus one. This is exactly what vLLM's greedy verification
does, so tokens per target forward (compression) are the engine's, without
running an engine per configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SPEC_BENCH, Method, chat_prompts, load_prompts, run_method,
)


def reference(model: str, prompts_file: str, num_prompts: int, max_tokens: int,
              cache: Path) -> list[dict]:
    if cache.exists():
        return json.loads(cache.read_text())
    from transformers import AutoTokenizer

    prompts = load_prompts(prompts_file, num_prompts)
    texts = chat_prompts(model, prompts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    result = run_method(model, Method("plain-vllm"), texts, max_tokens, len(texts))
    records = [
        {"category": p["category"], "prompt": tokenizer(t)["input_ids"], "output": o}
        for p, t, o in zip(prompts, texts, result.token_ids)
    ]
    cache.write_text(json.dumps(records))
    return records


def replay(records: list[dict], k: int, vocab_size: int, **lookahead) -> dict:
    from vllm_lookahead import LookaheadProposer
    from vllm_lookahead import vllm as vllm_patches
    from vllm_lookahead.tree.protocol import BatchInfo, DraftInputs

    vllm_patches.apply_all()
    max_len = max(len(r["prompt"]) + len(r["output"]) for r in records) + k + 1
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_len,
                                     get_vocab_size=lambda: vocab_size),
        scheduler_config=SimpleNamespace(max_num_seqs=len(records)),
        additional_config={"lookahead": lookahead},
    )
    proposer = LookaheadProposer(config)
    tokens = np.zeros((len(records), max_len), dtype=np.int32)
    done = np.zeros(len(records), dtype=np.int64)  # output tokens produced
    forwards = np.zeros(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        seq = r["prompt"] + r["output"]
        tokens[i, : len(seq)] = seq
        done[i] = 1 if r["output"] else 0  # the prefill forward yields one
        forwards[i] = 1
    proposed = accepted = 0
    last_sampled = {i: [0] for i in range(len(records))}
    while True:
        live = [i for i, r in enumerate(records) if done[i] < len(r["output"])]
        if not live:
            break
        lengths = np.array([len(records[i]["prompt"]) + done[i] for i in live])
        rows = tokens[live]
        n = len(live)
        proposer.bind_batch(BatchInfo([str(i) for i in live], [True] * n, False, [0] * n,
                                      [None] * n, scheduled_tokens=0))
        drafts = proposer.draft(DraftInputs([last_sampled[i] for i in live], lengths,
                                            rows)).tokens
        for j, i in enumerate(live):
            out = records[i]["output"]
            a = 0
            for tok in drafts[j]:
                if done[i] + a < len(out) and out[done[i] + a] == tok:
                    a += 1
                else:
                    break
            proposed += len(drafts[j])
            accepted += a
            done[i] = min(len(out), done[i] + a + 1)
            last_sampled[i] = [0] * (a + 1)
            forwards[i] += 1
    total = sum(len(r["output"]) for r in records)
    return {"compression": total / forwards.sum(), "accepted": accepted,
            "proposed": proposed, "draft_precision": accepted / max(proposed, 1),
            "drafted_per_forward": proposed / forwards.sum()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model directory (default: SmolLM2)")
    parser.add_argument("--prompts", default=str(SPEC_BENCH))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cache", default="/tmp/vllm_lookahead_reference.json")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from vllm_lookahead.models import ensure_model
        model = str(ensure_model("smollm2"))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    records = reference(model, args.prompts, args.num_prompts, args.max_tokens,
                        Path(args.cache))
    print(f"{'k':>3}{'ngram':>6}{'key':>5}{'adaptive':>9}{'tok/fwd':>9}"
          f"{'precision':>11}{'drafted/fwd':>13}")
    for k, ngram, key_len, adaptive in itertools.product(
            [4, 8], [3, 4], [1, 2], [False, True]):
        r = replay(records, k, vocab, ngram=ngram, key_len=key_len, adaptive=adaptive)
        print(f"{k:>3}{ngram:>6}{key_len:>5}{str(adaptive):>9}{r['compression']:>9.3f}"
              f"{r['draft_precision']:>11.3f}{r['drafted_per_forward']:>13.2f}",
              flush=True)


if __name__ == "__main__":
    main()
