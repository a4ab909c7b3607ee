"""`thanora` console script: a thin argparse layer over `thanora.experiment`; no logic of its own.

Exit codes: 0 done; 2 a user error (bad config key or value, bad data file, missing model or asset, occupied output
folder, bad command line, NaN loss), printed as one line per problem that names the field or file and the fix, with
no traceback (``--debug`` shows it) and nothing changed on disk; 130 interrupted (Ctrl-C or SIGTERM: completed
stages are kept and ``--resume`` continues); 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad command line (argparse's complaint, made one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the subcommand's ``--help`` (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``thanora`` command."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            raise UsageError(f"unrecognised arguments {bad}; config overrides look like --a.b=value")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        return int(args.func(args, [e[2:] for e in extra]) or 0)
    except KeyboardInterrupt:
        print("interrupted; completed stages are saved, re-run with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not _is_user_error(err) or args.debug:
            raise
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: status "interrupted", resumable


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _is_user_error(err: Exception) -> bool:
    from thanora.assets import AssetMissingError
    from thanora.experiment.rundir import RunDirError
    from thanora.training.train import NonFiniteLossError

    # OSError: missing files and folders; transformers' loaders report unreadable model folders this way.
    return isinstance(err, ValueError | OSError | AssetMissingError | RunDirError | NonFiniteLossError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    parser = _Parser(prog="thanora", description="Multi-task, mergeable LoRA fine-tuning (ThanoRA).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kwargs: object) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kwargs)  # type: ignore[arg-type]

    sub.add_parser = add_parser  # type: ignore[method-assign]

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text + " Overrides: --a.b=value")
        p.add_argument("config", type=Path, help="YAML run config (see configs/)")
        p.add_argument("--output-dir", type=Path, required=True, help="run directory")
        return p

    p = with_config("run", "Run everything: data, base metrics, every method, plots, report.")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)

    p = with_config("train", "Prepare and train every method (checkpoints, history, adapters); no evaluation.")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="Write a trained method's PEFT adapter (and merged model) from its checkpoint.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--method", required=True, help="method label (default: its name) in the run's config")
    p.add_argument("--merged", action="store_true", help="also save a merged transformers model folder")
    p.set_defaults(func=_export)

    p = with_config("collect", "Calibration statistics and task-aware spectra of every task (cached on disk).")
    p.set_defaults(func=_collect)
    p = with_config("plan", "Rank plan from the cached spectra (no forward pass): rank_plan.json + summary.")
    p.set_defaults(func=_plan)

    p = sub.add_parser("eval", help="Evaluate the base model, or an exported adapter, on a config's tasks.")
    p.add_argument("config", type=Path)
    p.add_argument("--adapter", type=Path, help="PEFT adapter folder (from a run's <method>/adapter)")
    p.add_argument("--output", type=Path, help="write the metrics JSON here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an --output file that thanora eval wrote")
    p.set_defaults(func=_eval)

    p = sub.add_parser("merge", help="Merge an exported adapter into the original base; save a transformers folder.")
    p.add_argument("config", type=Path)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--output-dir", type=Path, required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="replace a merged-model folder that thanora wrote")
    p.set_defaults(func=_merge)

    p = sub.add_parser("plot", help="Re-render the figures and report.md of a run directory.")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_plot)

    p = sub.add_parser("assets", help="Install-check and convert the offline model and data (idempotent).")
    p.set_defaults(func=_assets)
    p = sub.add_parser("methods", help="List the methods: mergeable, task ids, trainable parameters, paper.")
    p.add_argument("--model", default="smollm2",
                   help="base model whose trainable parameter counts are shown (default: the offline SmolLM2; "
                        "'none' skips the counts); only its config is read, no weights are loaded")
    p.add_argument("--rank", type=int, default=64, help="rank at which to count (per head for multi-head methods)")
    p.set_defaults(func=_methods)
    return parser


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.config import load_config
    from thanora.experiment.pipeline import run

    cfg = load_config(args.config, overrides)
    run(cfg, args.output_dir, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
    print(f"run complete: {args.output_dir}/report.md")
    return 0


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.config import load_config
    from thanora.experiment.pipeline import run

    overrides = [*overrides, "output.evaluate_base=false", "output.evaluate=false"]
    run(load_config(args.config, overrides), args.output_dir, overwrite=args.overwrite, resume=args.resume,
        progress=not args.no_progress)
    print(f"trained: {args.output_dir}")
    return 0


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.stages import export_trained

    print(export_trained(args.run_dir, args.method, merged=args.merged))
    return 0


def _collect(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.config import load_config
    from thanora.experiment.stages import collect

    paths = collect(load_config(args.config, overrides), args.output_dir)
    print("\n".join(str(p) for p in paths))
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.config import load_config
    from thanora.experiment.stages import plan

    print(plan(load_config(args.config, overrides), args.output_dir).summary())
    return 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.artifacts import write_json
    from thanora.experiment.config import load_config
    from thanora.experiment.report import console_table
    from thanora.experiment.stages import check_metrics_output, evaluate_adapter

    cfg = load_config(args.config, overrides)
    if args.output:
        check_metrics_output(args.output, args.overwrite)
    metrics = evaluate_adapter(cfg, args.adapter)
    label = "adapter" if args.adapter else "base"
    print(console_table({label: metrics}))
    if args.output:
        write_json(args.output, {label: metrics})
    return 0


def _merge(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.config import load_config
    from thanora.experiment.stages import merge_adapter

    print(merge_adapter(load_config(args.config, overrides), args.adapter, args.output_dir, args.overwrite))
    return 0


def _plot(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.experiment.plots import plot_run
    from thanora.experiment.report import write_report
    from thanora.experiment.rundir import RunDirError, is_run_dir

    if not is_run_dir(args.run_dir):
        raise RunDirError(f"{args.run_dir} is not a thanora run folder (no run.json); give the --output-dir of a "
                          "thanora run")
    plot_run(args.run_dir)
    write_report(args.run_dir)
    print(f"{args.run_dir}/plots, {args.run_dir}/report.md")
    return 0


def _assets(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.assets import ensure_assets

    for name, path in ensure_assets().items():
        print(f"{name:<24} {path}")
    return 0


def _methods(args: argparse.Namespace, overrides: list[str]) -> int:
    from thanora.assets import AssetMissingError
    from thanora.experiment.models import meta_model
    from thanora.methods.registry import methods_table

    model = None
    if args.model != "none":
        try:
            model = meta_model(args.model)
        except (AssetMissingError, OSError, ValueError) as err:  # the table is still useful without the counts
            print(f"(no parameter counts: {err})", file=sys.stderr)
    rows = methods_table(model, args.rank)
    counts = model is not None
    head = f"{'method':<12} {'mergeable':<10} {'task id train/test':<19}"
    print(head + (f" {'params @ rank ' + str(args.rank):>17}" if counts else "") + "  paper")
    for row in rows:
        ids = f"{'yes' if row['task_id_train'] else 'no'}/{'yes' if row['task_id_test'] else 'no'}"
        line = f"{row['method']:<12} {'yes' if row['mergeable'] else 'no':<10} {ids:<19}"
        if counts:
            line += f" {row['params']:>17,}"
        print(f"{line}  {row['paper']}")
    if counts:
        print(f"\nparameter counts for {args.model} with each method's default settings and rank {args.rank} "
              "(per head for multi-head methods; see `thanora methods --help`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
