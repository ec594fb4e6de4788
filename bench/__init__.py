"""fastattn benchmarks (a source-checkout package, not installed with fastattn).

- `python -m bench [--quick]`: microbenchmarks of ops and modules, end-to-end networks; see bench/README.md.
- `python -m bench.plot [CSV]`: PNGs from a results CSV.
- `python -m fastattn bench [--quick]`: parity of the fast modules, then `python -m bench`.

Modules: harness (timing, bandwidth, memory, CSV), cases (ops and modules, shapes, bytes that
must move), micro (microbenchmark runner), models (ResNet-50, MobileNet-like), e2e (network
runner), report (tables), plot; the parity check is fastattn.check.
"""


def run_fastattn_bench(argv=None) -> int:
    """Entry point of `python -m fastattn bench`."""
    from .__main__ import fastattn_bench

    return fastattn_bench(argv)
