"""Markdown tables and PNG plots from a ``benchmark.py`` results.json, and
the README's results section.

    python benchmarks/report.py benchmarks/results/X/results.json [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- benchmark-results:begin -->"
README_END = "<!-- benchmark-results:end -->"
PLAIN = "plain-vllm"


def _cells(results: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(c["method"], c["batch_size"], c["category"]): c for c in results["cells"]}


def _category_batches(results: dict[str, Any]) -> list[int]:
    """Batch sizes measured per category (smaller runs mix categories in a
    batch and keep only the total)."""
    return [b for b in results["batch_sizes"]
            if any(c["batch_size"] == b and c["category"] != "all" for c in results["cells"])]


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# The lookahead default, and the fixed configurations it must keep up with
# wherever they beat plain vLLM: vLLM's n-gram chain and our static budgets.
DEFAULT = "lookahead-tree"
FIXED = ("vllm-ngram", "lookahead-tree-static", "lookahead-linear-static",
         "lookahead-tree-static-recycle", "recycle-only-static")


def default_against_fixed(cells: dict[tuple[str, int, str], dict[str, Any]],
                          batch_sizes: list[int]) -> list[str]:
    """Lines comparing the default with the fastest fixed configuration of
    the run at each batch size (where both ran)."""
    lines = []
    for batch in batch_sizes:
        default = cells.get((DEFAULT, batch, "all"))
        fixed = [c for m in FIXED if (c := cells.get((m, batch, "all")))]
        plain = cells.get((PLAIN, batch, "all"))
        if default is None or not fixed:
            continue
        best = max(fixed, key=lambda c: c["tokens_per_s"])
        beats_plain = plain is not None and best["tokens_per_s"] > plain["tokens_per_s"]
        lines.append(
            f"\nBatch {batch}: {DEFAULT} (default) at "
            f"{default['tokens_per_s'] / best['tokens_per_s']:.2f}x the fastest fixed "
            f"configuration, {best['method']}"
            + (" (which beats plain vLLM)" if beats_plain else " (not faster than plain vLLM)")
            + ".")
    return lines


def markdown(results: dict[str, Any]) -> str:
    cells = _cells(results)
    machine = results["machine"]
    methods = list(results["methods"])
    lines = [
        f"Model `{Path(results['model']).name}`"
        + (f", draft `{Path(results['draft_model']).name}`" if results.get("draft_model") else "")
        + f"; prompts {', '.join(results['prompts'])} ({results['per_category']} per category), "
        f"{results['max_tokens']} new tokens, greedy; {machine['cpu']} ({machine['cores']} "
        f"cores), vLLM {machine['vllm']}, torch {machine['torch']}, commit {machine['commit']}, "
        f"{machine['date']}. One engine per method, all in one run"
        + (" (eager mode, no torch.compile)." if results.get("enforce_eager") else ".")
        + (" Paired: every batch from an empty prefix cache; 'vs off' is the same "
           "batches with drafting off (per-request switch) in the same engine, each next "
           "to its drafting run." if results.get("paired") else ""),
        "",
    ]
    paired = any(c.get("vs_off") for c in results["cells"])
    # Draft-model forwards per drafting step, where a method runs a draft model.
    drafting = any(c.get("draft_forwards_per_step") for c in results["cells"])
    lines += [
        "| batch | method | tok/s | vs plain " + ("| vs off " if paired else "")
        + "| tokens / target forward | accepted / draft | accepted / node "
        + ("| draft forwards / step " if drafting else "")
        + "| TTFT ms | TPOT ms | identical |",
        "| --- " * (10 + drafting + paired) + "|",
    ]
    for batch in results["batch_sizes"]:
        plain = cells.get((PLAIN, batch, "all"))
        for method in methods:
            c = cells.get((method, batch, "all"))
            if c is None:
                continue
            speedup = c["tokens_per_s"] / plain["tokens_per_s"] if plain else None
            lines.append(
                f"| {batch} | {method} | {_fmt(c['tokens_per_s'], 1)} | {_fmt(speedup)}x "
                + (f"| {_fmt(c.get('vs_off'))}{'x' if c.get('vs_off') else ''} "
                   if paired else "")
                + f"| {_fmt(c['compression'])} | {_fmt(c['mean_accepted'])} "
                + f"| {_fmt(c['accepted'] / c['draft_tokens'] if c['draft_tokens'] else None, 3)} "
                + (f"| {_fmt(c.get('draft_forwards_per_step'))} " if drafting else "")
                + f"| {_fmt(c['ttft_ms'], 0)} | {_fmt(c['tpot_ms'], 1)} "
                f"| {'yes' if c['identical'] else 'NO'} |")
    lines += default_against_fixed(cells, results["batch_sizes"])
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"\n`{name}` did not run here: {reason}")
    categories = sorted({c["category"] for c in results["cells"]} - {"all"})
    for batch in _category_batches(results):
        lines += ["", f"Speedup over plain vLLM by category, batch {batch} "
                  "(tokens per target forward in brackets):", "",
                  "| category | " + " | ".join(m for m in methods if m != PLAIN) + " |",
                  "| --- |" + " --- |" * (len(methods) - 1)]
        for category in categories:
            plain = cells.get((PLAIN, batch, category))
            row = []
            for method in methods[1:]:
                c = cells.get((method, batch, category))
                if c is None or plain is None:
                    row.append("-")
                    continue
                row.append(f"{c['tokens_per_s'] / plain['tokens_per_s']:.2f}x "
                           f"({_fmt(c['compression'])})")
            lines.append(f"| {category} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """speedup_by_category.png (one panel per batch size) and
    speedup_by_batch.png; nothing if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = _cells(results)
    methods = [m for m in results["methods"] if m != PLAIN]
    batches = results["batch_sizes"]
    category_batches = _category_batches(results) or batches[:1]
    categories = sorted({c["category"] for c in results["cells"]} - {"all"}) + ["all"]

    def speedup(method: str, batch: int, category: str) -> float:
        c, p = cells.get((method, batch, category)), cells.get((PLAIN, batch, category))
        return c["tokens_per_s"] / p["tokens_per_s"] if c and p else 0.0

    paths = []
    fig, axes = plt.subplots(len(category_batches), 1, figsize=(12, 3.2 * len(category_batches)),
                             squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, batch in zip(axes[:, 0], category_batches):
        for j, method in enumerate(methods):
            xs = [i + j * width for i in range(len(categories))]
            ax.bar(xs, [speedup(method, batch, c) for c in categories], width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))])
        ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"speedup, batch {batch}")
    axes[0, 0].legend(fontsize=8, ncol=len(methods))
    fig.suptitle(f"{Path(results['model']).name}: tokens/s over plain vLLM")
    fig.tight_layout()
    paths.append(out_dir / "speedup_by_category.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        ax.plot(batches, [speedup(method, b, "all") for b in batches], marker="o", label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over plain vLLM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "speedup_by_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.md").write_text(markdown(results))
    plots(results, out_dir)


def update_readme(readme: Path, results_json: Path) -> None:
    """Replace the README's results section with the tables of
    ``results_json``."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section")
    results = json.loads(results_json.read_text())
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = (f"\n<!-- generated by benchmarks/report.py from {results_json.as_posix()}; "
            "do not edit -->\n" + markdown(results))
    readme.write_text(head + README_BEGIN + body + README_END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, help="also rewrite this README's section")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    write_report(results, args.results.parent)
    if args.readme:
        update_readme(args.readme, args.results)
    print(markdown(results))


if __name__ == "__main__":
    main()
