"""Median over repeated runs of the module rows of one commit of a results CSV, as a markdown
table: `python -m bench.runs CSV COMMIT [SHAPE,...]`.

For every module, shape and mode: the eager, compile and fastattn-cpu times (each the median of
the runs' medians), the speed-ups and the median % of the copy bandwidth; then the cells where
fastattn-cpu is slower than eager or compile. Repeating a run (`python -m bench` appends rows)
and taking the median is how the README's CPU tables deal with this VM's run-to-run noise.
"""
from __future__ import annotations

import collections
import statistics
import sys

from bench import harness

PROVIDERS = ("eager", "compile", "fastattn-cpu")
MODES = ("forward", "backward", "forward+backward")


def median_table(rows: list[dict], shapes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(markdown lines of the table, lines of the cells slower than eager or compile)."""
    times, pct = collections.defaultdict(list), collections.defaultdict(list)
    for r in rows:
        if r["kind"] == "module" and (not shapes or r["shape"] in shapes):
            times[(r["name"], r["shape"], r["mode"], r["provider"])].append(r["median_ms"])
            pct[(r["name"], r["shape"], r["mode"], r["provider"])].append(r["pct_roofline"])
    out = ["| module | shape | mode | eager ms | compile ms | fastattn-cpu ms | vs eager | vs compile | % of copy |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    slower = []
    for name, shape, mode in dict.fromkeys(k[:3] for k in times):     # in the order of the CSV
        med = {p: statistics.median(times[(name, shape, mode, p)])
               for p in PROVIDERS if times.get((name, shape, mode, p))}
        if "fastattn-cpu" not in med:
            continue
        f = med["fastattn-cpu"]
        speed = {p: med[p] / f for p in ("eager", "compile") if p in med}
        cell = lambda p: f"{med[p]:.2f}" if p in med else "-"  # noqa: E731
        ratio = lambda p: f"{speed[p]:.2f}x" if p in speed else "-"  # noqa: E731
        share = statistics.median(pct[(name, shape, mode, "fastattn-cpu")])
        out.append(f"| {name} | {shape} | {mode} | {cell('eager')} | {cell('compile')} | {cell('fastattn-cpu')} | "
                   f"{ratio('eager')} | {ratio('compile')} | {share:.0f}% |")
        if any(v < 1 for v in speed.values()):
            slower.append(f"{name} {shape} {mode}: {ratio('eager')} / {ratio('compile')}")
    return out, slower


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    path, commit = sys.argv[1], sys.argv[2]
    shapes = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    rows = [r for r in harness.read_rows(path) if r["commit"] == commit]
    copy = [r["gbps"] for r in rows if r["kind"] == "copy"]
    print(f"copy bandwidth of the runs: {', '.join(f'{c:.1f}' for c in copy)} GB/s\n")
    table, slower = median_table(rows, shapes)
    print("\n".join(table))
    print("\nslower than eager or compile (medians):")
    print("\n".join(f"- {s}" for s in slower) or "- none")


if __name__ == "__main__":
    main()
