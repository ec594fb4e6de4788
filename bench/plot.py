"""PNG plots of a benchmark CSV: `python -m bench.plot [CSV ...] [--out DIR]`.

Per op / module (`<name>.png`): the speed-up of each provider over eager (left columns) and its
% of the copy bandwidth (right columns), one row of panels per mode, one panel per dtype and
layout, shapes on the x axis. `summary.png`: the geometric-mean speed-up of the best fastattn
provider over eager and over compile per case and mode. `e2e_overhead.png`: the attention
overhead (t_with - t_plain) / t_plain per network, mode, module and provider.

The latest row of each configuration is used. Needs matplotlib (`pip install matplotlib`, or the
`plot` extra of fastattn).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Optional, Sequence

from . import harness
from .report import latest, overheads, summary_stats


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def speedups(rows: Sequence[dict]) -> dict[tuple, float]:
    """(name, provider, mode, dtype, layout, shape) -> eager ms / provider ms, for op and module rows."""
    eager = {(r["name"], r["mode"], r["dtype"], r["layout"], r["shape"]): r["median_ms"]
             for r in rows if r["kind"] in ("op", "module") and r["provider"] == "eager"}
    out = {}
    for r in rows:
        base = eager.get((r["name"], r["mode"], r["dtype"], r["layout"], r["shape"]))
        if r["kind"] in ("op", "module") and base and r["median_ms"]:
            out[(r["name"], r["provider"], r["mode"], r["dtype"], r["layout"], r["shape"])] = base / r["median_ms"]
    return out


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.plot needs matplotlib: pip install matplotlib "
                         "(or pip install fastattn[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[Optional[float]]], ylabel: str, ref: Optional[float]):
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    if ref is not None:
        ax.axhline(ref, color="grey", linewidth=0.8, linestyle="--")
    ax.tick_params(axis="y", labelsize=7)


def plot_case(plt, rows: Sequence[dict], name: str, path: str) -> None:
    rows = [r for r in rows if r["name"] == name]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    combos = list(dict.fromkeys((r["dtype"], r["layout"]) for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    sp = speedups(rows)
    pct = {(r["provider"], r["mode"], r["dtype"], r["layout"], r["shape"]): r["pct_roofline"] for r in rows}
    ncols = 2 * len(combos)
    fig, axes = plt.subplots(len(modes), ncols, figsize=(3.2 * ncols, 2.8 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (dtype, layout) in enumerate(combos):
            ax_s, ax_r = axes[i][j], axes[i][len(combos) + j]
            _bars(ax_s, shapes, {p: [sp.get((name, p, mode, dtype, layout, s)) for s in shapes]
                                 for p in providers if p != "eager"}, "speed-up over eager", 1.0)
            _bars(ax_r, shapes, {p: [pct.get((p, mode, dtype, layout, s)) for s in shapes] for p in providers},
                  "% of copy bandwidth", 100.0)
            for ax, what in ((ax_s, "speed-up"), (ax_r, "roofline")):
                ax.set_title(f"{mode}, {dtype}, {layout}: {what}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    axes[0][len(combos)].legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(plt, rows: Sequence[dict], path: str) -> bool:
    stats = summary_stats(rows)
    if not stats:
        return False
    s = {(name, mode, base): st[base] for (name, mode), st in stats.items() for base in ("eager", "compile")
         if st[base] is not None}
    names = list(dict.fromkeys(k[0] for k in stats))
    modes = list(dict.fromkeys(k[1] for k in stats))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        h = 0.4
        for i, base in enumerate(("eager", "compile")):
            ys = [j + (i - 0.5) * h for j in range(len(names))]
            ax.barh(ys, [s.get((n, mode, base), float("nan")) for n in names], h, label=f"fastattn over {base}")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)       # a slow-down reads as far from 1 as the same speed-up
        ax.set_title(f"{mode}: geometric-mean speed-up (log scale)", fontsize=9)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_overhead(plt, rows: Sequence[dict], path: str) -> bool:
    ovh = overheads(rows)
    if not ovh:
        return False
    panels = list(dict.fromkeys((k[0].split("+")[0], k[2], k[3], k[4], k[5]) for k in ovh))
    providers = list(dict.fromkeys(k[1] for k in ovh))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (net, mode, dtype, layout, shape) in zip(axes[0], panels):
        attns = list(dict.fromkeys(k[0].split("+", 1)[1] for k in ovh if k[0].startswith(net + "+")
                                   and k[2:] == (mode, dtype, layout, shape)))
        _bars(ax, attns, {p: [100 * ovh[(f"{net}+{a}", p, mode, dtype, layout, shape)]
                              if (f"{net}+{a}", p, mode, dtype, layout, shape) in ovh else None for a in attns]
                          for p in providers}, "attention overhead (%)", 0.0)
        ax.set_title(f"{net} {mode} {dtype} {layout} {shape}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_csv(csv_path: str, out_dir: str) -> list[str]:
    """Draws every PNG for one CSV into out_dir; returns their paths."""
    plt = _import_pyplot()
    rows = latest(harness.read_rows(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in dict.fromkeys(r["name"] for r in rows if r["kind"] in ("op", "module")):
        path = os.path.join(out_dir, f"{_slug(name)}.png")
        plot_case(plt, rows, name, path)
        written.append(path)
    for fn, fname in ((plot_summary, "summary.png"), (plot_overhead, "e2e_overhead.png")):
        path = os.path.join(out_dir, fname)
        if fn(plt, rows, path):
            written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", help="result CSVs (default: every bench/results/*.csv)")
    p.add_argument("--out", help="output folder (default: bench/results/plots/<csv name>/)")
    args = p.parse_args(argv)
    paths = args.csv or sorted(glob.glob(os.path.join(harness.RESULTS_DIR, "*.csv")))
    if not paths:
        print(f"no CSV given and none in {harness.RESULTS_DIR}: run python -m bench first", file=sys.stderr)
        return 1
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        root = args.out or os.path.join(harness.RESULTS_DIR, "plots")
        out = args.out if args.out and len(paths) == 1 else os.path.join(root, stem)
        written = plot_csv(path, out)
        print(f"{path}: {len(written)} PNGs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
