"""Turn pytest-benchmark JSON into the benchmark report: a table, a Markdown file and a PNG.

For every group (one op, case and mode) each backend's median time is compared with the
reference's median time *in the same run* — or, in groups that time outside yardsticks (rows
recorded with ``yardstick=True``: torch.cdist, FAISS, another library's layer, one cuBLAS GEMM),
with each yardstick's; groups too large for either are reported in seconds with peak memory, and as
the largest size each backend handled.

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
                "yardstick": info.get("yardstick", False),
            }
        )
    return groups


def table(groups: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| group | backend | median time | speed-up (same run) | peak extra memory | rel. error vs float64 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group, rows in groups.items():
        bases = baselines(rows)
        for row in sorted(rows, key=lambda r: r["median_s"]):
            speedup = ", ".join(f"{base['median_s'] / row['median_s']:.1f}× vs {base['backend']}" for base in bases if base is not row)
            error = "—" if row["relative_error"] is None else f"{row['relative_error']:.1e}"
            lines.append(
                f"| {group} | {row['backend']} ({row['device']}) | {row['median_s'] * 1e3:.1f} ms | "
                f"{speedup or ('baseline' if bases else 'no reference (too large)')} | {row['peak_mib']:.1f} MiB | {error} |"
            )
    return lines


def baselines(rows: list[dict]) -> list[dict]:
    """What a group's rows are compared with: its yardsticks, else its reference (possibly none)."""
    yardsticks = [r for r in rows if r["yardstick"]]
    return yardsticks or [r for r in rows if r["backend"] == "reference"]


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
    labels, speedups = [], []
    for group, rows in groups.items():
        bases = baselines(rows)
        if not bases:
            continue
        # Against the slowest baseline of the group (the reference, or the slowest yardstick).
        base = max(bases, key=lambda r: r["median_s"])
        for row in rows:
            if row is not base and not row["yardstick"]:
                labels.append(f"{group} · {row['backend']} vs {base['backend']}")
                speedups.append(base["median_s"] / row["median_s"])
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.45 * len(labels)))
    ax.barh(labels, speedups)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the group's baseline (same run, median)")
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
