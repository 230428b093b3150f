"""The ``gradcond`` command line: ``run``, ``repro list|run|all``, ``diagnose``.

Exit codes: 0 success; 1 ``repro run``/``repro all``: an entry does not hold (a judged claim fails, a row is untestable
because a precondition is not met, or the entry judges nothing);
2 bad input or an unusable run directory (one line ``gradcond: error: ...`` saying what was wrong and what is
accepted; nothing half-written is left); 3 training diverged (the loss became NaN or infinite); 130 interrupted
(resumable with ``--resume``).
Warnings are printed as one line ``gradcond: warning: ...``.

``--device cpu|cuda|cuda:N|auto`` (``run``, ``diagnose``, ``repro run|all``; default cpu) is checked before any work:
CUDA on a machine without it is exit 2. Progress bars go to stderr only when it is a terminal (``--quiet``: none).
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings

from . import __version__
from .utils import EXIT_BAD_INPUT, EXIT_DIVERGED, TrainingDiverged, UserError, resolve_device, set_quiet

EXIT_CODES_HELP = ("exit codes: 0 done; 2 bad input, a run directory in use by another process, or a failed write "
                   "(one line 'gradcond: error: ...'); 3 training diverged (loss NaN/inf: lower the learning rate); "
                   "130 interrupted (continue with --resume).")


def _cmd_run(args) -> int:
    from . import config, runner

    user = config.load_toml(args.config) if args.config else {}
    sets = list(args.set or [])
    if args.seed is not None:  # exactly --set seed=N, applied after every --set
        sets.append(f"seed={args.seed}")
    cfg = config.resolve(user, sets)
    if args.config is None and not user and not any(s.split("=")[0].strip() == "name" for s in sets):
        cfg = config.resolve(config.DEMO, sets)
    report = runner.run(cfg, out=args.out, resume=args.resume, device=args.device, nproc=args.nproc)
    if not report.exists():  # stopped early (e.g. a stop_after callback): the run stays partial and resumable
        print(f"gradcond: run stopped before its last epoch; it is kept in {report.parent} - continue with --resume",
              file=sys.stderr)
        print(report.parent)
        return 0
    print(report)
    return 0


def _cmd_repro(args) -> int:
    from .experiments import registry

    exps = registry.load_all()
    if args.repro_cmd == "list":
        # verdict counts come from the last run found in --out (nothing is run to list)
        width = max(len(n) for n in exps) if exps else 0
        for name, exp in exps.items():
            last = registry.last_counts(name, args.out)
            if last:
                v = last["verdicts"]
                counts = (f"{v['yes']} yes, {v['no']} no, {v['untestable']} untestable, {v['reported']} reported "
                          f"({'quick' if last['quick'] else 'full'} run, {last['status']})")
            else:
                counts = "not run yet"
            print(f"{name:<{width}}  [{counts}]  {exp.claim}")
        return 0
    if args.repro_cmd == "all":
        outcomes, report = registry.run_all(args.out, quick=args.quick, device=args.device)
        for o in outcomes:
            print(f"{o.name}: {o.summary}")
        print(report)
        return 0 if all(o.holds for o in outcomes) else 1
    if args.name not in exps:
        raise UserError(f"unknown reproduction {args.name!r}; accepted: {', '.join(exps)}.")
    rows, out = registry.run_experiment(args.name, args.out, quick=args.quick, device=args.device)
    print(registry.markdown_table(rows), end="")
    print(registry.summary_line(rows))
    print(out / "result.md")
    return 0 if registry.entry_holds(rows) else 1


def _cmd_diagnose(args) -> int:
    from .diagnose import diagnose_cli

    return diagnose_cli(args)


QUIET_HELP = "no progress bars (they are drawn only on a terminal, for steps that last over a second)"


def _device_option(parser) -> None:
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where to compute: cpu (default), cuda, cuda:N, or auto (cuda when available, else cpu); "
                             "cuda on a machine without CUDA is an error (exit 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradcond", description="See, and change, how gradients flow through deep networks.")
    p.add_argument("--version", action="version", version=f"gradcond {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="train a model from a TOML config into a run directory with a report",
                       description="Train a model described by a TOML config (built-in default: the demo) into "
                                   "OUT/<name>/ with config.toml, metrics.csv, timings.csv, events.jsonl, checkpoints/, "
                                   "report.html. One process at a time writes a run; --resume accepts a changed "
                                   "train.epochs only.",
                       epilog=EXIT_CODES_HELP)
    r.add_argument("config", nargs="?", help="TOML config file (default: the built-in demo config)")
    r.add_argument("--out", default="runs", help="parent directory of run directories (default: runs)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint of the run (same config; only train.epochs may change)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    r.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the run (overrides the config's seed; the same as --set seed=N)")
    _device_option(r)
    r.add_argument("--nproc", default="1", metavar="N",
                   help="train with N local processes (PyTorch DDP: gloo on the CPU, NCCL with one GPU per rank; each "
                        "rank trains on 1/N of the data with data.batch_size per rank; rank 0 writes the run; "
                        "default 1; --resume needs 1)")
    r.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("repro", help="list or run reproductions of the sources' claims",
                        description="Reproductions of the sources' claims: each prints claim | source | paper | ours | "
                                    "criterion | tolerance | verdict. An entry holds when at least one row is judged "
                                    "and no judged row fails.")
    rsub = rp.add_subparsers(dest="repro_cmd", metavar="ACTION", required=True)
    rl = rsub.add_parser("list", help="list the registered reproductions",
                         description="List the reproductions, with the verdict counts (yes / no / untestable / "
                                     "reported) of the last run found in --out (nothing is run).")
    rl.add_argument("--out", default="runs/repro",
                    help="where to look for the last results (default: runs/repro, the default of `repro all`)")
    rl.set_defaults(func=_cmd_repro)
    rr = rsub.add_parser("run", help="run one reproduction",
                         description="Run one reproduction into OUT/NAME/ (result.json, result.md, figures). "
                                     "Exit code 0 when it holds, 1 when a judged claim does not hold, a row is "
                                     "untestable (a precondition is not met) or no row is judged, 2 on bad input "
                                     "(including an unwritable --out).")
    rr.add_argument("name", help="reproduction name (see `gradcond repro list`)")
    rr.add_argument("--quick", action="store_true", help="a smaller version that finishes in minutes")
    rr.add_argument("--out", default="repro_out", help="output directory (default: repro_out)")
    _device_option(rr)
    rr.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    rr.set_defaults(func=_cmd_repro)
    ra = rsub.add_parser("all", help="run every reproduction and write REPRODUCTION.md",
                         description="Run every reproduction into OUT/NAME/ and write OUT/REPRODUCTION.md (one table: "
                                     "entry | claim | source | paper value | ours | criterion | preconditions | "
                                     "verdict, the hold / fail / untestable counts and a summary line per "
                                     "entry). An entry that raises is recorded as failing and the others still run. "
                                     "Exit code 0 when every entry holds, 1 when one does not, 2 on bad input.")
    ra.add_argument("--quick", action="store_true", help="the smaller version of every entry (minutes each)")
    ra.add_argument("--out", default="runs/repro", help="output directory (default: runs/repro)")
    _device_option(ra)
    ra.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    ra.set_defaults(func=_cmd_repro)

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
    _device_option(d)
    d.add_argument("--quiet", action="store_true", help=QUIET_HELP)
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

    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        if getattr(args, "device", None) is not None:
            resolve_device(args.device)  # before any work: a missing CUDA is one line and exit 2
        return args.func(args)
    except (UserError, DataFileError) as exc:
        print(f"gradcond: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        print(f"gradcond: error: training diverged: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # not the disk or its permissions: a bug, keep the traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"gradcond: error: cannot write output: {exc.strerror}{where}; free space or pass a writable --out.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("gradcond: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


# a full or read-only disk, missing permissions: the environment, not gradcond (runs handle these themselves, with
# resume advice; this catches the other commands' figure and result writes)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"gradcond: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
