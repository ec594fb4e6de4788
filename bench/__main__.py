"""`python -m bench`: microbenchmarks of the fastattn ops and modules, and end-to-end networks.

Rows are appended to bench/results/<device>.csv (or --out) as they are measured; a short table
of this run is printed at the end; `python -m bench.plot` draws PNGs from a CSV.

  python -m bench --quick                              a few minutes on a 2-core CPU
  python -m bench --module SqueezeExcite,CBAM --mode forward --dtype bf16
  python -m bench --op channel_scale --shape 32x256x56x56 --provider eager,fastattn
  python -m bench --no-micro --model resnet50          only the end-to-end benchmark
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Optional, Sequence

import torch

import fastattn.reference as ref

from . import e2e, harness, micro, report
from .cases import (DTYPES, LAYOUTS, MODES, OPS, VARIANTS, all_cases, feature_shapes, module_names, parse_shape,
                    shape_str)

MAX_TABLE_LINES = 60            # more op/module configurations than this: print the per-case summary
CPU_NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def _names(values: Optional[list[str]]) -> Optional[list[str]]:
    """--x a,b --x c -> [a, b, c]; None when the option was not given."""
    if values is None:
        return None
    # commas inside brackets belong to a name: channel_pool[mean,max]
    return [v.strip() for chunk in values for v in re.split(r",(?![^\[]*\])", chunk) if v.strip()]


def _pick(given: list[str], known: Sequence[str], what: str) -> list[str]:
    lower = {k.lower(): k for k in known}
    out = []
    for g in given:
        if g.lower() == "all":
            out.extend(k for k in known if k not in out)
        elif g.lower() in lower:
            out.append(lower[g.lower()])
        else:
            raise SystemExit(f"python -m bench: unknown {what} {g!r}; known: {', '.join(known)}")
    return out


def supported_dtypes(device: str) -> list[str]:
    """fp32, plus the 16-bit types the device computes natively."""
    if torch.device(device).type == "cuda":
        return ["fp32", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "fp16"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    return ["fp32", *(d for d, fl in CPU_NATIVE_FLAGS.items() if flags & set(fl))]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one feature map shape at batch 8, fp32 (bf16 on CUDA), forward and forward+backward, "
                        "eager and fastattn providers (compile only when --provider names it), small networks")
    p.add_argument("--op", action="append", metavar="NAMES", help=f"ops (comma-separated, or all): {', '.join(OPS)}")
    p.add_argument("--module", action="append", metavar="NAMES",
                   help="modules (comma-separated, or all): any fastattn.reference class or variant; "
                        "default: fastattn.FAST_MODULES and the e2e set")
    p.add_argument("--provider", action="append", metavar="NAMES",
                   help="eager, compile, fastattn (every fastattn backend), fastattn-cpu, fastattn-triton, fastattn-cuda")
    p.add_argument("--dtype", action="append", metavar="NAMES",
                   help="fp32, bf16, fp16 (default: what the device computes natively)")
    p.add_argument("--layout", action="append", metavar="NAMES", help="nchw, channels_last")
    p.add_argument("--mode", action="append", metavar="NAMES", help=f"{', '.join(MODES)} (e2e: {', '.join(e2e.MODES)})")
    p.add_argument("--shape", action="append", metavar="BxCxHxW", help="feature map shapes instead of the default set")
    p.add_argument("--model", action="append", metavar="NAMES", help="e2e networks: resnet50, mobilenet")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="CSV file, or a folder for <device>.csv (default: bench/results/<device>.csv)")
    p.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True, help="op and module microbenchmarks")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                   help="end-to-end networks (default: on, unless --op, --module or --shape narrows the "
                        "microbenchmarks; --module also picks the networks' attention modules)")
    p.add_argument("--list", action="store_true", help="list ops, modules, providers and shapes, then exit")
    return p


class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.perf_counter()

    def __call__(self, msg: str, k: int = 1) -> None:
        self.done += k
        print(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s] {msg}", file=self.stream, flush=True)


def _providers(args, device: str) -> list[micro.Provider]:
    all_p = micro.providers(device)
    given = _names(args.provider)
    if given is None:
        return [p for p in all_p if not (args.quick and p.name == "compile")]
    known = [p.name for p in all_p]
    out = []
    for g in given:
        match = [p for p in all_p if p.name == g.lower() or (g.lower() == "fastattn" and p.is_fast)]
        if not match:
            raise SystemExit(f"python -m bench: unknown provider {g!r} on {device}; known: {', '.join(known)}")
        out.extend(m for m in match if m not in out)
    return out


def _out_path(args, device: str) -> str:
    if not args.out:
        return harness.default_csv(device)
    if args.out.endswith(".csv"):
        return args.out
    return os.path.join(args.out, os.path.basename(harness.default_csv(device)))


@dataclasses.dataclass
class Plan:
    device: str
    quick: bool
    out: str
    cases: list
    notes: list[str]
    micro: Optional[micro.Settings]          # None: no microbenchmarks
    e2e: Optional[e2e.E2ESettings]           # None: no end-to-end run

    def measurements(self) -> int:
        return (micro.count(self.cases, self.micro) if self.micro else 0) + (e2e.count(self.e2e) if self.e2e else 0)

    def compiles(self) -> tuple[int, int]:
        """torch.compile calls (of ops and modules, of networks): one per configuration and grad mode."""
        n_micro = n_e2e = 0
        if self.micro and any(p.name == "compile" for p in self.micro.providers):
            grads = len({m == "forward" for m in self.micro.modes})
            m = self.micro
            n_micro = len(self.cases) * len(m.shapes) * len(m.dtypes) * len(m.layouts) * grads
        if self.e2e and any(p.name == "compile" for p in self.e2e.providers):
            n_e2e = e2e.count(self.e2e) // len(self.e2e.providers)
        return n_micro, n_e2e

    def summary(self) -> str:
        """Counts and a rough duration (seconds per measurement and per compile seen on a 2-core CPU
        and on an H100; a loaded machine takes longer)."""
        cuda = torch.device(self.device).type == "cuda"
        per_measure, per_compile, per_net_compile = (0.3, 3, 40) if cuda else (0.3 if self.quick else 0.5, 4, 40)
        n_micro, n_e2e = self.compiles()
        minutes = (self.measurements() * per_measure + n_micro * per_compile + n_e2e * per_net_compile) / 60
        return (f"{self.measurements()} measurements, {n_micro + n_e2e} torch.compile calls, roughly {minutes:.0f} min "
                f"-> {self.out}")


def make_plan(args) -> Plan:
    """What to run, from the command line: filters, or each device's defaults (see --help)."""
    device, quick = args.device, args.quick
    cuda = torch.device(device).type == "cuda"
    ops, modules = _names(args.op), _names(args.module)
    ops = _pick(ops, list(OPS), "op") if ops is not None else ([] if modules is not None else None)
    modules = _pick(modules, [*ref.__all__, *VARIANTS], "module") if modules is not None else (
        [] if ops is not None else None)
    supported = supported_dtypes(device)
    low = "bf16" if cuda and "bf16" in supported else "fp32"      # the one dtype of --quick and of the networks
    dtypes = _pick(_names(args.dtype), list(DTYPES), "dtype") if args.dtype else ([low] if quick else supported)
    layouts = _pick(_names(args.layout), list(LAYOUTS), "layout") if args.layout else list(LAYOUTS)
    modes = _names(args.mode)
    if modes and not set(modes) <= {*MODES, *e2e.MODES}:
        raise SystemExit(f"python -m bench: unknown mode in {modes}; known: {', '.join((*MODES, *e2e.MODES))}")
    micro_modes = ([m for m in MODES if m in modes] if modes
                   else ["forward", "forward+backward"] if quick else list(MODES))
    try:
        shapes = ([parse_shape(s) for s in _names(args.shape)] if args.shape
                  else feature_shapes(8 if quick or not cuda else 32, quick))
    except ValueError as e:
        raise SystemExit(f"python -m bench: --shape: {e}") from None
    providers = _providers(args, device)
    cases, notes = all_cases(ops, modules, quick)
    micro_settings = micro.Settings(
        device, shapes, dtypes, layouts, micro_modes, providers,
        harness.Budget(0.025, 0.1, 10, 1000) if cuda else
        harness.Budget(0.03, 0.15, 5, 100) if quick else harness.Budget(0.05, 0.25, 10, 300))

    narrowed = any(v is not None for v in (args.op, args.module, args.shape))
    run_e2e = args.e2e if args.e2e is not None else (not narrowed or not args.micro)
    models = _pick(_names(args.model), list(e2e.MODELS), "model") if args.model else list(e2e.MODELS)
    e2e_settings = e2e.E2ESettings(
        device, [c for c in e2e.model_configs(device, quick) if c.model in models],
        [m for m in modules if m in ref.__all__] if args.module else list(e2e.E2E_MODULES),
        providers, dtypes if args.dtype else [low], layouts if args.layout else ["channels_last"],
        [m for m in e2e.MODES if m in modes] if modes else list(e2e.MODES),
        harness.Budget(0.2, 0.5 if quick else 2.0, 5 if quick else 10, 200) if cuda else
        harness.Budget(0.0, 0.3 if quick else 2.0, 3 if quick else 5, 100, min_warmup=1))
    return Plan(device, quick, _out_path(args, device), cases, notes, micro_settings if args.micro else None,
                e2e_settings if run_e2e else None)


def describe(plan: Plan) -> None:
    m, e = plan.micro, plan.e2e
    print("ops:      ", ", ".join(OPS))
    print("modules:  ", ", ".join(module_names()), "(default set; any fastattn.reference class works)")
    print("providers:", ", ".join(p.name for p in micro.providers(plan.device)))
    print("dtypes:   ", ", ".join(supported_dtypes(plan.device)), f"(native on {plan.device})")
    if m:
        print("this run: ", f"{len(plan.cases)} cases x {len(m.shapes)} shapes ({', '.join(map(shape_str, m.shapes))}) "
              f"x {', '.join(m.dtypes)} x {', '.join(m.layouts)} x {', '.join(m.modes)} x "
              f"{', '.join(p.name for p in m.providers)}")
    if e:
        print("networks: ", ", ".join(f"{c.model} {shape_str(c.shape)}" for c in e.configs),
              "with", ", ".join(e.attentions))
    print(plan.summary())


def run(plan: Plan) -> list[dict]:
    """Runs the plan, appending each row to plan.out as it is measured; returns the rows."""
    device, cuda = plan.device, torch.device(plan.device).type == "cuda"
    env = harness.environment(device)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        harness.append_rows(plan.out, [row])

    print(f"fastattn bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"{plan.summary()}", file=sys.stderr)
    for n in plan.notes:
        print("  " + n, file=sys.stderr)
    if plan.quick and not any(p.name == "compile" for p in (plan.micro or plan.e2e).providers):
        print("  --quick: no torch.compile provider (each compile takes seconds, whole networks minutes on a CPU); "
              "add --provider eager,compile,fastattn to include it", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if not cuda and load > 0.75 * (os.cpu_count() or 1):
        print(f"  warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete for the CPU and "
              "multi-threaded timings will be noisy (run on a quiet machine, or with OMP_NUM_THREADS=1)",
              file=sys.stderr)
    progress, skips = Progress(plan.measurements()), micro.Skips()
    if plan.micro and plan.cases:
        bw = harness.copy_bandwidth(harness.Timer(torch.device(device), plan.micro.budget))
        print(f"  copy bandwidth (dst.copy_(src), {bw.nbytes // 2 // harness.MiB} MiB): {bw.gbps:.1f} GB/s; "
              f"last-level cache {harness.llc_bytes(device) // harness.MiB} MiB", file=sys.stderr)
        emit(dict(kind="copy", name="copy", provider="torch", mode="forward", dtype="fp32", layout="-",
                  shape=str(bw.nbytes // 2 // 4), median_ms=bw.stats.median_ms, p20_ms=bw.stats.p20_ms,
                  p80_ms=bw.stats.p80_ms, gbps=bw.gbps, pct_roofline=100.0, peak_mb=None, **env))
        micro.Runner(plan.micro, env, bw.gbps, emit, skips, progress).run(plan.cases)
    if plan.e2e:
        e2e.E2ERunner(plan.e2e, env, emit, skips, progress).run()
    print_tables(rows, env)
    if skips.seen:
        print(f"{len(skips.seen)} provider/case combinations skipped (reasons above, on stderr)")
    print(f"{len(rows)} rows appended to {plan.out}")
    return rows


def print_tables(rows: list[dict], env: dict) -> None:
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    copy = next((r for r in rows if r["kind"] == "copy"), None)
    n_configs = len({(r["name"], r["dtype"], r["layout"], r["shape"]) for r in rows if r["kind"] in ("op", "module")})
    detailed = n_configs <= MAX_TABLE_LINES
    micro_table = (report.micro_table if detailed else report.micro_summary)(rows)
    if micro_table:
        against = "eager/compile" if any(r["provider"] == "compile" for r in rows) else "eager"
        print(f"fastattn against {against}"
              + (": per mode, the best fastattn provider's time, speed-up, % of the copy bandwidth" if detailed else
                 f" over {n_configs} configurations: geometric-mean speed-up, median % of the copy bandwidth")
              + (f" ({copy['gbps']:.1f} GB/s)" if copy else ""))
        print(micro_table + "\n")
    model_table = report.model_table(rows)
    if model_table:
        print("end to end (ms per step; overhead of the attention modules over the plain network of the same provider)")
        print(model_table + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    plan = make_plan(args)
    if args.list:
        describe(plan)
    else:
        run(plan)
    return 0


def fastattn_bench(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m fastattn bench [--quick] [bench options]`: parity of each fast op and module
    (`python -m fastattn check`'s table), then the benchmark."""
    from fastattn import check

    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = check.print_table(check.run(device) + check.run_modules(device))
    print(flush=True)
    code = main(argv)
    return 1 if failed else code


if __name__ == "__main__":
    sys.exit(main())
