"""The ``unsafechain`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from unsafechain.runtime.logs import configure_logging
from unsafechain.runtime.settings import add_client_arguments

if TYPE_CHECKING:
    from unsafechain.dataset.config import BuildConfig

SERVICE_NAMES = ("generation", "judge", "correction", "training")


def _service_part(service: str, part: str) -> ModuleType:
    """``unsafechain.<service>.<part>``: only the served stage's modules are imported, so
    a judge process loads no generator."""
    return importlib.import_module(f"unsafechain.{service}.{part}")


logger = logging.getLogger(__name__)


def _build(args: argparse.Namespace) -> int:
    from unsafechain.dataset.checks import local_problems
    from unsafechain.dataset.config import ConfigError, load_config
    from unsafechain.dataset.pipeline import BuildError, ResumeOptions, run_build
    from unsafechain.domain.settings import SetupError
    from unsafechain.intake.sources import SourceError

    overrides: dict[str, object] = {"build.output": args.output} if args.output else {}
    try:
        config = load_config(args.config, overrides | _kafka_overrides(args) | _set_values(args))
        if args.limit:
            config = _limited(config, args.limit)
        if args.dry_run:
            from unsafechain.dataset.plan import Assumptions, plan_build

            assumptions = Assumptions(
                unsafe_rate=args.unsafe_rate,
                tokens_per_second=args.tokens_per_second,
                judge_seconds=args.judge_seconds,
            )
            print(plan_build(config, assumptions).describe())
            return 0
        problems = local_problems(config)
        if problems:
            raise SetupError("; ".join(problems))
        resume = ResumeOptions(retry_failed=args.retry_failed, repair=args.repair)
        if args.bus == "kafka":
            from unsafechain.dataset.kafka import run_kafka_build
            from unsafechain.streaming.kafka import require_broker

            require_broker(config.kafka)
            result = run_kafka_build(
                config, progress=not args.no_progress, resume=resume, republish=args.republish
            )
        else:
            result = run_build(config, progress=not args.no_progress, resume=resume)
    except (ConfigError, SourceError, BuildError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = result.manifest["counts"]
    print(f"dataset written to {result.output}")
    print(json.dumps(counts, indent=2))
    if result.announcement:
        print(f"announced on {result.announcement.topic} (event {result.announcement.event_id})")
    if args.bus == "kafka":
        letters = result.manifest["dead_letters"]
        print(
            f"dead letters: {counts['dead_lettered']} "
            f"(by stage {letters['by_stage']}, undecodable {letters['undecodable']})"
        )
    problem = build_outcome_problem(counts)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def build_outcome_problem(counts: dict[str, int]) -> str | None:
    """Why a finished build is no dataset to use, or None: most verdicts are ERROR (the
    judge was not reached), or no row was written at all."""
    judged = counts["judged_safe"] + counts["judged_unsafe"] + counts["judged_error"]
    if judged and counts["judged_error"] * 2 > judged:
        return (
            f"{counts['judged_error']} of {judged} verdicts are ERROR: the judge calls failed "
            "(is the judge reachable? the reasons are in failed.jsonl); once it is, run again "
            "with --retry-failed"
        )
    if counts["cases"] and not counts["written"]:
        return (
            f"no row written: {counts['failed']} of {counts['cases']} cases failed "
            "(the reasons are in failed.jsonl)"
        )
    return None


INTERRUPTED_EXIT_STATUS = 130
"""The exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _limited(config: BuildConfig, limit: int) -> BuildConfig:
    """The build with at most ``limit`` prompts read from each source (its first valid
    ones, in file order: the same prompts every time), for a quick try."""
    sources = [
        source.model_copy(update={"limit": min(limit, source.limit or limit)})
        for source in config.sources
    ]
    return config.model_copy(update={"sources": sources})


STOPPED_EXIT_STATUS = 3
"""``unsafechain train``'s exit status when SIGTERM or SIGINT stopped the run at a checkpoint."""


def _train(args: argparse.Namespace) -> int:
    if getattr(args, "address", None):
        return _train_remotely(args)
    import datasets
    import transformers
    from tqdm.contrib.logging import logging_redirect_tqdm

    from unsafechain.domain.settings import ConfigError, SetupError
    from unsafechain.training.engine import TrainingError, run_training
    from unsafechain.training.plan import plan_training
    from unsafechain.training.settings import load_training_settings, training_settings_from_text

    reporter = _reporter(args.report_to)
    on_metrics = (lambda entry: reporter.report("metrics", **entry)) if reporter else None
    overrides: dict[str, object] = {"output.dir": args.output} if args.output else {}
    try:
        overrides |= _set_values(args)
        if args.config_json is not None:
            settings = training_settings_from_text(
                args.config_json, overrides, where="--config-json"
            )
        else:
            settings = load_training_settings(args.config, overrides)
        if args.dry_run:
            print(plan_training(settings).describe())
            return 0
        if reporter:
            reporter.report("started", pid=os.getpid(), settings_fingerprint=settings.fingerprint())
        if args.no_progress:
            # Quiet the libraries' own bars too (tokenizing, packing, saving shards).
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        with _stop_on_signals() as stop_requested, logging_redirect_tqdm():
            result = run_training(
                settings,
                progress=not args.no_progress,
                should_stop=stop_requested,
                on_metrics=on_metrics,
            )
    except (ConfigError, SetupError) as error:
        # SetupError covers the dataset's refusals and the chat template's checks too.
        if reporter:
            reporter.report("failed", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        if reporter:
            reporter.report("failed", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 1
    if reporter:
        reporter.report(
            "finished",
            state=result.state,
            run_id=result.run_id,
            step=result.global_step,
            max_steps=result.max_steps,
            final_loss=result.final_loss,
            outputs=result.record["outputs"] if result.state == "succeeded" else {},
        )
    if result.state == "cancelled":
        print(
            f"stopped at step {result.global_step}/{result.max_steps} with a checkpoint in "
            f"{result.output_dir}; run the same command to resume"
        )
        return STOPPED_EXIT_STATUS
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "not logged"
    print(f"run {result.run_id} finished: {result.global_step} steps, final loss {loss}")
    for name, path in result.record["outputs"].items():
        print(f"{name}: {result.output_dir / path}")
    print(f"record: {result.output_dir / 'run.json'}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """``unsafechain check``: every problem of a build configuration on this machine,
    all of them, before anything is loaded."""
    from unsafechain.dataset.checks import local_problems, reachability_problems
    from unsafechain.dataset.config import ConfigError, load_config

    try:
        config = load_config(args.config, _kafka_overrides(args) | _set_values(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problems = local_problems(config)
    if not args.offline:
        problems += reachability_problems(config, kafka=args.bus == "kafka")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    checked = "files, models, keys" + ("" if args.offline else ", endpoints, services")
    if args.bus == "kafka" and not args.offline:
        checked += ", the broker"
    print(f"{args.config}: ready (checked {checked})")
    return 0


def _reporter(target: str | None):
    """The reporter ``--report-to`` asks for: ``-`` is stdout, anything else a file
    appended to."""
    if target is None:
        return None
    from unsafechain.training.reporting import RunReporter

    if target == "-":
        return RunReporter(sys.stdout)
    return RunReporter(open(target, "a", encoding="utf-8"))


def _train_remotely(args: argparse.Namespace) -> int:
    """``train --server``: submit the run configuration to the training service and
    follow the run until it ends (``--detach``: print its id and return)."""
    from unsafechain.backends.base import BackendError
    from unsafechain.domain.settings import ConfigError, text_for_service
    from unsafechain.runtime.settings import SettingsError, client_settings
    from unsafechain.training.client import RemoteTrainingClient, state_name
    from unsafechain.training.settings import TrainingSettings
    from unsafechain.v1 import training_pb2

    if args.dry_run:
        print("error: --dry-run plans a run here; drop --server", file=sys.stderr)
        return 2
    try:
        settings = client_settings(args)
        if args.config_json is not None:
            text = args.config_json
        elif str(args.config) == "-":
            text = _read_text(None, "-", "run configuration")
        else:
            # The service has no folder for the file: its paths go from the working directory.
            text = text_for_service(Path(args.config), TrainingSettings)
    except (SettingsError, ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    executors = {
        "local": training_pb2.TRAINING_EXECUTOR_LOCAL,
        "kubernetes": training_pb2.TRAINING_EXECUTOR_KUBERNETES,
    }
    spec = training_pb2.TrainingSpec(
        config=text,
        output_uri=args.output or "",
        executor=executors.get(args.executor, training_pb2.TRAINING_EXECUTOR_UNSPECIFIED),
    )

    async def submit_and_follow() -> int:
        async with RemoteTrainingClient(settings) as client:
            run, created = await client.submit(spec, args.request_id)
            where = run.executor_ref or training_pb2.TrainingExecutor.Name(run.spec.executor)
            print(
                f"run {run.id} {'submitted' if created else 'was submitted before'} "
                f"({state_name(run.state)}, {where}); output {run.spec.output_uri}",
                flush=True,
            )
            if args.detach:
                return 0
            state, step = None, -1
            async for run in client.watch(run.id):  # noqa: B020 - the run, as it moves
                if run.state != state:
                    state = run.state
                    detail = f": {run.message}" if run.message else ""
                    print(f"{state_name(state)}{detail}", flush=True)
                if run.step != step and "loss" in run.metrics:
                    step = run.step
                    metrics = " ".join(
                        f"{key} {run.metrics[key]:.4g}"
                        for key in ("loss", "learning_rate", "tokens_per_second")
                        if key in run.metrics
                    )
                    print(f"step {run.step}/{run.max_steps} {metrics}", flush=True)
            exits = {
                training_pb2.TRAINING_RUN_STATE_SUCCEEDED: 0,
                training_pb2.TRAINING_RUN_STATE_CANCELLED: STOPPED_EXIT_STATUS,
            }
            return exits.get(run.state, 1)

    try:
        return asyncio.run(submit_and_follow())
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if "INVALID_ARGUMENT" in str(error) else 1
    except KeyboardInterrupt:
        print("stopped following; the run goes on (unsafechain runs cancel RUN --server …)")
        return INTERRUPTED_EXIT_STATUS


def _runs(args: argparse.Namespace) -> int:
    """``unsafechain runs list|cancel``: the training service's runs."""
    from unsafechain.backends.base import BackendError
    from unsafechain.runtime.settings import SettingsError, client_settings
    from unsafechain.training.client import RemoteTrainingClient, state_name

    try:
        settings = client_settings(args)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    async def ask() -> list:
        async with RemoteTrainingClient(settings) as client:
            if args.runs_command == "cancel":
                return [await client.cancel(args.run_id)]
            return await client.list()

    try:
        runs = asyncio.run(ask())
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for run in runs:
        loss = f" loss {run.metrics['loss']:.4g}" if "loss" in run.metrics else ""
        print(
            f"{run.id}  {state_name(run.state):9}  step {run.step}/{run.max_steps}{loss}  "
            f"{run.executor_ref or '-'}  {run.message}".rstrip()
        )
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM and SIGINT ask the run to stop at its next step, with a checkpoint; a
    second SIGINT interrupts at once."""
    requested = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and requested.is_set():
            raise KeyboardInterrupt
        logger.warning("%s: stopping at the next step", signal.Signals(signum).name)
        requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _eval(args: argparse.Namespace) -> int:
    from unsafechain.evaluation.benchmarks import BenchmarkError
    from unsafechain.evaluation.config import ConfigError, load_eval_config
    from unsafechain.evaluation.pipeline import EvalError, plan_evaluation, run_evaluation

    overrides: dict[str, object] = {"eval.output": args.output} if args.output else {}
    overrides |= _kafka_overrides(args)
    try:
        config = load_eval_config(args.config, overrides | _set_values(args))
        if args.dry_run:
            print(plan_evaluation(config, dry_run=True).describe())
            return 0
        if args.bus == "kafka":
            from unsafechain.evaluation.kafka import run_kafka_evaluation
            from unsafechain.streaming.kafka import require_broker

            require_broker(config.kafka)
            result = run_kafka_evaluation(config, progress=not args.no_progress)
        else:
            result = run_evaluation(config, progress=not args.no_progress)
    except (ConfigError, EvalError, BenchmarkError, ValueError) as error:
        # ValueError: a model setting the backend rejects (an adapter it cannot apply).
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"evaluation written to {result.output}")
    for model, benchmarks in result.results["results"].items():
        figures = []
        for name, entry in benchmarks.items():
            figure = entry["figures"][entry["headline"]]
            figures.append(f"{name} {entry['headline']} {100 * figure['value']:.1f}%")
        print(f"  {model}: " + ", ".join(figures))
    for name in ("markdown", "html"):
        if name in result.files:
            print(f"{name}: {result.files[name]}")
    print(f"results: {result.files['results']}")
    return 0


def _kafka_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if getattr(args, "bootstrap", None):
        overrides["kafka.bootstrap_servers"] = args.bootstrap.split(",")
    if getattr(args, "topic_prefix", None):
        overrides["kafka.topic_prefix"] = args.topic_prefix
    if getattr(args, "idle_timeout", None):
        overrides["kafka.idle_timeout_seconds"] = args.idle_timeout
    return overrides


def _set_values(args: argparse.Namespace) -> dict[str, object]:
    """``--set KEY=VALUE`` as overrides: each value read as YAML (``8``, ``true``,
    ``[a, b]``), checked with the rest of the configuration.

    Raises:
        ConfigError: An item is not KEY=VALUE, or its value is not YAML.
    """
    import yaml

    from unsafechain.domain.settings import ConfigError

    values: dict[str, object] = {}
    for item in getattr(args, "set", None) or ():
        key, sign, text = item.partition("=")
        if not sign or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. build.concurrency=8")
        try:
            values[key.strip()] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item}: the value is not YAML ({error})") from None
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="set a configuration key (dotted, a list item by its index: build.concurrency=8, "
        "sources.0.limit=10), checked like the file; repeatable, wins over the file",
    )


def _add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap",
        help="Kafka brokers, host:port[,host:port…]; overrides kafka.bootstrap_servers",
    )
    parser.add_argument("--topic-prefix", help="overrides kafka.topic_prefix")


def _topics_create(args: argparse.Namespace) -> int:
    from unsafechain.dataset.config import ConfigError, load_config
    from unsafechain.dataset.kafka import create_build_topics
    from unsafechain.domain.settings import SetupError
    from unsafechain.streaming.kafka import require_broker

    try:
        config = load_config(args.config, _kafka_overrides(args) | _set_values(args))
        settings = config.kafka
        require_broker(settings)
        if args.partitions:
            settings = settings.model_copy(update={"partitions": args.partitions})
        for name in create_build_topics(settings, config.events):
            print(f"created {name}")
    except (ConfigError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _worker(args: argparse.Namespace) -> int:
    from unsafechain.dataset.config import ConfigError, load_config
    from unsafechain.dataset.kafka import run_worker
    from unsafechain.domain.settings import SetupError
    from unsafechain.streaming.kafka import require_broker

    if args.stage == "train":
        return _follow_datasets(args)
    if args.stage.startswith("eval-"):
        return _eval_worker(args)
    try:
        config = load_config(args.config, _kafka_overrides(args) | _set_values(args))
        require_broker(config.kafka)
        run_worker(config, args.stage, metrics_port=args.metrics_port)
    except (ConfigError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _eval_worker(args: argparse.Namespace) -> int:
    from unsafechain.domain.settings import SetupError
    from unsafechain.evaluation.benchmarks import BenchmarkError
    from unsafechain.evaluation.config import ConfigError, load_eval_config
    from unsafechain.evaluation.kafka import run_eval_worker
    from unsafechain.evaluation.pipeline import EvalError
    from unsafechain.streaming.kafka import require_broker

    try:
        config = load_eval_config(args.config, _kafka_overrides(args) | _set_values(args))
        require_broker(config.kafka)
        run_eval_worker(
            config, args.stage, candidate=args.candidate, metrics_port=args.metrics_port
        )
    except (ConfigError, EvalError, BenchmarkError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _follow_datasets(args: argparse.Namespace) -> int:
    from unsafechain.domain.settings import ConfigError, SetupError
    from unsafechain.runtime.settings import SettingsError
    from unsafechain.streaming.kafka import Unrecoverable, require_broker
    from unsafechain.triggers.training import follow_datasets, load_follow_config

    try:
        settings, template = load_follow_config(args.config, _kafka_overrides(args))
        require_broker(settings.kafka)
        follow_datasets(settings, template, metrics_port=args.metrics_port)
    except (ConfigError, SettingsError, SetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Unrecoverable as error:
        print(f"error: {error}; the event is redelivered when a worker runs again", file=sys.stderr)
        return 1
    return 0


def _standins(args: argparse.Namespace) -> int:
    from unsafechain.demo.standins import build_standin_models

    models = build_standin_models(Path(args.out), seed=args.seed)
    for role in ("generator", "judge", "corrector"):
        print(f"{role}: {getattr(models, role)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from unsafechain.runtime.server import run_service
    from unsafechain.runtime.settings import SettingsError, settings_from_args

    try:
        settings = settings_from_args(_service_part(args.service, "settings").SETTINGS, args)
        return run_service(settings, _service_part(args.service, "servicer").create_servicer)
    except (SettingsError, ValueError) as error:
        # ValueError: a model setting the backend rejects, e.g. an unset API key variable.
        print(f"error: {error}", file=sys.stderr)
        return 2


def _read_text(text: str | None, path: str | None, what: str) -> str:
    if text is not None:
        return text
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")  # type: ignore[arg-type]
    except OSError as error:
        raise ValueError(f"cannot read the {what} from {path}: {error.strerror}") from None


def _judge(args: argparse.Namespace) -> int:
    from unsafechain.backends.base import BackendError
    from unsafechain.domain.types import JudgeTarget
    from unsafechain.judge.client import RemoteJudgeEngine
    from unsafechain.runtime.settings import SettingsError, client_settings

    try:
        settings = client_settings(args)
        prompt = _read_text(args.prompt, args.prompt_file, "prompt")
        response = _read_text(args.response, args.response_file, "response")
    except (SettingsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    targets = [JudgeTarget(target) for target in args.target or ()]

    async def ask():
        async with RemoteJudgeEngine(settings) as engine:
            return await engine.judge(prompt, response, targets=targets)

    try:
        judgment = asyncio.run(ask())
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    verdicts = [
        {
            "judge": verdict.judge.name,
            "target": verdict.target.value,
            "label": verdict.label.value,
            "categories": list(verdict.categories),
            "score": verdict.score,
            "error": verdict.error,
        }
        for verdict in judgment.verdicts
    ]
    if args.json:
        summary = {
            "label": judgment.label.value,
            "categories": list(judgment.categories),
            "verdicts": verdicts,
        }
        print(json.dumps(summary, indent=2))
        return 0
    categories = f" ({', '.join(judgment.categories)})" if judgment.categories else ""
    print(f"{judgment.label.value}{categories}")
    for verdict in verdicts:
        detail = ",".join(verdict["categories"]) or verdict["error"]
        score = f" score={verdict['score']:.3f}" if verdict["score"] is not None else ""
        print(f"  {verdict['judge']} [{verdict['target']}]: {verdict['label']}{score} {detail}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unsafechain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_global_arguments(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name: the main parser holds
    the defaults, each command's parser the same options without one, so a value given
    after the command is not overwritten by the main parser's default."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--log-level", default=default("INFO"), help="DEBUG, INFO, WARNING or ERROR"
    )
    parser.add_argument(
        "--log-json", action="store_true", default=default(False),
        help="log one JSON object per line",
    )  # fmt: skip
    parser.add_argument(
        "--no-progress", action="store_true", default=default(False),
        help="hide the progress bars",
    )  # fmt: skip
    parser.add_argument(
        "--verbose", action="store_true", default=default(False),
        help="show the libraries' own progress bars, warnings and log records too",
    )  # fmt: skip


class _Commands:
    """A subparsers action whose every parser takes the global options."""

    def __init__(self, action: argparse._SubParsersAction):
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        _add_global_arguments(parser, defaults=False)
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="unsafechain",
        description="Build correction-based safety-alignment datasets for reasoning models.",
    )
    parser.add_argument("--version", action="version", version=f"unsafechain {_version()}")
    _add_global_arguments(parser, defaults=True)
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    build = commands.add_parser(
        "build",
        help="run a dataset build in this process",
        description="Generate K completions per prompt, judge them, correct the hard cases "
        "and write the dataset. Run again on the same output to resume.",
    )
    build.add_argument("--config", required=True, type=Path, help="build configuration (YAML)")
    build.add_argument("--output", help="output folder; overrides build.output in the config")
    _add_set_argument(build)
    build.add_argument(
        "--limit",
        type=_positive,
        metavar="N",
        help="read at most N prompts from each source (the first valid ones, so the same "
        "every time): a quick try of a configuration",
    )
    plan = build.add_argument_group(
        "dry run",
        "print what the build will do (prompts after screening, calls, a rough "
        "time) and exit; no model loads, nothing is written",
    )
    plan.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    plan.add_argument(
        "--unsafe-rate", type=float, default=0.4, metavar="P",
        help="share of completions judged unsafe, for the expected corrections (default 0.4)",
    )  # fmt: skip
    plan.add_argument(
        "--tokens-per-second", type=float, default=40.0, metavar="N",
        help="decoding speed of one sequence, for the rough time (default 40)",
    )  # fmt: skip
    plan.add_argument(
        "--judge-seconds", type=float, default=0.5, metavar="S",
        help="seconds per judge call, for the rough time (default 0.5)",
    )  # fmt: skip
    build.add_argument(
        "--bus",
        choices=["embedded", "kafka"],
        default="embedded",
        help="embedded: every stage in this process; kafka: publish the prompts and store "
        "what `unsafechain worker` processes deliver",
    )
    _add_kafka_arguments(build)
    build.add_argument(
        "--retry-failed",
        action="store_true",
        help="recompute the cases an earlier run kept as failed for a transient reason (a "
        "model or service call that failed); cases that failed on their merits are kept",
    )
    build.add_argument(
        "--repair",
        action="store_true",
        help="drop damaged lines of the output's cases.jsonl and recompute their cases",
    )
    build.add_argument(
        "--republish",
        action="store_true",
        help="with --bus kafka: publish again the cases an earlier run published that are "
        "not stored yet (by default they are waited for, being in flight)",
    )
    build.add_argument(
        "--idle-timeout",
        type=float,
        help="with --bus kafka: stop with an error when no case arrives for this many "
        "seconds; overrides kafka.idle_timeout_seconds (default 600)",
    )
    build.set_defaults(handler=_build)

    check = commands.add_parser(
        "check",
        help="check a build configuration against this machine before running it",
        description="Report every problem a build would meet, together, before any model "
        "loads: source files, local model folders, the API key variables, every model "
        "endpoint (and the model it serves), every remote stage's health and, with --bus "
        "kafka, the broker. A build runs the checks that need no network itself.",
    )
    check.add_argument("--config", required=True, type=Path, help="build configuration (YAML)")
    check.add_argument("--bus", choices=["embedded", "kafka"], default="embedded")
    check.add_argument(
        "--offline", action="store_true", help="only what needs no network (files, keys)"
    )
    _add_set_argument(check)
    _add_kafka_arguments(check)
    check.set_defaults(handler=_check)

    train = commands.add_parser(
        "train",
        help="fine-tune a model on a built dataset in this process",
        description="Fine-tune a model with TRL on a dataset a build wrote (SFT with LoRA or "
        "full weights, or DPO on its preference pairs), never on its held-out test split. "
        "Run the same command again to resume from the latest checkpoint. SIGTERM or "
        f"Ctrl-C stops at the next step with a checkpoint (exit status {STOPPED_EXIT_STATUS}).",
    )
    given = train.add_mutually_exclusive_group(required=True)
    given.add_argument("--config", type=Path, help="run configuration (YAML)")
    given.add_argument(
        "--config-json",
        metavar="TEXT",
        help="the run configuration itself, as JSON (how the training service starts runs)",
    )
    train.add_argument("--output", help="output folder; overrides output.dir in the config")
    _add_set_argument(train)
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the configuration and print the plan (rows, tokens, steps, the first "
        "row with its trained tokens marked) without loading the model's weights",
    )
    train.add_argument(
        "--report-to",
        metavar="FILE",
        help="write a JSON line for the start, each logged metrics entry and the end of the "
        "run ('-': stdout), for whoever follows the run (the training service)",
    )
    remote = add_client_arguments(
        train,
        required=False,
        title="training service",
        description="with --server, the run is submitted to the training service, which runs "
        "it (as a local process or a Kubernetes Job), and this command follows it",
    )
    remote.add_argument(
        "--executor",
        choices=["local", "kubernetes"],
        help="where the service runs it (default: the service's default executor)",
    )
    remote.add_argument(
        "--request-id",
        help="idempotency key: submitting again with the same one gives the same run",
    )
    remote.add_argument(
        "--detach", action="store_true", help="print the run's id and exit without following it"
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate models side by side on safety and capability benchmarks",
        description="Generate K samples per benchmark prompt for every model, judge the "
        "safety ones, classify the over-refusal ones and score the capability ones (code "
        "in a sandbox), then write the method's metrics with confidence intervals, paired "
        "comparisons against each model's base, the samples and the report. Run again on "
        "the same output to resume.",
    )
    evaluate.add_argument("--config", required=True, type=Path, help="evaluation config (YAML)")
    evaluate.add_argument("--output", help="output folder; overrides eval.output in the config")
    _add_set_argument(evaluate)
    evaluate.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the configuration and print the plan (models, benchmarks, "
        "generations, judge calls) without loading a model",
    )
    evaluate.add_argument(
        "--bus",
        choices=["embedded", "kafka"],
        default="embedded",
        help="embedded: every stage in this process; kafka: publish the cases and store what "
        "`unsafechain worker eval-generate` / `eval-assess` processes deliver",
    )
    _add_kafka_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    runs = commands.add_parser("runs", help="list or cancel the training service's runs")
    run_commands = _Commands(
        runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    )
    listing = run_commands.add_parser("list", help="every run, newest first")
    add_client_arguments(listing)
    listing.set_defaults(handler=_runs)
    cancel = run_commands.add_parser(
        "cancel", help="stop a run; it saves a checkpoint and ends CANCELLED"
    )
    cancel.add_argument("run_id", help="the run's id")
    add_client_arguments(cancel)
    cancel.set_defaults(handler=_runs)

    topics = commands.add_parser("topics", help="manage the build's Kafka topics")
    topic_commands = _Commands(
        topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    )
    create = topic_commands.add_parser(
        "create",
        help="create every build topic and its dead-letter topic",
        description="Create <prefix>.<version>.<topic> and <…>.dlq for every build topic; "
        "topics that exist are left as they are.",
    )
    create.add_argument("--config", required=True, type=Path, help="build configuration (YAML)")
    create.add_argument("--partitions", type=int, help="overrides kafka.partitions")
    _add_set_argument(create)
    _add_kafka_arguments(create)
    create.set_defaults(handler=_topics_create)

    worker = commands.add_parser(
        "worker",
        help="run one build stage, or the training trigger, as a Kafka consumer group member",
        description="Consume the stage's topic, run the stage, produce its outputs, then "
        "commit. Start more to scale (up to the partition count); SIGTERM finishes the "
        "batch in hand, commits and leaves the group. `worker train --config FOLLOW.yaml` "
        "follows the datasets finished builds announce and submits the configured training "
        "run for each build once.",
    )
    worker.add_argument(
        "stage",
        choices=["generate", "judge", "route", "correct", "train", "eval-generate", "eval-assess"],
        help="a build stage; train: follow the datasets topic; eval-generate / eval-assess: "
        "an evaluation's stages (--config: the evaluation's configuration)",
    )
    worker.add_argument(
        "--candidate", help="with eval-generate: the model (candidate name) to generate for"
    )
    worker.add_argument(
        "--config",
        required=True,
        type=Path,
        help="build configuration (YAML); for train, the follow configuration",
    )
    worker.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics (consumer lag) on this port"
    )
    _add_set_argument(worker)
    _add_kafka_arguments(worker)
    worker.set_defaults(handler=_worker)

    standins = commands.add_parser(
        "standins",
        help="create the tiny stand-in models the demo and tests use",
        description="Train tiny generator, judge and corrector models on the spot (seconds "
        "on a CPU). They stand in for real models where none can be downloaded.",
    )
    standins.add_argument("--out", required=True, help="folder for the three models")
    standins.add_argument("--seed", type=int, default=0, help="training seed")
    standins.set_defaults(handler=_standins)

    serve = commands.add_parser(
        "serve",
        help="run one stage's engine as a gRPC service",
        description="Serve the generation, judge, correction or training engine over gRPC, "
        "with health checking, reflection, optional TLS and bearer tokens, and Prometheus metrics. "
        "Every flag can also be set as UNSAFECHAIN_<SETTING> in the environment "
        "(nested: UNSAFECHAIN_MODEL__BASE_URL); SIGTERM drains and exits 0.",
    )
    services = _Commands(serve.add_subparsers(dest="service", required=True, metavar="SERVICE"))
    for name in SERVICE_NAMES:
        service = services.add_parser(name, help=f"serve the {name} engine")
        _service_part(name, "settings").add_arguments(service)
        service.set_defaults(handler=_serve)

    judge = commands.add_parser(
        "judge",
        help="ask a judge service for a verdict on a response",
        description="Send a prompt and a response to a judge service and print the verdict.",
    )
    add_client_arguments(judge)
    prompt = judge.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt ('-': stdin)")
    response = judge.add_mutually_exclusive_group(required=True)
    response.add_argument("--response", help="the response text, think section included")
    response.add_argument("--response-file", help="file holding the response ('-': stdin)")
    judge.add_argument(
        "--target",
        action="append",
        choices=["full", "reasoning", "answer"],
        help="part to judge (repeatable); default: the service's",
    )
    judge.add_argument("--json", action="store_true", help="print the judgment as JSON")
    judge.set_defaults(handler=_judge)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json, verbose=args.verbose)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt as interrupt:
        # One line, no traceback: what was kept, when the command says (Interrupted).
        detail = f": {interrupt}" if str(interrupt) else ""
        print(f"interrupted{detail}", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS


def entry() -> None:
    """The ``unsafechain`` console script: :func:`main`, then exit with its status. After
    Ctrl-C the process ends at once (what the command kept is on disk already): a model
    call still running in a worker thread would otherwise abort the interpreter's
    shutdown in a native library (``terminate called without an active exception``)."""
    status = main()
    if status == INTERRUPTED_EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
