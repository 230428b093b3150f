"""The ``gradcond`` command line: ``run``, ``repro list|run``, ``diagnose``.

Bad input prints one line ``gradcond: error: ...`` (what was wrong, what is accepted) and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .utils import UserError, set_quiet


def _cmd_run(args) -> int:
    from . import config, runner

    user = config.load_toml(args.config) if args.config else {}
    cfg = config.resolve(user, args.set)
    if args.config is None and not user and not any(s.split("=")[0].strip() == "name" for s in args.set or []):
        cfg = config.resolve(config.DEMO, args.set)
    report = runner.run(cfg, out=args.out, resume=args.resume)
    if not report.exists():  # stopped early (e.g. a stop_after callback): the run stays partial and resumable
        print(f"gradcond: run stopped before its last epoch; it is kept in {report.parent} - continue with --resume",
              file=sys.stderr)
        print(report.parent)
        return 0
    print(report)
    return 0


def _cmd_repro(args) -> int:
    from .experiments import load_all, markdown_table, run_experiment

    exps = load_all()
    if args.repro_cmd == "list":
        width = max(len(n) for n in exps) if exps else 0
        for name, exp in exps.items():
            print(f"{name:<{width}}  {exp.claim}")
        return 0
    if args.name not in exps:
        raise UserError(f"unknown reproduction {args.name!r}; accepted: {', '.join(exps)}.")
    rows, out = run_experiment(args.name, args.out, quick=args.quick)
    print(markdown_table(rows), end="")
    print(out / "result.md")
    return 0 if all(r.holds is not False for r in rows) else 1


def _cmd_diagnose(args) -> int:
    from .monitor.diagnose import diagnose_cli

    return diagnose_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradcond", description="See, and change, how gradients flow through deep networks.")
    p.add_argument("--version", action="version", version=f"gradcond {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="train a model from a TOML config into a run directory with a report",
                       description="Train a model described by a TOML config (built-in default: the demo) into "
                                   "OUT/<name>/ with config.toml, metrics.csv, events.jsonl, checkpoints/, report.html.")
    r.add_argument("config", nargs="?", help="TOML config file (default: the built-in demo config)")
    r.add_argument("--out", default="runs", help="parent directory of run directories (default: runs)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("repro", help="list or run reproductions of the sources' claims",
                        description="Reproductions of the sources' claims: each prints claim | source | ours | holds?")
    rsub = rp.add_subparsers(dest="repro_cmd", metavar="ACTION", required=True)
    rl = rsub.add_parser("list", help="list the registered reproductions", description="List the reproductions.")
    rl.set_defaults(func=_cmd_repro)
    rr = rsub.add_parser("run", help="run one reproduction",
                         description="Run one reproduction into OUT/NAME/ (result.json, result.md, figures). "
                                     "Exit code 0 when every checked claim holds, 1 when one does not, 2 on bad input.")
    rr.add_argument("name", help="reproduction name (see `gradcond repro list`)")
    rr.add_argument("--quick", action="store_true", help="a smaller version that finishes in minutes")
    rr.add_argument("--out", default="repro_out", help="output directory (default: repro_out)")
    rr.add_argument("--quiet", action="store_true", help="no progress bar")
    rr.set_defaults(func=_cmd_repro)

    d = sub.add_parser("diagnose", help="one-shot gradient-health analysis of a model at its current weights",
                       description="Analyse MODEL (a zoo name, or path/to/file.py:factory) on DATA: GSC profile, "
                                   "domain statistics, conditioning metrics, CoB analysis; writes report.html and "
                                   "report.json.")
    d.add_argument("model", help="zoo model name or path/to/file.py:factory")
    d.add_argument("--data", default="digits", help="dataset name (default: digits)")
    d.add_argument("--batches", type=int, default=2, help="number of batches to analyse (default: 2)")
    d.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    d.add_argument("--out", default="diagnose_out", help="output directory (default: diagnose_out)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="zoo model option, e.g. --set depth=8")
    d.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_diagnose)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    set_quiet(getattr(args, "quiet", False))
    from .data.files import DataFileError

    try:
        return args.func(args)
    except (UserError, DataFileError) as exc:
        print(f"gradcond: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradcond: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
