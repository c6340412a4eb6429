"""Turn pytest-benchmark JSON into the benchmark report: a table, a Markdown file and a PNG.

For every group (one op, case and mode) each backend's median time is compared with the
reference's median time *in the same run*; groups too large for the reference are reported in
seconds with peak memory, and as the largest size each backend handled.

    python benchmarks/report.py bench-results/benchmarks.json --out bench-results
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_rows(path: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        groups[bench["group"]].append(
            {
                "op": info["op"],
                "backend": info["backend"],
                "device": info["device"],
                "n": info["n"],
                "median_s": bench["stats"]["median"],
                "rounds": bench["stats"]["rounds"],
                "peak_mib": info["peak_extra_bytes"] / 2**20,
                "relative_error": info["relative_error"],
            }
        )
    return groups


def table(groups: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| group | backend | median time | speed-up vs reference (same run) | peak extra memory | rel. error vs float64 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group, rows in groups.items():
        reference = next((r["median_s"] for r in rows if r["backend"] == "reference"), None)
        for row in sorted(rows, key=lambda r: r["median_s"]):
            speedup = f"{reference / row['median_s']:.1f}×" if reference else "no reference (too large)"
            lines.append(
                f"| {group} | {row['backend']} ({row['device']}) | {row['median_s'] * 1e3:.1f} ms | {speedup} | "
                f"{row['peak_mib']:.1f} MiB | {row['relative_error']:.1e} |"
            )
    return lines


def largest_sizes(groups: dict[str, list[dict]]) -> list[str]:
    largest: dict[tuple[str, str], int] = {}
    for rows in groups.values():
        for row in rows:
            key = (row["op"], row["backend"])
            largest[key] = max(largest.get(key, 0), row["n"])
    return [f"- {op} {backend}: n = {n:,}" for (op, backend), n in sorted(largest.items(), key=lambda kv: (kv[0][0], -kv[1]))]


def plot(groups: dict[str, list[dict]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    comparable = {g: rows for g, rows in groups.items() if any(r["backend"] == "reference" for r in rows)}
    if not comparable:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.9 * len(comparable)))
    labels, speedups = [], []
    for group, rows in comparable.items():
        reference = next(r["median_s"] for r in rows if r["backend"] == "reference")
        for row in rows:
            if row["backend"] != "reference":
                labels.append(f"{group} · {row['backend']}")
                speedups.append(reference / row["median_s"])
    ax.barh(labels, speedups)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the reference (same run, median)")
    ax.invert_yaxis()
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    groups = load_rows(args.json)
    lines = ["# aelearn benchmark report", "", *table(groups), "", "Largest size handled per backend:", *largest_sizes(groups)]
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(groups, args.out)
    if png is not None:
        lines += ["", f"![speed-ups]({png.name})"]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'report.md'}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
