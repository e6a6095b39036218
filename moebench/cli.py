"""The ``moebench`` command line. Exit codes: 0 ok, 1 a check failed, 2 usage or input error."""

from __future__ import annotations

import argparse
import sys

from moebench import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="time a small EP layer on 1..N ranks and check it against fp64")
    demo.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4], metavar="W")
    demo.add_argument("--tokens-per-rank", type=int, default=2048)
    demo.add_argument("--warmup", type=int, default=3)
    demo.add_argument("--repeats", type=int, default=10)
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from moebench.demo import run_demo
            from moebench.launch import resolve_device

            resolve_device(args.device, "auto")  # refuse an impossible device before any work

            for name in ("tokens_per_rank", "warmup", "repeats"):
                if getattr(args, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} = {getattr(args, name)}: accepted an integer >= 1")
            if any(w < 1 for w in args.world_sizes):
                raise ValueError(f"--world-sizes = {args.world_sizes}: accepted integers >= 1")
            return 0 if run_demo(args.world_sizes, args.tokens_per_rank, args.warmup, args.repeats, args.device) else 1
    except ValueError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
