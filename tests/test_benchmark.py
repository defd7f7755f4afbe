"""The benchmark harness: metrics arithmetic, report, and one small real run
(two methods, two batch sizes, a user prompt file) end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.benchmark import Cell, collect_prompts
from benchmarks.report import README_BEGIN, README_END, markdown, update_readme

REPO = Path(__file__).resolve().parent.parent


def test_cell_summary_histogram_and_compression():
    cell = Cell("m", 1, "c", requests=2, output_tokens=40, seconds=2.0, accepted=10,
                drafts=8, draft_tokens=30, accepted_per_pos=[5, 3, 2],
                ttft_s=[0.1, 0.3], tpot_s=[0.02])
    out = cell.summary()
    # 8 drafted steps: 3 accepted none, 2 exactly one, 1 exactly two, 2 three.
    assert out["accepted_histogram"] == [3, 2, 1, 2]
    assert sum(a * n for a, n in enumerate(out["accepted_histogram"])) == 10
    assert out["compression"] == pytest.approx(40 / 30, abs=1e-3)
    # Long drafts: vLLM counts accepted tokens that max_tokens then drops; a
    # request still needs its prefill and one forward per drafted step.
    long = Cell("m", 1, "c", requests=1, output_tokens=64, seconds=1.0, accepted=70,
                drafts=8, draft_tokens=72).summary()
    assert long["compression"] == pytest.approx(64 / 9, abs=1e-3)
    assert out["tokens_per_s"] == 20.0 and out["ttft_ms"] == 200.0 and out["tpot_ms"] == 20.0
    total = Cell("m", 1, "all", identical=True)
    total.add(cell)
    total.add(Cell("m", 1, "d", output_tokens=10, seconds=1.0, accepted_per_pos=[1],
                   identical=False))
    assert total.output_tokens == 50 and total.accepted_per_pos == [6, 3, 2]
    assert total.identical is False


def test_prompts_per_category_from_any_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"category": c, "turns": [f"{c} {i}"]})
                              for c in "ab" for i in range(3)))
    prompts = collect_prompts([str(path)], per_category=2)
    assert [p.text for p in prompts] == ["a 0", "a 1", "b 0", "b 1"]
    with pytest.raises(FileNotFoundError):
        collect_prompts([str(tmp_path / "missing.jsonl")], 1)


def test_shipped_prompts_stand_in_for_spec_bench(monkeypatch, tmp_path):
    """A clone without the shared folder runs on the prompts shipped in
    benchmarks/data/: Spec-Bench's format and its 13 categories."""
    from benchmarks import common

    shipped = common.load_prompts(common.SHIPPED_PROMPTS)
    assert len({p["category"] for p in shipped}) == 13
    assert max(len(p["text"]) for p in shipped) > 1500 > min(len(p["text"]) for p in shipped)
    monkeypatch.setattr(common, "SPEC_BENCH", tmp_path / "absent.jsonl")
    assert common.default_prompt_file() == common.SHIPPED_PROMPTS
    present = tmp_path / "question.jsonl"
    present.write_text(json.dumps({"category": "c", "turns": ["t"]}))
    monkeypatch.setattr(common, "SPEC_BENCH", present)
    assert common.default_prompt_file() == present
    assert [p.category for p in collect_prompts(["shipped"], 1)][:2] == ["writing", "roleplay"]
    assert len(common.humaneval_records(3)) == 3


def test_demo_help_says_how_to_run_your_own_model():
    run = subprocess.run([sys.executable, "benchmarks/demo.py", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for text in ("--model", "--prompts", "Spec-Bench", '"turns"', "humaneval",
                 "bash scripts/demo.sh --model"):
        assert text in run.stdout, text


def _results(cells):
    return {"machine": {"cpu": "x", "cores": 2, "vllm": "0.32.0", "torch": "2", "commit": "abc",
                        "date": "today"},
            "model": "/m/smollm2", "prompts": ["spec-bench"], "per_category": 1,
            "max_tokens": 8, "batch_sizes": [1], "skipped": {"vllm-suffix": "ImportError: x"},
            "methods": {"plain-vllm": {}, "lookahead-tree": {}}, "cells": cells}


def test_report_tables_and_readme_section(tmp_path):
    cells = [Cell("plain-vllm", 1, c, output_tokens=10, seconds=1.0, identical=True).summary()
             for c in ("all", "coding")]
    cells += [Cell("lookahead-tree", 1, c, output_tokens=10, seconds=0.5, accepted=5, drafts=5,
                   draft_tokens=20, accepted_per_pos=[5], identical=True).summary()
              for c in ("all", "coding")]
    cells.append(Cell("vllm-ngram", 1, "all", output_tokens=10, seconds=0.4,
                      identical=True).summary())
    text = markdown(_results(cells))
    assert "| 1 | lookahead-tree | 20.0 | 2.00x | 2.00 | 1.00 | 0.250 |" in text
    assert ("Batch 1: lookahead-tree (default) at 0.80x the fastest fixed configuration, "
            "vllm-ngram (which beats plain vLLM).") in text
    assert "| coding | 2.00x (2.00) |" in text
    assert "`vllm-suffix` did not run here: ImportError: x" in text
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results(cells)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    update_readme(readme, results)
    new = readme.read_text()
    assert "old" not in new and "2.00x" in new and new.endswith(f"{README_END}\nafter\n")


@pytest.mark.slow
def test_benchmark_runs_end_to_end(smollm2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"category": c, "turns": [t]}) for c, t in [
        ("counting", "Count from one to twenty in words, separated by commas."),
        ("counting", "List the days of the week, then the months of the year."),
        ("code", "Write a Python function that returns the n-th Fibonacci number."),
        ("code", "Write a Python class for a stack with push, pop and peek."),
    ]))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", "--model", smollm2, "--prompts",
         str(prompts), "--per-category", "2", "--max-tokens", "24", "--batch-sizes", "1,2",
         "--methods", "plain,lookahead-tree", "--paired", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    cells = {(c["method"], c["batch_size"], c["category"]): c for c in results["cells"]}
    for batch in (1, 2):
        for category in ("counting", "code", "all"):
            tree = cells[("lookahead-tree", batch, category)]
            assert tree["identical"] is True
            assert tree["output_tokens"] == cells[("plain-vllm", batch, category)]["output_tokens"]
            assert tree["ttft_ms"] is not None and tree["ttft_ms"] > 0
            # --paired: the same batches with drafting off, in the same engine.
            assert tree["seconds_off"] > 0 and tree["vs_off"] > 0
            assert cells[("plain-vllm", batch, category)]["seconds_off"] == 0
    assert (out / "results.md").read_text().count("| yes |") == 4
    assert "| vs off |" in (out / "results.md").read_text()
    assert (out / "speedup_by_category.png").stat().st_size > 0
    assert (out / "speedup_by_batch.png").stat().st_size > 0


def test_report_paired_column(tmp_path):
    cells = [Cell("plain-vllm", 1, "all", output_tokens=10, seconds=1.0, identical=True).summary(),
             Cell("staged-tree", 1, "all", output_tokens=10, seconds=0.8, seconds_off=1.2,
                  accepted=5, drafts=5, accepted_per_pos=[5], identical=True).summary()]
    assert cells[1]["vs_off"] == 1.5 and cells[0]["vs_off"] is None
    text = markdown({**_results(cells), "paired": True,
                     "methods": {"plain-vllm": {}, "staged-tree": {}}})
    assert "| vs plain | vs off |" in text and "Paired:" in text
    assert "| 1 | staged-tree | 12.5 | 1.25x | 1.50x | 2.00 |" in text
    assert "| 1 | plain-vllm | 10.0 | 1.00x | - |" in text
    assert "vs off" not in markdown(_results(cells[:1]))


def test_proposer_host_time_benchmark_runs():
    from benchmarks.bench_proposer import run

    seconds = run(batch=4, steps=8, prompt_len=64, vocab=50,
                  lookahead={"window": 3, "guesses": 3, "ngram": 3})
    assert 0 < seconds < 1


def test_chain_replay_counts_acceptance_by_match_length():
    from benchmarks.replay_chain import acceptance_by_match, replay

    # After "1 2" (a 2-token match) the chain "3 4" is right, then "5" ends it.
    records = [{"prompt": [1, 2, 3, 4, 9, 1, 2], "output": [3, 4, 5]}]
    steps, rates = acceptance_by_match(records)
    assert steps[2] == 1 and rates[2, :2].tolist() == [1.0, 1.0] and rates[2, 2] == 0.0
    # Then "1 2 3" (3 tokens) is followed by the right 4, "1 2 3 4" by 9, not 5.
    assert steps[3] == 1 and rates[3, 0] == 1.0 and rates[3, 1] == 0.0
    assert steps[4] == 1 and rates[4, 0] == 0.0
    # Chains of 8: one step accepts "3 4" and emits 5; plain needs three.
    assert replay(records, lambda size: 8, lambda n: 1.0) == (3.0, 3.0)
    # The chain holds the 5 tokens after the match (3 4 9 1 2): a step of 6.
    assert replay(records, lambda size: 8, lambda n: 1.0 + 0.25 * (n - 1)) == (3.0, 3 / 2.25)
    assert replay(records, lambda size: 0, lambda n: 1.0) == (1.0, 1.0)
