"""Timing, bandwidth, memory and CSV helpers shared by the micro and end-to-end benchmarks.

Timing: on CUDA, one pair of CUDA events around each call (as `triton.testing.do_bench`), a
warm-up and a repetition count derived from a first estimate; on the CPU, `time.perf_counter`
around each call. Both report the median and the 20th / 80th percentiles in milliseconds.
Calls rotate over several input buffers whose total exceeds the last-level cache, so every
call reads its inputs from memory, not from a cache left warm by the previous call.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import glob
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import time
from typing import Callable, Iterable, Optional

import torch
from torch.autograd.graph import saved_tensors_hooks

MiB = 2 ** 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")

# ------------------------------------------------------------------------------------------------
# Statistics and timers
# ------------------------------------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    """q-quantile of xs with linear interpolation (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass(frozen=True)
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    @classmethod
    def of(cls, times_ms: list[float]) -> "Stats":
        return cls(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms))


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long a measurement warms up and repeats (seconds), and its bounds on repetitions."""

    warmup_s: float = 0.1
    rep_s: float = 0.5
    min_reps: int = 10
    max_reps: int = 500
    min_warmup: int = 2          # calls, CPU (on CUDA the first estimate's 5 calls warm up)


class Timer:
    """`Timer(device, budget)(fn, n_buffers, before)` times `fn(k)` for k = 0, 1, .. n_buffers - 1,
    0, 1, ... and returns Stats. `before(k)`, when given, runs before each call outside the timed
    region (do_bench's `grad_to_none`)."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device = torch.device(device)
        self.budget = budget

    def __call__(self, fn: Callable[[int], object], n_buffers: int = 1,
                 before: Optional[Callable[[int], None]] = None) -> Stats:
        before = before or (lambda k: None)
        if self.device.type == "cuda":
            return self._cuda(fn, n_buffers, before)
        return self._cpu(fn, n_buffers, before)

    def _cpu(self, fn, n, before) -> Stats:
        b = self.budget
        i, t_end = 0, time.perf_counter() + b.warmup_s
        while i < b.min_warmup or (time.perf_counter() < t_end and i < b.max_reps):
            before(i % n)
            fn(i % n)
            i += 1
        times: list[float] = []
        t_end = time.perf_counter() + b.rep_s
        while len(times) < b.min_reps or (time.perf_counter() < t_end and len(times) < b.max_reps):
            k = len(times) % n
            before(k)
            t0 = time.perf_counter()
            fn(k)
            times.append((time.perf_counter() - t0) * 1e3)
        return Stats.of(times)

    def _cuda(self, fn, n, before) -> Stats:
        b = self.budget
        torch.cuda.synchronize(self.device)
        est = self._cuda_events(fn, n, before, 5)
        per_call_s = max(sum(est) / len(est) * 1e-3, 1e-6)
        self._cuda_events(fn, n, before, max(1, min(b.max_reps, int(b.warmup_s / per_call_s))))
        reps = max(b.min_reps, min(b.max_reps, int(b.rep_s / per_call_s)))
        return Stats.of(self._cuda_events(fn, n, before, reps))

    def _cuda_events(self, fn, n, before, reps) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            before(i % n)
            starts[i].record()
            fn(i % n)
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


# ------------------------------------------------------------------------------------------------
# Caches, copies, bandwidth
# ------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse cache size {text!r}")
    return int(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2).upper()]


def _cpu_llc_bytes() -> Optional[int]:
    """Size of the last-level (highest level, data or unified) cache of cpu0, from sysfs or lscpu."""
    best = None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or level > best[0]):
            best = (level, size)
    if best:
        return best[1]
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for level in ("L3", "L2"):
        m = re.search(rf"^{level} cache:\s*(\d+)", out, re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


@functools.lru_cache(maxsize=None)
def llc_bytes(device: str) -> int:
    """Last-level cache of the device: the CPU's L3 (or L2), the GPU's L2 (50 MB on an H100)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 * MiB)
    return _cpu_llc_bytes() or 32 * MiB


def n_buffers(bytes_per_call: int, device: str, max_buffers: int = 64, max_total: int = 2 * 2 ** 30) -> int:
    """How many input buffers to rotate so that together they exceed twice the last-level cache."""
    per = max(1, bytes_per_call)
    n = math.ceil(2 * llc_bytes(device) / per)
    return max(1, min(n, max_buffers, max(1, max_total // per)))


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    gbps: float
    stats: Stats
    nbytes: int          # bytes moved per copy: 2 x the buffer size (read + write)


def copy_bandwidth(timer: Timer) -> Bandwidth:
    """The roofline reference: `dst.copy_(src)` of a buffer much larger than the last-level cache."""
    dev = timer.device
    size = max(256 * MiB, 8 * llc_bytes(str(dev))) if dev.type == "cpu" else max(1024 * MiB, 16 * llc_bytes(str(dev)))
    src = torch.rand(size // 4, device=dev)
    dst = torch.empty_like(src)
    stats = timer(lambda k: dst.copy_(src))
    nbytes = 2 * size
    return Bandwidth(nbytes / (stats.median_ms * 1e-3) / 1e9, stats, nbytes)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while fn() runs."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on the GPU by fn() on top of what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ------------------------------------------------------------------------------------------------
# Devices and environment
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str) -> str:
    """Human-readable device name for the `device` column."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu {_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """Filename-safe device name: 'cpu-AMD-EPYC', 'NVIDIA-H100-80GB-HBM3'."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu {_cpu_model()}"
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(device: str) -> dict:
    """The columns every row of a run shares."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------

COLUMNS = ["kind", "name", "provider", "mode", "dtype", "layout", "shape", "median_ms", "p20_ms", "p80_ms",
           "gbps", "pct_roofline", "peak_mb", "device", "torch", "triton", "commit", "date"]
FLOAT_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_roofline", "peak_mb")
KINDS = ("op", "module", "model", "copy")


def default_csv(device: str) -> str:
    return os.path.join(RESULTS_DIR, f"{device_slug(device)}.csv")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append_rows(path: str, rows: Iterable[dict]) -> int:
    """Append rows (dicts with the COLUMNS keys; floats may be None) to the CSV at path, writing
    the header when the file is new. Refuses a file whose header is not COLUMNS."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise RuntimeError(f"{path} has columns {header}, expected {COLUMNS}: write to another file (--out)")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            missing = set(COLUMNS) - set(r)
            if missing:
                raise KeyError(f"row lacks columns {sorted(missing)}")
            w.writerow([_fmt(r[c]) for c in COLUMNS])
    return len(rows)


def read_rows(path: str) -> list[dict]:
    """The rows of a results CSV, with FLOAT_COLUMNS as float (None where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in FLOAT_COLUMNS:
            r[c] = float(r[c]) if r.get(c) not in (None, "") else None
    return rows
