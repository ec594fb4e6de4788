"""Short text tables of a run's rows (also used by plot.py to pick the latest results)."""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

FAST_PREFIX = "fastattn"


def latest(rows: Iterable[dict]) -> list[dict]:
    """One row per (kind, name, provider, mode, dtype, layout, shape, device): the last one written."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out[tuple(r[k] for k in ("kind", "name", "provider", "mode", "dtype", "layout", "shape", "device"))] = r
    return list(out.values())


def _best_fast(by_provider: dict) -> Optional[dict]:
    fast = [r for p, r in by_provider.items() if p.startswith(FAST_PREFIX)]
    return min(fast, key=lambda r: r["median_ms"]) if fast else None


def _table(header: list[str], lines: list[list[str]], left: int) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(fmt(line) for line in lines)])


def _configs(rows: Sequence[dict]) -> tuple[dict, list[str]]:
    """{(name, dtype, layout, shape): {mode: {provider: row}}} of the op and module rows, in
    first-seen order, and the modes seen."""
    configs: dict[tuple, dict] = {}
    modes: list[str] = []
    for r in rows:
        if r["kind"] in ("op", "module"):
            key = (r["name"], r["dtype"], r["layout"], r["shape"])
            configs.setdefault(key, {}).setdefault(r["mode"], {})[r["provider"]] = r
            if r["mode"] not in modes:
                modes.append(r["mode"])
    return configs, modes


def _ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _cell(by_provider: dict) -> str:
    best = _best_fast(by_provider)
    if best is None:
        base = by_provider.get("eager") or by_provider.get("compile")
        return f"({base['provider']} {_ms(base['median_ms'])} ms)" if base else "-"
    ms = best["median_ms"]
    speed = "/".join(f"{by_provider[b]['median_ms'] / ms:.2f}x" for b in ("eager", "compile") if b in by_provider)
    return f"{_ms(ms)} ms {speed or '-'} {best['pct_roofline']:.0f}%"


def micro_table(rows: Sequence[dict]) -> str:
    """One line per op / module configuration; per mode: the best fastattn provider's time, its
    speed-up over eager (/ over compile, when measured) and its % of the copy bandwidth."""
    configs, modes = _configs(rows)
    if not configs:
        return ""
    lines = [[*key, *(_cell(by_mode.get(m, {})) for m in modes)] for key, by_mode in configs.items()]
    return _table(["case", "dtype", "layout", "shape", *modes], lines, 4)


def summary_stats(rows: Sequence[dict]) -> dict[tuple, dict]:
    """(name, mode) -> {"eager": x, "compile": x, "pct": p}: the geometric-mean speed-up of the best
    fastattn provider over eager and over compile (None where not measured) across the
    configurations measured, and its median % of copy bandwidth."""
    configs, _ = _configs(rows)
    logs: dict[tuple, dict] = {}
    for (name, *_), by_mode in configs.items():
        for mode, by_provider in by_mode.items():
            best = _best_fast(by_provider)
            if best is None:
                continue
            st = logs.setdefault((name, mode), {"eager": [], "compile": [], "pct": []})
            st["pct"].append(best["pct_roofline"])
            for b in ("eager", "compile"):
                if b in by_provider:
                    st[b].append(math.log(by_provider[b]["median_ms"] / best["median_ms"]))
    return {k: {"eager": math.exp(sum(v["eager"]) / len(v["eager"])) if v["eager"] else None,
                "compile": math.exp(sum(v["compile"]) / len(v["compile"])) if v["compile"] else None,
                "pct": statistics.median(v["pct"])} for k, v in logs.items()}


def micro_summary(rows: Sequence[dict]) -> str:
    """One line per op / module; per mode: the geometric-mean speed-up of the best fastattn provider
    over eager (/ over compile) and its median % of the copy bandwidth."""
    configs, modes = _configs(rows)
    stats = summary_stats(rows)
    if not stats:
        return ""

    def cell(name, mode):
        st = stats.get((name, mode))
        if not st:
            return "-"
        speed = "/".join(f"{st[b]:.2f}x" for b in ("eager", "compile") if st[b] is not None)
        return f"{speed or '-'} {st['pct']:.0f}%"
    names = list(dict.fromkeys(k[0] for k in configs))
    return _table(["case", *modes], [[n, *(cell(n, m) for m in modes)] for n in names], 1)


def overheads(rows: Sequence[dict]) -> dict[tuple, float]:
    """(name, provider, mode, dtype, layout, shape) -> attention overhead (t_with - t_plain) / t_plain
    of each model row with attention; the plain network of a fastattn provider is the eager one."""
    plain = {}
    for r in rows:
        if r["kind"] == "model" and "+" not in r["name"]:
            plain[(r["name"], r["provider"], r["mode"], r["dtype"], r["layout"], r["shape"])] = r["median_ms"]
    out = {}
    for r in rows:
        if r["kind"] != "model" or "+" not in r["name"]:
            continue
        base_provider = "eager" if r["provider"].startswith(FAST_PREFIX) else r["provider"]
        base = plain.get((r["name"].split("+")[0], base_provider, r["mode"], r["dtype"], r["layout"], r["shape"]))
        if base:
            key = (r["name"], r["provider"], r["mode"], r["dtype"], r["layout"], r["shape"])
            out[key] = (r["median_ms"] - base) / base
    return out


def model_table(rows: Sequence[dict]) -> str:
    """Per network and mode: ms per provider and the attention overhead over the plain network."""
    order: list[tuple] = []
    groups: dict[tuple, dict] = {}
    providers: list[str] = []
    for r in rows:
        if r["kind"] == "model":
            key = (r["name"], r["mode"], r["dtype"], r["layout"], r["shape"])
            if key not in groups:
                order.append(key)
            groups.setdefault(key, {})[r["provider"]] = r
            if r["provider"] not in providers:
                providers.append(r["provider"])
    if not order:
        return ""
    ovh = overheads(rows)
    header = ["network", "mode", "dtype", "layout", "shape", *(f"{p} ms (overhead)" for p in providers)]
    lines = []
    for key in order:
        name, mode, dtype, layout, shape = key
        cells = list(key)
        for p in providers:
            r = groups[key].get(p)
            if r is None:
                cells.append("-")
                continue
            o = ovh.get((name, p, mode, dtype, layout, shape))
            cells.append(f"{r['median_ms']:.1f}" + (f" ({100 * o:+.0f}%)" if o is not None else ""))
        lines.append(cells)
    return _table(header, lines, 5)
