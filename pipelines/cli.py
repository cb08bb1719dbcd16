"""The ``unsafechain`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from unsafechain.services.core.logs import configure_logging

logger = logging.getLogger(__name__)


def _build(args: argparse.Namespace) -> int:
    from unsafechain.pipelines.build.build import BuildError, run_build
    from unsafechain.pipelines.build.config import ConfigError, load_config
    from unsafechain.pipelines.build.sources import SourceError

    overrides = {"build.output": args.output} if args.output else {}
    try:
        config = load_config(args.config, overrides)
        result = run_build(config, progress=not args.no_progress)
    except (ConfigError, SourceError, BuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = result.manifest["counts"]
    print(f"dataset written to {result.output}")
    print(json.dumps(counts, indent=2))
    return 0


def _standins(args: argparse.Namespace) -> int:
    from unsafechain.pipelines.demo.standins import build_standin_models

    models = build_standin_models(Path(args.out), seed=args.seed)
    for role in ("generator", "judge", "corrector"):
        print(f"{role}: {getattr(models, role)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="unsafechain",
        description="Build correction-based safety-alignment datasets for reasoning models.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="run a dataset build in this process",
        description="Generate K completions per prompt, judge them, correct the hard cases "
        "and write the dataset. Run again on the same output to resume.",
    )
    build.add_argument("--config", required=True, type=Path, help="build configuration (YAML)")
    build.add_argument("--output", help="output folder; overrides build.output in the config")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(handler=_build)

    standins = commands.add_parser(
        "standins",
        help="create the tiny stand-in models the demo and tests use",
        description="Train tiny generator, judge and corrector models on the spot (seconds "
        "on a CPU). They stand in for real models where none can be downloaded.",
    )
    standins.add_argument("--out", required=True, help="folder for the three models")
    standins.add_argument("--seed", type=int, default=0, help="training seed")
    standins.set_defaults(handler=_standins)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
