"""The ``vllm-conformance`` command: one subcommand per function pair.

Each subcommand is two functions, ``add_<name>(subparsers)`` that declares its arguments
and ``run_<name>(args) -> int`` that does the work and returns the exit status; a new
subcommand is one more pair and one more line in :data:`SUBCOMMANDS`::

    vllm-conformance run [--suite NAME ...] [pytest options]
    vllm-conformance serve ENTRY [--matrix M] [--log FILE] [--ready-file FILE]
    vllm-conformance plan [--format md|json] [--against RUN_DIR] [pytest options]
    vllm-conformance compare OLD NEW [--format md|html|json] [--out FILE]
                             [--fail-on regressions|any|never]
    vllm-conformance report RUN_DIR [RUN_DIR ...] [--no-html] [--print]
    vllm-conformance discover ENTRY [ENTRY ...] [--margin 0.93] [--write-back]

Exit status: 0 success; 1 the comparison found what ``--fail-on`` fails on; 2 bad usage or
a run that cannot be read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vllm_conformance import verdicts

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


# -- run ----------------------------------------------------------------------------

SUITES = ("serving", "context", "robustness", "auth", "multimodal", "accuracy", "performance")


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the bundled suites (pytest --pyargs vllm_conformance.suites ...)",
        description="Run the suites that ship with the package, from any directory. Every "
        "other option goes to pytest, e.g. vllm-conformance run --matrix ./my-matrix -m h100",
    )
    p.add_argument(
        "--suite",
        action="append",
        choices=SUITES,
        help="run only this suite (repeatable; default: all)",
    )
    p.set_defaults(func=run_run, pass_unknown=True)


def run_run(args: argparse.Namespace) -> int:
    modules = [f"vllm_conformance.suites.test_{s}" for s in args.suite or ()]
    # Test ids relative to the installed package (vllm_conformance/suites/test_x.py::...);
    # outside its rootdir pytest would give them no module part at all.
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "pytest", f"--rootdir={root}", "-p", "no:cacheprovider"]
    argv += [*args.pytest_args, "--pyargs"]
    # pytest in its own process image: it must import the plugin itself (to rewrite its
    # asserts), and signals from CI reach it directly.
    os.execv(sys.executable, [*argv, *(modules or ["vllm_conformance.suites"])])
    return EXIT_USAGE  # not reached


# -- serve --------------------------------------------------------------------------


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="start one matrix entry's server and keep it until SIGTERM or Ctrl-C",
        description="Start the server of one matrix entry exactly as the suites would "
        "(same arguments, GPUs, readiness check), print its URL, and keep it running until "
        "SIGTERM or Ctrl-C; then stop it and everything it started. Run the suites against "
        "it with --endpoint URL --entry ID --server-log FILE.",
    )
    p.add_argument("entry", metavar="ENTRY", help="matrix entry id")
    p.add_argument("--matrix", type=Path, action="append", default=[], help="matrix file/dir")
    p.add_argument("--log", type=Path, default=None, help="server log (default: ENTRY.log)")
    p.add_argument(
        "--ready-file", type=Path, help="write URL, model and KV capacity here as JSON once ready"
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        help="seconds (default: 3 x the entry's planned start from its model size, >= 900)",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading
    from dataclasses import asdict

    from vllm_conformance.launch import gpus, serving
    from vllm_conformance.launch.local import ServerStartError
    from vllm_conformance.matrix import MatrixError, load

    try:
        entry = load(args.matrix).select([args.entry])[0]
    except MatrixError as exc:
        print(f"vllm-conformance serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key_env = entry.serve.api_key_env
    if key_env and not os.environ.get(key_env):
        # The suites would make up a key per run; a server kept for others needs a known one.
        print(
            f"vllm-conformance serve: {entry.id} is served with --api-key from ${key_env}: "
            f"set it, and pass the same key to the suites (--api-key)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    launcher = serving.LocalLauncher(gpus.detect(), args.startup_timeout)
    if why := launcher.unavailable(entry):
        print(f"vllm-conformance serve: {entry.id}: {why}", file=sys.stderr)
        return EXIT_USAGE
    server = launcher.server(entry, args.log or Path(f"{entry.id}.log"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ep = server.start()
    except ServerStartError as exc:
        print(f"vllm-conformance serve: {entry.id}: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    try:
        ready = {
            "entry": entry.id,
            "base_url": ep.base_url,
            "model": ep.model,
            "tokenizer": str(serving.tokenizer_path(entry)),
            "max_model_len": ep.max_model_len,
            "version": ep.version,
            "log": str(server.log_path.resolve()),
            "startup_seconds": server.startup_seconds,
            "kv_cache": asdict(server.kv_cache) if server.kv_cache else None,
        }
        print(json.dumps(ready), flush=True)
        if args.ready_file:
            args.ready_file.write_text(json.dumps(ready, indent=1) + "\n")
        while not stop.wait(1.0) and server.alive():
            pass
        if not server.alive():
            print(server.death_message(), file=sys.stderr)
            return EXIT_FINDINGS
        return EXIT_OK
    finally:
        server.stop()


# -- plan ---------------------------------------------------------------------------


def add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="the cost plan of a selection (server starts, full prefills, lm-eval documents, "
        "load requests, GPU-node time), before anything starts",
        description="Collect the bundled suites as 'run' would (every other option goes to "
        "pytest: -m h100, --entry ID, --matrix DIR, -n 8) and print per entry the server "
        "starts, full-length prefills, lm-eval documents, load-generator requests and the "
        "planned time from the model's shape and the GPU's datasheet, then each node's time "
        "one entry at a time and packed. Nothing is started; no GPU is needed.",
    )
    p.add_argument("--format", choices=("md", "json"), default="md", help="default: md")
    p.add_argument(
        "--against",
        type=Path,
        metavar="RUN_DIR",
        help="instead: the plan of that run against what it measured",
    )
    p.set_defaults(func=run_plan, pass_unknown=True)


def run_plan(args: argparse.Namespace) -> int:
    from vllm_conformance import plan

    if args.against is not None:
        from vllm_conformance import report

        rows = plan.versus(report.load_records(args.against))
        if not rows:
            print(f"vllm-conformance plan: {args.against}: no plan records", file=sys.stderr)
            return EXIT_USAGE
        if args.format == "json":
            print(json.dumps([vars(r) | {"ratio": r.ratio} for r in rows], indent=1))
        else:
            sys.stdout.write(plan.render_versus(rows))
        return EXIT_OK
    import pytest

    from vllm_conformance import plugin

    found: list[plan.Plan] = []

    class Grab:
        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(self, session: pytest.Session) -> None:
            if (got := plugin.state(session.config).plan) is not None:
                found.append(got)

    # As ``run`` collects them (see there for the rootdir).
    root = Path(__file__).resolve().parent.parent
    argv = ["--collect-only", "-q", f"--rootdir={root}", "-p", "no:cacheprovider"]
    argv += [*args.pytest_args, "--pyargs", "vllm_conformance.suites"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(argv, plugins=[Grab()])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) or not found:
        # A usage error is on stderr already; collection errors end pytest's report.
        if code != pytest.ExitCode.USAGE_ERROR:
            sys.stderr.write("\n".join(out.getvalue().splitlines()[-60:]) + "\n")
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(found[0].to_dict(), indent=1))
    else:
        sys.stdout.write(plan.render(found[0]))
    return EXIT_OK


# -- compare ------------------------------------------------------------------------


def add_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="diff two runs (before and after an upgrade)",
        description="Diff two runs: capacity, error behaviour, accuracy and performance "
        "(with significance tests), checks and tests that newly fail or pass. OLD and NEW "
        "are run directories (reports/<run-id>, also of a run killed half-way) or report.json "
        "files.",
    )
    p.add_argument("old", type=Path, metavar="OLD", help="run directory or report.json before")
    p.add_argument("new", type=Path, metavar="NEW", help="run directory or report.json after")
    p.add_argument(
        "--format", choices=("md", "html", "json"), default="md", help="output format (default: md)"
    )
    p.add_argument("--out", type=Path, help="write here instead of standard output")
    p.add_argument(
        "--fail-on",
        choices=("regressions", "any", "never"),
        default="regressions",
        help="exit 1 on regressions (default), on any finding but notes, or never",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=verdicts.ALPHA,
        help=f"one-sided significance level of the accuracy and performance tests "
        f"({verdicts.ALPHA}, the suites' own)",
    )
    p.add_argument(
        "--min-effect",
        type=float,
        default=verdicts.MIN_EFFECT,
        help=f"smallest relative performance change called a regression ({verdicts.MIN_EFFECT})",
    )
    p.add_argument(
        "--capacity-rtol",
        type=float,
        default=0.01,
        help="relative drop of KV tokens or concurrency that is a regression (0.01)",
    )
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from vllm_conformance.report import compare

    options = compare.Options(
        alpha=args.alpha, min_effect=args.min_effect, capacity_rtol=args.capacity_rtol
    )
    try:
        diff = compare.compare_paths(args.old, args.new, options)
    except compare.CompareError as exc:
        print(f"vllm-conformance compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = compare.render(diff, args.format, args.fail_on)
    line = compare.headline(diff, args.fail_on)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"{line}\nwritten: {args.out}")
    else:
        sys.stdout.write(text)
        if args.format != "md":
            print(line, file=sys.stderr)
    return EXIT_FINDINGS if diff.failing(args.fail_on) else EXIT_OK


# -- report -------------------------------------------------------------------------


def add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild report.json, summary.md and summary.html from a run's records",
        description="Rebuild a run's report from its records/*.jsonl, e.g. after a run was "
        "killed half-way (torn last lines are skipped; the report is marked incomplete).",
    )
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--no-html", action="store_true", help="do not write summary.html")
    p.add_argument("--print", action="store_true", help="print summary.md to standard output")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from vllm_conformance import report

    status = EXIT_OK
    for run_dir in args.run_dirs:
        if not (run_dir / "records").is_dir():
            print(f"vllm-conformance report: {run_dir}: no records/ directory", file=sys.stderr)
            status = EXIT_USAGE
            continue
        rep = report.finalize(run_dir, complete=None, html=not args.no_html)
        build = rep.get("build", {})
        state = "complete" if build.get("complete") else "INCOMPLETE"
        print(
            f"{run_dir}: {state}, {build.get('records')} records, "
            f"{build.get('torn_lines')} torn line(s) skipped; wrote report.json, summary.md"
            + ("" if args.no_html else ", summary.html")
        )
        if args.print:
            sys.stdout.write((run_dir / "summary.md").read_text())
    return status


# -- discover -----------------------------------------------------------------------


def add_discover(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from vllm_conformance.launch import discover

    p = sub.add_parser(
        "discover",
        help="find the largest max_model_len an entry starts and serves with",
        description=discover.__doc__,
    )
    discover.add_arguments(p)
    p.set_defaults(func=run_discover)


def run_discover(args: argparse.Namespace) -> int:
    from vllm_conformance.launch import discover

    return discover.run(args)


# -- the command --------------------------------------------------------------------

#: Every subcommand's ``add_<name>`` function, in the order ``--help`` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_run,
    add_serve,
    add_plan,
    add_compare,
    add_report,
    add_discover,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-conformance", description="Tools around vllm-conformance runs."
    )
    sub = parser.add_subparsers(title="subcommands", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vllm-conformance`` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "pass_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
