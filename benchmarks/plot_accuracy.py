"""Plot an accuracy JSON: held-out perplexity vs effective bits per weight, one line per method.

    python benchmarks/plot_accuracy.py benchmarks/results/accuracy_reduced_cpu_<date>.json [-o out.png]
    python benchmarks/plot_accuracy.py a.json b.json -o all.png   # several runs with the same settings, merged
    python benchmarks/plot_accuracy.py a.json b.json --methods unquantized,lowra,nf   # only these methods

Also prints the results as a markdown table (for docs/accuracy.md and the README).

Panels: rows are the held-out corpora (KJV, Austen), columns are after quantization and after the LoRA
fine-tune. The unquantized model and its LoRA fine-tune (the ceiling) are horizontal lines. Perplexity is
on a log axis because uniform baselines collapse by orders of magnitude at 2 bits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # 20 distinct, dark ones first
STAGES = (("before", "after quantization"), ("after", "after LoRA fine-tune"))


def plot(result: dict, path: Path) -> None:
    points = result["points"]
    corpora = sorted({c for p in points for c in p["before"]}, key=["kjv", "austen"].index)
    methods = list(dict.fromkeys(p["method"] for p in points if p["method"] != "unquantized"))
    ceiling = next((p for p in points if p["method"] == "unquantized"), None)
    fig, axes = plt.subplots(len(corpora), 2, figsize=(14, 4.5 * len(corpora)), squeeze=False, sharex=True)
    for r, corpus in enumerate(corpora):
        for c, (stage, title) in enumerate(STAGES):
            ax = axes[r][c]
            for i, method in enumerate(methods):
                rows = sorted((p for p in points if p["method"] == method), key=lambda p: p["effective_bits"])
                style = "-o" if len(rows) > 2 else "--s"  # ablations are often single points
                ax.plot(
                    [p["effective_bits"] for p in rows], [p[stage][corpus] for p in rows], style, ms=5, label=method,
                    color=COLORS[i % len(COLORS)],
                )
            if ceiling is not None:
                ax.axhline(ceiling["before"][corpus], color="gray", lw=1, label="unquantized")
                ax.axhline(ceiling["after"][corpus], color="black", lw=1, ls=":", label="unquantized + LoRA")
            ax.set_yscale("log")
            ax.set_title(f"{corpus.upper() if corpus == 'kjv' else corpus.capitalize()} held-out, {title}")
            ax.set_xlabel("effective bits per weight (codes + codebooks + scales)")
            ax.set_ylabel("perplexity")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
    s = result["settings"]
    # points record their device since grids resume across machines; older points only the run's
    devices = " and ".join(sorted({p.get("device", result["device"]) for p in points}))
    fig.suptitle(
        f"SmolLM2-135M, LoRA r={s['rank']}, {s['steps']} steps x {s['batch_size']} x {s['window']} tokens "
        f"({result['grid']} grid, {devices}, {result['date']})"
    )
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ppl(value: float) -> str:
    return f"{value:.1f}" if value < 1e4 else f"{value:.1e}"  # collapsed baselines reach 1e9


def table(result: dict) -> str:
    """Markdown table: one row per point (methods in order of appearance, budgets falling), perplexity
    after quantization -> after fine-tuning."""
    head = "| method | budget | code bits | effective bits | KJV ppl (quantized -> fine-tuned) | Austen ppl (quantized -> fine-tuned) |"
    lines = [head, "|---|---|---|---|---|---|"]
    first = {m: i for i, m in reversed(list(enumerate(p["method"] for p in result["points"])))}
    for p in sorted(result["points"], key=lambda p: (first[p["method"]], -(p["bits"] or 0))):
        cells = [p["method"], "-" if p["bits"] is None else f"{p['bits']:g}"]
        cells += ["-", "-"] if p["bits"] is None else [f"{p['code_bits']:.3f}", f"{p['effective_bits']:.3f}"]
        cells += [f"{_ppl(p['before'][c])} -> {_ppl(p['after'][c])}" for c in ("kjv", "austen")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(results: list[dict]) -> dict:
    """Points of several runs in one result; they must share the settings, a later run's point wins."""
    for result in results:  # runs from before --calib-windows calibrated on the first training batch
        result["settings"].setdefault("calib_windows", result["settings"]["batch_size"])
    merged = {**results[0], "points": []}
    for result in results:
        if result["settings"] != merged["settings"]:
            raise SystemExit(f"cannot merge runs with different settings: {result['settings']} vs {merged['settings']}")
        keys = {(p["method"], p["bits"]) for p in result["points"]}
        merged["points"] = [p for p in merged["points"] if (p["method"], p["bits"]) not in keys] + result["points"]
    dates = sorted({r["date"] for r in results})
    merged["date"] = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON written by benchmarks/accuracy.py")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--methods", help="comma-separated methods to keep (default: all)")
    args = parser.parse_args(argv)
    out = args.out or args.results[0].with_suffix(".png")
    result = merge([json.loads(path.read_text()) for path in args.results])
    if args.methods:
        keep = args.methods.split(",")
        result["points"] = sorted((p for p in result["points"] if p["method"] in keep), key=lambda p: keep.index(p["method"]))
    plot(result, out)
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
