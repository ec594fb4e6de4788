"""Markdown summary of the rows of one commit of a results CSV:
`python -m bench.summary CSV COMMIT [readme]`.

Per op / module and mode: the geometric-mean speed-up of fastattn-cpu over eager and over
compile (min-max), how many configurations are faster, the median % of the copy bandwidth; then
the networks. With `readme`, also the compact module and network tables of the README.
"""
import collections
import math
import statistics
import sys

from bench import harness
from bench.report import latest, overheads

if len(sys.argv) < 3:
    raise SystemExit(__doc__)
path, commit = sys.argv[1], sys.argv[2]
rows = latest(r for r in harness.read_rows(path) if r["commit"] == commit)
MODES = ("forward", "backward", "forward+backward")

def geo(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None

# (name, mode, dtype, layout, shape) -> {provider: row}
cfg = collections.defaultdict(dict)
kinds = {}
for r in rows:
    if r["kind"] in ("op", "module"):
        cfg[(r["name"], r["mode"], r["dtype"], r["layout"], r["shape"])][r["provider"]] = r
        kinds[r["name"]] = r["kind"]
copy = [r["gbps"] for r in rows if r["kind"] == "copy"]
print(f"copy bandwidth of the runs: {', '.join(f'{c:.1f}' for c in copy)} GB/s\n")

def stats(name, mode, sel, base):
    sp, pct = [], []
    for (n, m, d, l, s), byp in cfg.items():
        if n != name or m != mode or not sel(d, l) or "fastattn-cpu" not in byp or base not in byp:
            continue
        f = byp["fastattn-cpu"]
        sp.append(byp[base]["median_ms"] / f["median_ms"])
        pct.append(f["pct_roofline"])
    return sp, pct

def fmt(sp):
    if not sp:
        return "-"
    return f"{geo(sp):.2f}x ({min(sp):.2f}–{max(sp):.2f})"

fp32nchw = lambda d, l: d == "fp32" and l == "nchw"
anyc = lambda d, l: True
print("| case | mode | vs eager, fp32 NCHW | vs compile, fp32 NCHW | vs eager, all 4 dtype×layout | faster than eager | faster than compile | median % of copy |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name in dict.fromkeys(k[0] for k in cfg):
    for mode in MODES:
        e, _ = stats(name, mode, fp32nchw, "eager")
        c, _ = stats(name, mode, fp32nchw, "compile")
        a, pct = stats(name, mode, anyc, "eager")
        if not a:
            continue
        fe = f"{sum(x > 1 for x in a)}/{len(a)}"
        fc = f"{sum(x > 1 for x in c)}/{len(c)}" if c else "-"
        print(f"| {name} | {mode} | {fmt(e)} | {fmt(c)} | {fmt(a)} | {fe} | {fc} | {statistics.median(pct):.0f}% |")

ov = overheads(rows)
if ov:
    print("\n| network | mode | shape | " + " | ".join(["provider", "ms", "overhead"]) + " |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        if r["kind"] == "model":
            o = ov.get((r["name"], r["provider"], r["mode"], r["dtype"], r["layout"], r["shape"]))
            print(f"| {r['name']} | {r['mode']} | {r['shape']} | {r['provider']} | {r['median_ms']:.1f} | "
                  + (f"{100*o:+.0f}%" if o is not None else "") + " |")

if len(sys.argv) > 3:      # the README's compact tables
    print("\n\n<!-- readme -->")
    print("| module | mode | vs eager, fp32 NCHW (min–max over 7 shapes) | vs compile, fp32 NCHW | vs eager, fp32/bf16 × NCHW/channels_last | faster than compile |")
    print("|---|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(k[0] for k in cfg):
        if kinds[name] != "module":
            continue
        for mode in ("forward", "forward+backward"):
            e, _ = stats(name, mode, fp32nchw, "eager")
            c, _ = stats(name, mode, fp32nchw, "compile")
            a, _ = stats(name, mode, anyc, "eager")
            print(f"| {name} | {mode} | {fmt(e)} | {fmt(c)} | {fmt(a)} | {sum(x > 1 for x in c)}/{len(c)} |")
    print()
    nets = collections.OrderedDict()
    for r in rows:
        if r["kind"] == "model":
            nets.setdefault((r["name"], r["mode"]), {})[r["provider"]] = r
    print("| network | mode | eager ms | compile ms | fastattn-cpu ms |")
    print("|---|---|---:|---:|---:|")
    for (name, mode), byp in nets.items():
        cells = []
        for p in ("eager", "compile", "fastattn-cpu"):
            r = byp.get(p)
            o = ov.get((name, p, mode, r["dtype"], r["layout"], r["shape"])) if r else None
            cells.append("-" if r is None else f"{r['median_ms']:.1f}" + (f" ({100*o:+.0f}%)" if o is not None else ""))
        print(f"| {name} | {mode} | " + " | ".join(cells) + " |")
