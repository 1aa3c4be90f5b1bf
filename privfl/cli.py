"""The ``privfl`` command line: parses arguments into config objects and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from privfl.errors import PrivflError

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from privfl.config import default_config, load_config
    from privfl.report import print_run_report
    from privfl.runner import run

    config = load_config(args.config) if args.config else default_config()
    out = Path(args.out) if args.out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    console = Console(stderr=True)
    source = args.config or "embedded default"
    console.print(f"[bold]privfl run[/bold]: {source} -> {out}")
    result = run(config, out, resume=args.resume, progress=not args.quiet)
    print_run_report(result, console=Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="privfl", description="Privacy-preserving federated learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated training (default: the embedded healthcare demo)")
    run.add_argument("config", nargs="?", help="a TOML run config (default: the embedded healthcare demo)")
    run.add_argument("--out", help="run directory (default: runs/run-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``privfl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PrivflError as exc:
        print(f"privfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privfl: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
