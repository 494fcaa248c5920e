"""The `rnp-fast` command line, derived from the config dataclasses (one flag per field).

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from rnp_fast import __version__
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, flag
from rnp_fast.errors import UserError

# Field type (as written in the dataclass) -> argparse keyword arguments.
TYPE_OPTIONS = {
    "int": {"type": int},
    "float": {"type": float},
    "str": {"type": str},
    "str | None": {"type": str},
    "float | None": {"type": float},
    "tuple[int, ...]": {"type": int, "nargs": "+"},
}


def add_config_flags(parser: argparse.ArgumentParser, cls, defaults: dict | None = None, skip=()) -> None:
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else None)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type == "bool":
            group.add_argument(
                f"--{flag(f.name)}",
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        else:
            group.add_argument(
                f"--{flag(f.name)}", dest=f.name, default=default, help=help_text, **TYPE_OPTIONS[f.type]
            )


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
    for cls in (ModelConfig, DataConfig, AttackConfig, RNPConfig, EngineConfig):
        add_config_flags(defend, cls, skip=("poison_rate", "poison_seed"))

    from rnp_fast.train import TrainConfig

    train = commands.add_parser("train-backdoor", help="train a backdoored model to defend")
    train.add_argument("--out", required=True, help="directory for model.safetensors, model.pth, summary.json")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    for cls in (ModelConfig, DataConfig, AttackConfig, TrainConfig):
        add_config_flags(train, cls, skip=("ratio", "holdout", "shuffle"))

    demo = commands.add_parser("demo", help="defend the bundled BadNets ResNet-18 on the digits set")
    demo.add_argument("--out", default="rnp-demo", help="run directory (default: rnp-demo)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    demo.add_argument("--mode", default="fast", choices=("fast", "reference"), help="engine mode (default: fast)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run_defend(args) -> dict:
    from rnp_fast.defend import DefendJob, run_defense

    job = DefendJob(
        model_path=args.model,
        out=args.out,
        mask_file=args.mask_file,
        unlearned_model=args.unlearned_model,
        model=config_from_args(ModelConfig, args),
        data=config_from_args(DataConfig, args),
        attack=config_from_args(AttackConfig, args),
        rnp=config_from_args(RNPConfig, args),
        engine=config_from_args(EngineConfig, args),
    )
    return run_defense(job)


def run_train(args) -> dict:
    from rnp_fast.train import TrainConfig, train_backdoor

    return train_backdoor(
        args.out,
        config_from_args(ModelConfig, args),
        config_from_args(DataConfig, args),
        config_from_args(AttackConfig, args),
        config_from_args(TrainConfig, args),
        args.device,
        args.quiet,
    )


def run_demo(args) -> dict:
    from rnp_fast.demo import run_demo as demo

    return demo(args.out, args.device, args.mode, args.quiet)


COMMANDS = {"defend": run_defend, "train-backdoor": run_train, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = COMMANDS[args.command](args)
    except UserError as error:
        print(f"rnp-fast: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("rnp-fast: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
