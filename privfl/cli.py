"""The ``privfl`` command line: parses arguments into config objects and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from privfl.errors import ConfigError, PrivflError

__all__ = ["main"]


def _run_config_source(config: str | None, resume: bool, saved: Path) -> tuple[Path | None, str]:
    """Which TOML config a run uses: (its file, or None for the embedded default; how to name it).

    A given file; on a resume without one, the copy the run kept (``saved``), not the embedded
    default: resuming a run of other settings with the default's would quietly change them
    (``federation.rounds``, which a resume may change, included).
    """
    if config:
        return Path(config), config
    if resume and saved.is_file():
        return saved, f"{saved} (the config this run started with)"
    return None, "embedded default"


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from privfl.config import default_config, default_config_text, load_config
    from privfl.rundir import CONFIG_FILE
    from privfl.runner import run

    out = Path(args.out) if args.out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    path, source = _run_config_source(args.config, args.resume, out / CONFIG_FILE)
    # load_config first: the file's errors, typed, before it is read again for its text
    config = load_config(path) if path is not None else default_config()
    text = path.read_text(encoding="utf-8") if path is not None else default_config_text()
    console = Console(stderr=True)
    console.print(f"[bold]privfl run[/bold]: {source} -> {out}")
    try:
        result = run(config, out, resume=args.resume, progress=not args.quiet, record=args.record, config_text=text)
    except KeyboardInterrupt:
        from privfl.federation import interrupted_run_hint

        # The hint depends on what the run left in the directory; the library says which is true.
        print(f"privfl: interrupted; {interrupted_run_hint(out)}", file=sys.stderr)
        return 130
    from privfl.report import print_run_report  # torch-heavy: not imported on the path of a refusal

    # Written to a file or a pipe (a log), the report keeps every column: rich would otherwise fit it
    # to 80 columns and cut the widest table's cells to "…".
    print_run_report(result, console=Console() if sys.stdout.isatty() else Console(width=160))
    if result.history and all(record.get("aborted") for record in result.history):
        # The run did no useful work: a script must not read it as a success.
        print(f"privfl: error: all {len(result.history)} rounds aborted; the model was never updated", file=sys.stderr)
        return 1
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from privfl.audit.report import audit_run

    if args.site:
        return _cmd_audit_site(args)
    if not args.run_dir:
        print("privfl: error: name a run directory, or a site's state directory with --site", file=sys.stderr)
        return 2
    from privfl.audit.deployment import find_deployment

    if find_deployment(args.run_dir) is not None:
        return _cmd_audit_deployment(args)
    report = audit_run(args.run_dir, out_dir=args.out, accountant=args.accountant)
    if args.format == "json":
        print(report.to_json_text(), end="")
    else:
        print(report.to_markdown())
        print(f"\nwrote {report.paths.markdown}, {report.paths.json}, {report.paths.plot}", file=sys.stderr)
    # Like lint: an ERROR finding means the run must not be released under its stated guarantee.
    return 1 if report.errors else 0


def _cmd_audit_deployment(args: argparse.Namespace) -> int:
    from privfl.audit.deployment import audit_deployment

    if args.accountant:
        print("privfl: error: a deployment is audited from each site's own ledger, with that ledger's accountant; "
              "drop --accountant", file=sys.stderr)
        return 2
    return _print_audit(audit_deployment(args.run_dir, out_dir=args.out), args.format, also=" and each site's site-audit.md under sites/")


def _print_audit(report, fmt: str, *, also: str = "") -> int:
    """Prints a site or deployment audit (markdown or JSON); exit 1 on an error finding."""
    if fmt == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.to_markdown())
        print(f"wrote {', '.join(str(p) for p in report.paths)}{also}", file=sys.stderr)
    return 1 if report.errors else 0


def _cmd_identity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from privfl.site import IDENTITY_FILE, site_identity

    state = Path(args.state_dir)
    if not state.is_dir():
        # A mistyped path must not print a fresh key nobody will ever sign with.
        print(f"privfl: error: {state} is not a directory: create the site's state directory (or start its worker once) first",
              file=sys.stderr)
        return 2
    from privfl.rundir import LEDGER_FILE, SITE_FILE, directory_kind, run_traces

    if not (state / SITE_FILE).is_file():
        # A site's key belongs in its own state directory: one made in a run or deployment directory
        # (a wrong but existing path) would be handed out for a site that never uses it.
        kind = directory_kind(state) or (
            "a privfl run directory" if (state / LEDGER_FILE).exists() or run_traces(state) else None
        )
        if kind is not None:
            print(f"privfl: error: {state} is {kind}, not a site's state directory", file=sys.stderr)
            return 2
    made = not (state / IDENTITY_FILE).exists()
    print(site_identity(state).hex())
    if made:
        print(f"privfl: made a new identity key in {state / IDENTITY_FILE} (private, mode 0600)", file=sys.stderr)
    return 0


def _cmd_audit_site(args: argparse.Namespace) -> int:
    from privfl.audit.site import audit_site

    if args.run_dir or args.accountant:
        print("privfl: error: --site audits one site's state directory; it takes no run directory or --accountant", file=sys.stderr)
        return 2
    return _print_audit(audit_site(args.site, out_dir=args.out), args.format)


def _cmd_lint(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    from privfl.audit.lint import Severity, lint_file
    from privfl.config import load_config

    findings = lint_file(args.config)
    console = Console()
    console.soft_wrap = not console.is_terminal  # a pipe or file: one line per paragraph, for grep
    colours = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}

    def indented(text: Text) -> None:
        # A terminal wraps each paragraph under its indent; a pipe or file is not cut at 80 columns.
        console.print(Padding(text, (0, 0, 0, 2), expand=False) if console.is_terminal else Text("  ") + text)

    for f in findings:
        # Findings quote config syntax such as [federation.client_dp]: print it as text, never as markup.
        colour = colours.get(f.severity, "white")
        console.print(f"[bold {colour}]{f.severity.value.upper():7}[/] {f.code}  [bold]{escape(f.field)}[/]")
        indented(Text(f.message))
        indented(Text.assemble(("fix: ", "dim"), f.fix))
        console.print()
    errors = sum(1 for f in findings if f.severity is Severity.ERROR)
    warning_count = sum(1 for f in findings if f.severity is Severity.WARNING)
    data = load_config(args.config).data
    # The sizes behind every per-client figure: a deployment's sites serving their own files hold others.
    indented(Text(
        f"client sizes: the bundled {data.dataset.value} dataset split into {data.num_clients} clients as [data] says "
        "(a deployment's sites that serve their own files have their own sizes)"
    ))
    console.print(f"{args.config}: {len(findings)} findings ({errors} errors, {warning_count} warnings)")
    return 1 if errors else 0


# Used only with --run; without it they would be silently ignored.
_RUN_ONLY_OPTIONS = (("rounds", "--rounds"), ("run_config", "--run-config"), ("iterations", "--iterations"))
_DEFAULT_ITERATIONS = 300


def _parse_rounds(text: str | None) -> list[int] | None:
    """``--rounds 0,2`` as a list of rounds (None: every recorded round)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    # isdigit rejects signs too, so a negative round gets the same message as any other typo.
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ConfigError("--rounds", text, "must be comma-separated round numbers (0-based), e.g. 0,2")
    return [int(part) for part in parts]


def _cmd_attack_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.config:
        print(
            "privfl: error: with --run, name the run's config with --run-config; the positional CONFIG is an "
            "attack-matrix config", file=sys.stderr,
        )
        return 2
    # Checked before the run's data is loaded, so a typo fails at once.
    rounds = _parse_rounds(args.rounds)
    iterations = _DEFAULT_ITERATIONS if args.iterations is None else args.iterations
    if iterations < 1:
        raise ConfigError("--iterations", iterations, "must be a number of steps >= 1")
    from privfl.attacks.recorded import attack_recording, write_recorded_results
    from privfl.export import run_setup

    console = Console(stderr=True)
    console.print(f"[bold]privfl attack[/bold]: what the server observed in {args.run} -> {args.out}")
    model_fn, clients = run_setup(args.run, args.run_config, option="--run-config")

    def show(row) -> None:
        if not args.quiet:
            detail = f" {row.best_psnr:.1f} dB (chance {row.best_chance_psnr:.1f})" if row.reconstructed else ""
            console.print(f"  round {row.round} {row.source}: {row.view}, {row.attack}: {row.verdict}{detail}", highlight=False, soft_wrap=True)

    result = attack_recording(args.run, model_fn=model_fn, clients=clients, rounds=rounds,
                              iterations=iterations, on_row=show)
    folder = write_recorded_results(result, args.out)
    print(result.to_markdown())
    print(f"wrote {folder / 'results.json'} and {folder / 'results.md'}", file=sys.stderr)
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.run:
        return _cmd_attack_run(args)
    for dest, option in _RUN_ONLY_OPTIONS:
        if getattr(args, dest) is not None:
            print(f"privfl: error: {option} needs --run RUN_DIR", file=sys.stderr)
            return 2

    from privfl.attacks.matrix import (
        AttackMatrixInterrupted,
        default_attack_config,
        load_attack_config,
        print_attack_summary,
        run_attack_matrix,
    )

    config = load_attack_config(args.config) if args.config else default_attack_config()
    console = Console(stderr=True)
    console.print(f"[bold]privfl attack[/bold]: {args.config or 'embedded default'} -> {args.out}")
    try:
        result = run_attack_matrix(config, args.out, progress=not args.quiet)
    except AttackMatrixInterrupted as stop:
        # The library wrote the finished cells before raising; say what is on disk.
        if stop.result is None:
            print(f"privfl: interrupted before any of {stop.cells_planned} cells finished; nothing written", file=sys.stderr)
        else:
            print_attack_summary(stop.result, console=Console())
            print(
                f"privfl: interrupted; wrote the {len(stop.result.rows)} of {stop.cells_planned} cells that finished "
                f"to {stop.result.out_dir / 'results.json'} and results.md (marked incomplete)",
                file=sys.stderr,
            )
        return 130
    print_attack_summary(result, console=Console())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from privfl.export import export_run

    result = export_run(args.run_dir, args.out, config_path=args.config, round=args.round)
    changes = f"; DP-SGD changes: {', '.join(result.dp_changes)}" if result.dp_changes else ""
    print(f"wrote {result.path}: round {result.round}, {result.num_parameters} parameters{changes}")
    return 0


def _cmd_deploy_local(args: argparse.Namespace) -> int:
    # Before anything starts: a deployment would otherwise run until its first timeout check fails.
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        print("privfl: error: --timeout must be a number of seconds > 0", file=sys.stderr)
        return 2
    from rich.console import Console

    from privfl.config import default_config_text
    from privfl.flower.local import deploy_local
    from privfl.rundir import CONFIG_FILE

    if args.resume and not args.out:
        print("privfl: error: --resume needs --out DIR, the deployment to resume", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("deploy-%Y%m%d-%H%M%S")
    path, source = _run_config_source(args.config, args.resume, out / "run" / CONFIG_FILE)
    text = path.read_text() if path is not None else default_config_text()
    console = Console(stderr=True)

    from privfl.config import config_from_dict, tomllib
    from privfl.flower.local import site_names

    try:
        names, note = site_names(config_from_dict(tomllib.loads(text)), max(args.sites, 0))
    except (PrivflError, tomllib.TOMLDecodeError):
        names, note = (), None  # deploy_local refuses the config with its own message, before starting anything
    if names is None:
        shown = "named after the dataset's groups"
    else:
        shown = ", ".join(names if len(names) <= 5 else (*names[:3], "...", names[-1]))

    def announce() -> None:
        console.print(
            f"[bold]privfl deploy local[/bold]{' (resuming)' if args.resume else ''}: {source}, {args.sites} "
            f"site{'s' * (args.sites != 1)}{f' ({shown})' if shown else ''} -> {out} (TLS SuperLink and one SuperNode per site on 127.0.0.1)",
            highlight=False,
        )
        if note:
            console.print(f"  ({note})", highlight=False)

    # SIGTERM (a supervisor, `timeout`, `kill`) stops the deployment as Ctrl-C does: every process it
    # started is stopped on the way out. Python's default would end this process and leave them running.
    import signal

    def _terminated(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = deploy_local(
            text, sites=args.sites, out=out, progress=not args.quiet, timeout=args.timeout, on_start=announce, record=args.record,
            resume=args.resume,
        )
    except KeyboardInterrupt:
        # Every process is stopped by now. A start that wrote nothing left nothing behind (deploy_local removes it).
        hint = (
            f"resume with: privfl deploy local --resume --out {out} (each site's ledger keeps what it spent)"
            if out.is_dir() and any(out.iterdir()) else f"nothing was started; run again with --out {out}"
        )
        print(f"privfl: interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = result.summary
    accuracy = summary.get("final_accuracy")
    print(f"final accuracy: {accuracy:.4f}" if accuracy is not None else "final accuracy: - (no test set)")
    for name, entry in summary["clients"].items():
        eps = entry["epsilon"]
        print(f"  {name:16} epsilon {eps:.3f} of {entry['epsilon_budget']:.3f} (its own ledger: {result.site_dirs[name] / 'state'})"
              if eps is not None else f"  {name:16} epsilon -")
    level = summary.get("client_level")
    if level:
        level_eps = "inf" if level["epsilon"] is None else f"{level['epsilon']:.3f}"
        print(f"client-level DP (a whole site's participation): epsilon {level_eps} at delta {level['delta']:g}, noise {level['noise']}")
    print(f"wall time {result.seconds:.1f} s; summary: {result.out_dir / 'summary.json'}")
    if summary["rounds"] and len(summary["aborted_rounds"]) == summary["rounds"]:
        print(f"privfl: error: all {summary['rounds']} rounds aborted; the model was never updated", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="privfl", description="Privacy-preserving federated learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    parser.add_argument("--version", action="version", version=f"privfl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated training (default: the embedded healthcare demo)")
    run.add_argument("config", nargs="?", help="a TOML run config (default: the embedded healthcare demo)")
    run.add_argument("--out", help="run directory (default: runs/run-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--record", action="store_true",
        help="keep what the server observes in DIR/observed, for `privfl attack --run` (plaintext: every update)",
    )
    run.set_defaults(func=_cmd_run)

    audit = sub.add_parser("audit", help="privacy-budget report of a run directory (audit.md, audit.json, audit.png)")
    audit.add_argument(
        "run_dir", nargs="?",
        help="a directory written by privfl run (an interrupted one is audited as it stands), or by privfl deploy local "
        "(every site's own ledger against the server's record)",
    )
    audit.add_argument(
        "--site", metavar="STATE_DIR",
        help="instead: audit one deployed site's own ledger in its state directory (site-audit.md, site-audit.json)",
    )
    audit.add_argument("--out", help="where to write the report (default: the run or state directory)")
    audit.add_argument("--format", choices=["md", "json"], default="md", help="what to print (default: md)")
    audit.add_argument(
        "--accountant",
        choices=["prv", "rdp", "pld"],
        help="recompute with this accountant (default: the run's); budgets are still compared with the run's",
    )
    audit.set_defaults(func=_cmd_audit)

    lint = sub.add_parser("lint", help="check a run config for privacy pitfalls")
    lint.add_argument("config", help="a TOML run config")
    lint.set_defaults(func=_cmd_lint)

    attack = sub.add_parser(
        "attack", help="run gradient-inversion attacks against each protection (results.json, results.md, grids)"
    )
    attack.add_argument("config", nargs="?", help="a TOML attack-matrix config (default: the embedded one)")
    attack.add_argument("--out", required=True, help="output directory (existing results there are overwritten)")
    attack.add_argument("--quiet", action="store_true", help="no progress bar")
    attack.add_argument("--run", metavar="RUN_DIR", help="attack what the server observed in a run made with `run --record`")
    attack.add_argument(
        "--run-config", help="with --run: the TOML config the run was made with (default: the run's config.toml, else the embedded demo)"
    )
    attack.add_argument("--rounds", help="with --run: comma-separated rounds to attack (default: every recorded round)")
    # default None, so that a --iterations given without --run is noticed (300 is applied with --run)
    attack.add_argument("--iterations", type=int, help=f"with --run: FedAvg-inversion steps (default: {_DEFAULT_ITERATIONS})")
    attack.set_defaults(func=_cmd_attack)

    export = sub.add_parser(
        "export", help="write a run's model as a state_dict, with the DP-SGD architecture changes and the run's identity"
    )
    export.add_argument("run_dir", help="a directory written by privfl run, or by privfl deploy local (its run/ is read)")
    export.add_argument("--out", required=True, help="the file to write (e.g. model.pt; must not exist)")
    export.add_argument(
        "--config", help="the TOML config the run was made with (default: the run's config.toml, else the embedded demo)"
    )
    export.add_argument("--round", type=int, help="the 0-based round to export (default: the last finished one)")
    export.set_defaults(func=_cmd_export)

    identity = sub.add_parser(
        "identity",
        help="print a site's identity public key (made on first use): hand the CKKS key holder's to the other sites",
    )
    identity.add_argument("state_dir", help="the site's state directory")
    identity.set_defaults(func=_cmd_identity)

    deploy = sub.add_parser("deploy", help="run a federation as separate processes over Flower (needs privfl[flower])")
    targets = deploy.add_subparsers(dest="target", required=True)
    local = targets.add_parser(
        "local", help="a TLS SuperLink and one SuperNode per site on this machine (the bundled data split over them)"
    )
    local.add_argument("config", nargs="?", help="a TOML run config (default: the embedded healthcare demo)")
    local.add_argument("--sites", type=int, default=3, help="number of sites (SuperNodes) to start (default: 3)")
    local.add_argument("--out", help="a new directory for the deployment (default: runs/deploy-<timestamp>)")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take (default: 3600)")
    local.add_argument("--quiet", action="store_true", help="no progress bar")
    local.add_argument(
        "--resume", action="store_true",
        help="continue the unfinished run in --out DIR (stopped or crashed) with the same config and --sites",
    )
    local.add_argument(
        "--record", action="store_true",
        help="keep what the server observes in DIR/run/observed, for `privfl attack --run DIR/run` (plaintext: every update)",
    )
    local.set_defaults(func=_cmd_deploy_local)
    return parser


def _version() -> str:
    from privfl import __version__

    return __version__


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout is not a file (e.g. captured in a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``privfl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # -v is privfl's own progress (every round, every process started); the libraries underneath stay at
    # warnings (httpx would otherwise log every HTTP request a deployment makes).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("privfl").setLevel(logging.INFO if args.verbose else logging.NOTSET)
    previous = warnings.showwarning
    warnings.showwarning = _privfl_warnings(previous)
    try:
        return args.func(args)
    except BrokenPipeError:
        # stdout was closed by its reader (`privfl audit DIR | head`): end quietly. stdout now points at
        # devnull so that the interpreter's final flush of what is still buffered does not fail again.
        _stdout_to_devnull()
        return 1
    except PrivflError as exc:
        print(f"privfl: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        # An optional extra that is not installed: the message names the install command.
        print(f"privfl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The library types the file errors it expects; one it did not still gets one clear line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"privfl: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # `privfl run` prints its own hint (it knows the run directory); nothing else can resume.
        print("privfl: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


def _privfl_warnings(show):
    """A ``warnings.showwarning`` that prints privfl's own warnings as one ``privfl: warning:`` line,
    like its errors (not a source path and a line of code), and hands anything else to ``show``."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: PLR0917  # warnings.showwarning's signature
        if str(filename).startswith(package):
            print(f"privfl: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
