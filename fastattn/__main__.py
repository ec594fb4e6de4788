"""Command line: `python -m fastattn info` (what is built) or `python -m fastattn check` (parity)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, what is built, which backends can run here and why not")
    sub.add_parser("check", help="info, then parity of every fast path against the reference on this machine")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        info_main()
        return 0
    from .check import main as check_main

    return check_main()


if __name__ == "__main__":
    sys.exit(main())
