"""Command line: `python -m fastattn info` (what is built), `python -m fastattn check` (parity) or
`python -m fastattn bench [--quick]` (parity of the fast modules, then the benchmarks of a source checkout)."""
import argparse
import os
import sys


def _bench(argv) -> int:
    """Runs bench/ of the source checkout this fastattn comes from (it is not installed with fastattn)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repo, "bench", "__init__.py")) and repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        import bench
    except ImportError:
        bench = None
    if not hasattr(bench, "run_fastattn_bench"):
        print("python -m fastattn bench needs a source checkout of fastattn: its bench/ folder, next to fastattn/ "
              f"(looked in {repo}). Clone the repository and install it with `pip install -e .`.", file=sys.stderr)
        return 2
    return bench.run_fastattn_bench(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, what is built, which backends can run here and why not")
    sub.add_parser("check", help="info, then parity of every fast path against the reference on this machine")
    bench = sub.add_parser("bench", help="parity of each fast module, then the benchmarks (needs a source checkout); "
                                         "other options are passed to `python -m bench`")
    bench.add_argument("--quick", action="store_true", help="the quick benchmark (a few minutes on a CPU)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench((["--quick"] if args.quick else []) + extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        from .info import main as info_main

        info_main()
        return 0
    from .check import main as check_main

    return check_main()


if __name__ == "__main__":
    sys.exit(main())
