"""The `rnp-fast` command line, derived from the config dataclasses (one flag per field).

Exit codes: 0 success, 1 a sweep finished with failed jobs (or an operating-system error while
writing, one line), 2 bad input (one line on stderr, nothing written), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, handled as Ctrl-C is: one line, the staging folder removed).
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import threading
from dataclasses import MISSING, fields
from pathlib import Path

from rnp_fast import __version__
from rnp_fast.config import (
    MAX_PARALLEL,
    MAX_REPEATS,
    MAX_SEED,
    TRAIN_ENGINE_FIELDS,
    AttackConfig,
    BenchConfig,
    DataConfig,
    EngineConfig,
    Goal,
    ModelConfig,
    RNPConfig,
    SweepRunConfig,
    TrainConfig,
    flag,
    require,
    require_count,
)
from rnp_fast.errors import UserError, one_line
from rnp_fast.rule_power import check_known_dataset

REQUIRED = {"store"}  # fields whose flag must be given

# Field type (as written in the dataclass) -> argparse keyword arguments.
TYPE_OPTIONS = {
    "int": {"type": int},
    "float": {"type": float},
    "str": {"type": str},
    "str | None": {"type": str},
    "float | None": {"type": float},
    "int | None": {"type": int},
    "list[str]": {"type": str, "action": "append"},  # a repeatable flag
    "tuple[int, ...]": {"type": int, "nargs": "+"},
}


def add_config_flags(parser: argparse.ArgumentParser, cls, skip=(), only=None) -> None:
    """One flag per field of ``cls`` (all of them, or ``only`` these), help text from ``doc``."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or cls.__name__)
    for f in fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        if "default:" not in help_text:
            help_text += f" (default: {shown_default(f, default)})"
        options = {"dest": f.name, "default": default, "help": help_text}
        if f.name in REQUIRED:
            options.update(required=True, default=MISSING, help=f.metadata.get("help", ""))
            options.pop("default")
        names = [f"--{flag(f.name)}", *f.metadata.get("aliases", ())]
        if f.type in ("bool", "bool | None"):  # None: decided later (e.g. by the device)
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **options)
        else:
            group.add_argument(*names, **options, **TYPE_OPTIONS[f.type])


def shown_default(f, default) -> str:
    """A default as help shows it: "auto" where the run decides (a bool left to the device),
    "none" for an empty list or an unset value."""
    if default is None:
        return "auto" if f.type == "bool | None" else "none"
    return "none" if default == [] else str(default)


def config_from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**values)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rnp-fast", description="Reconstructive Neuron Pruning: remove backdoors from image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"rnp-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    defend = commands.add_parser("defend", help="defend a backdoored model (unlearn, recover, prune)")
    defend.add_argument("--model", required=True, help="backdoored checkpoint (.safetensors, .pt, .pth, .tar)")
    defend.add_argument("--out", required=True, help="run directory for results and the purified model")
    defend.add_argument("--mask-file", help="mask_values.txt to reuse: skips unlearning and recovering")
    defend.add_argument("--unlearned-model", help="an unlearned checkpoint to reuse: skips unlearning")
    add_repeat_flags(defend)
    for cls in (ModelConfig, DataConfig, AttackConfig, RNPConfig, EngineConfig):
        add_config_flags(defend, cls, skip=("poison_rate", "poison_seed", "poison"))

    train = commands.add_parser("train-backdoor", help="train a backdoored model to defend")
    train.add_argument("--out", required=True, help="directory for model.safetensors, model.pth, summary.json")
    for cls in (ModelConfig, DataConfig, AttackConfig, TrainConfig):
        add_config_flags(train, cls, skip=("ratio", "holdout", "shuffle"))
    add_config_flags(train, EngineConfig, only=TRAIN_ENGINE_FIELDS)

    demo = commands.add_parser("demo", help="defend the bundled BadNets ResNet-18 on the digits set")
    demo.add_argument("--out", default="rnp-demo", help="run directory (default: rnp-demo)")
    add_repeat_flags(demo, "0, 1, ..., N-1; seed 0 is the single demo's")
    add_config_flags(demo, EngineConfig)

    convert = commands.add_parser("convert", help="write a dataset split to an FFCV .beton file (the ffcv extra)")
    convert.add_argument("source", metavar="SOURCE", help="dataset name, as --dataset takes it")
    convert.add_argument("out", metavar="OUT.beton", help="the .beton file to write")
    convert.add_argument("--split", default="train", choices=("train", "test"), help="split to write (default: train)")
    convert.add_argument("--data-dir", help="the dataset's directory, as for train-backdoor")
    convert.add_argument("--image-size", type=int, help="resize the directory datasets to this side (pixels)")
    convert.add_argument("--quiet", action="store_true", help="no progress output")
    add_sweep_commands(commands)
    add_bench_command(commands)
    return parser


def add_repeat_flags(parser, first_seed: str = "--seed, --seed + 1, ...") -> None:
    """--repeats: the defense on N defense-data seeds in one process, with a success rate (rnp_fast.repeats)."""
    group = parser.add_argument_group("repeats and the verdict")
    group.add_argument(
        "--repeats",
        type=int,
        default=1,
        help=f"defend on N defense-data seeds ({first_seed}) and report the success rate, per seed "
        "and in aggregate: summary.json, seeds.csv, tradeoff.png; no purified model (default: 1, one defense)",
    )
    group.add_argument(
        "--repeat-over",
        choices=("data", "order"),
        default="data",
        help="what the repeats' seeds vary: data (which images form the defense set, their order and "
        "augmentation) or order (the same images as one defense, only their order and augmentation) "
        "(default: data)",
    )
    group.add_argument(
        "--jobs-per-device",
        type=int,
        help="seeds defended at once, each in a worker process with one torch thread (default: on a CPU one "
        "per core available to this process, fewer if memory is short; on a GPU 1); 1: one after another "
        "in this process, with its torch threads",
    )
    group.add_argument(
        "--success-asr",
        type=float,
        default=Goal.max_asr,
        help=f"the verdict's largest ASR after the defense, in [0, 1] (default: {Goal.max_asr})",
    )
    group.add_argument(
        "--success-clean-drop",
        type=float,
        default=Goal.max_clean_drop,
        help=f"the verdict's largest drop of full-test clean accuracy, >= 0 (default: {Goal.max_clean_drop})",
    )


def check_repeat_flags(args) -> None:
    """--repeats, before anything is built from it (its list of seeds) and before torch is imported."""
    require_count(args.repeats, "repeats", 1, MAX_REPEATS)
    last_seed = (getattr(args, "seed", None) or 0) + args.repeats - 1
    require(last_seed <= MAX_SEED, f"--seed + --repeats - 1 must be <= {MAX_SEED} (the largest seed), got {last_seed}")
    if getattr(args, "jobs_per_device", None) is not None:
        require_count(args.jobs_per_device, "jobs-per-device", 1, MAX_PARALLEL)
    if args.repeats > 1 and getattr(args, "mask_file", None):
        raise UserError(
            "--repeats with --mask-file: the masks are fixed, so the repeats would vary only which images are held "
            "out to choose the threshold; drop --mask-file to repeat the whole defense (or run single defenses)"
        )


def repeated(job, args) -> dict | None:
    """The repeated defense when --repeats > 1 (None: run the single defense)."""
    if args.repeats == 1:
        return None
    from rnp_fast.repeats import format_seed_table, headline, run_repeats

    seeds = list(range(job.data.seed, job.data.seed + args.repeats))
    result = run_repeats(job, seeds, job.goal, args.repeat_over, args.jobs_per_device)  # None: one per core
    if job.engine.quiet:  # else the run's log has just shown both on the terminal
        print(format_seed_table(result), file=sys.stderr)
        print(headline(result), file=sys.stderr)
    return result


def add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="time the reference mode and the fast mode on identical work")
    bench.add_argument("--out", help="also save the result as JSON here (e.g. benchmarks/results/bench_cpu.json)")
    add_config_flags(bench, BenchConfig)


def add_sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="run (or resume) a grid of train + defend jobs from a YAML file")
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (see README, Sweeps)")
    add_config_flags(sweep, SweepRunConfig)

    report = commands.add_parser("report", help="table (Markdown, CSV) and plots of a sweep's finished jobs")
    report.add_argument("store", metavar="STORE", help="the sweep's --store directory")
    report.add_argument("--out", help="directory for the report (default: STORE/report)")


def refuse_output_early(out, kind: str, *reads, owned=None) -> None:
    """Refuse an output path before torch is imported (seconds on a loaded machine), with the
    inputs named on the command line; the command checks it again, with all it reads, before work."""
    from rnp_fast.outputs import vet_output

    vet_output(out, reads, flag="--store" if kind == "sweep store" else "--out", owned=owned, kind=kind)


def attack_param_values(args) -> list[str]:
    """--attack-param VALUEs: those naming files are inputs an output must not hold."""
    return [item.partition("=")[2] for item in getattr(args, "attack_param", None) or []]


def run_defend(args) -> dict:
    check_repeat_flags(args)
    reads = (args.model, args.mask_file, args.unlearned_model, args.data_dir, *attack_param_values(args))
    refuse_output_early(args.out, "defense run", *reads)
    data, rnp, goal = config_from_args(DataConfig, args), config_from_args(RNPConfig, args), success_goal(args)
    check_known_dataset(data, rnp)  # before torch is imported, as the output (the defense checks again)
    from rnp_fast.defense import DefendJob, run_defense

    job = DefendJob(
        model_path=args.model,
        out=args.out,
        mask_file=args.mask_file,
        unlearned_model=args.unlearned_model,
        model=config_from_args(ModelConfig, args),
        data=data,
        attack=config_from_args(AttackConfig, args),
        rnp=rnp,
        engine=config_from_args(EngineConfig, args),
        goal=goal,
    )
    result = repeated(job, args)
    return run_defense(job) if result is None else result


def success_goal(args) -> Goal:
    """--success-asr and --success-clean-drop, checked (one line, exit 2) before any work."""
    return Goal(args.success_asr, args.success_clean_drop)


def run_train(args) -> dict:
    refuse_output_early(args.out, "trained model", args.data_dir, args.train_beton, *attack_param_values(args))
    from rnp_fast.train import train_backdoor

    return train_backdoor(
        args.out,
        config_from_args(ModelConfig, args),
        config_from_args(DataConfig, args),
        config_from_args(AttackConfig, args),
        config_from_args(TrainConfig, args),
        config_from_args(EngineConfig, args),
    )


def run_convert(args) -> dict:
    from rnp_fast.convert import convert

    return convert(args.source, args.out, args.split, args.data_dir, args.image_size, quiet=args.quiet)


def run_demo(args) -> dict:
    check_repeat_flags(args)
    refuse_output_early(args.out, "defense run")
    goal = success_goal(args)
    from rnp_fast.demo import demo_job
    from rnp_fast.demo import run_demo as demo

    engine = config_from_args(EngineConfig, args)
    result = repeated(demo_job(args.out, engine, goal), args)
    return demo(args.out, engine, goal) if result is None else result


def run_sweep_command(args) -> dict:
    from rnp_fast.sweep.store import DATABASE, check_database, is_old_store
    from rnp_fast.sweep.sweep_file import read_yaml

    refuse_output_early(args.store, "sweep store", args.sweep_file, owned=is_old_store)
    check_database(Path(args.store).expanduser() / DATABASE)
    read_yaml(Path(args.sweep_file))  # aliases, deep nesting, a huge file: refused before torch is imported
    from rnp_fast.sweep.runner import run_sweep

    return run_sweep(args.sweep_file, config_from_args(SweepRunConfig, args))


def run_report(args) -> dict:
    from rnp_fast.sweep.report import write_report

    return write_report(args.store, args.out)


def run_bench_command(args) -> None:
    """Prints the table (and saves the JSON with --out) instead of a summary."""
    from rnp_fast.bench import format_table, run_bench, save_result
    from rnp_fast.outputs import BENCH_RESULT, vet_json_result

    if args.out is not None:  # checked before the benchmark, not after it
        vet_json_result(args.out, BENCH_RESULT)
    result = run_bench(config_from_args(BenchConfig, args), progress=lambda line: print(line, file=sys.stderr))
    print(format_table(result))
    if args.out is not None:
        print(f"saved {save_result(result, args.out)}", file=sys.stderr)


COMMANDS = {
    "bench": run_bench_command,
    "defend": run_defend,
    "train-backdoor": run_train,
    "demo": run_demo,
    "convert": run_convert,
    "sweep": run_sweep_command,
    "report": run_report,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C's KeyboardInterrupt is: every ``finally`` and
    ``with`` on the way out runs (the staging folder is removed, a sweep's running jobs requeued)."""


def raise_terminated(signum, frame):
    raise Terminated()


def describe_system_error(error: Exception) -> str:
    """An operating-system or SQLite error as the user reads it: the path and the reason."""
    if isinstance(error, OSError) and error.filename:
        return f"cannot write {error.filename}: {error.strerror or type(error).__name__}"
    if isinstance(error, sqlite3.Error):
        return f"the sweep's results store: {error}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        summary = COMMANDS[args.command](args)
    except UserError as error:
        print(f"rnp-fast: error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except (OSError, sqlite3.Error) as error:  # outside a run folder (a sweep's log or store): exit 1
        print(f"rnp-fast: error: {one_line(describe_system_error(error))}", file=sys.stderr)
        return 1
    except Terminated:
        print("rnp-fast: terminated (SIGTERM); nothing was replaced", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("rnp-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if summary is not None:
        from rnp_fast.outputs import json_text

        print(json_text(summary), end="")
    if args.command == "sweep" and summary.get("failed"):
        return 1  # scripts must notice: the summary and sweep.log say which jobs failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
