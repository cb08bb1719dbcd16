"""The evaluation on Kafka: stage workers (``unsafechain worker eval-generate
--candidate NAME`` and ``unsafechain worker eval-assess``) and the evaluation command,
which publishes the cases and is the sink.

Topics, beside a build's under the same ``kafka.topic_prefix`` and apart from them:

    <prefix>.<version>.eval-prompts.<model>   a model's cases; its generate workers
    <prefix>.<version>.eval-generated         samples to judge or score; the assess workers
    <prefix>.<version>.eval-records           assessed cases; the evaluation command stores them

Each model has a topic and a consumer group of its own, so each generate worker loads
one model and a model's workers scale on their own. A case carries its evaluation's
id (in its provenance) and configuration fingerprint: a worker refuses a case of
another configuration (dead-lettered at once), and the sink keeps only its own
evaluation's cases. Delivery is the build's: at-least-once, commits after the outputs
are flushed, a case whose stage keeps failing dead-lettered and stored as failed (its
samples count as errors), and the store keeps each case id once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf.message import DecodeError
from tqdm import tqdm

from unsafechain.backends.pool import BackendPool
from unsafechain.evaluation.config import EvalConfig
from unsafechain.evaluation.pipeline import (
    AssessStage,
    EvalError,
    EvalJudges,
    EvalPlan,
    EvalResult,
    EvalStart,
    ResolvedCandidate,
    candidate_generator,
    evaluation_engines,
    finish_evaluation,
    plan_evaluation,
    prompt_key,
    start_evaluation,
)
from unsafechain.generation.engine import Generator
from unsafechain.streaming.kafka import (
    BROKER_CALL_TIMEOUT_MS,
    ConsumerLag,
    MessageRunner,
    PermanentError,
    commit,
    create_topics,
    decode,
    group_name,
    make_consumer,
    poll_batch,
    publish_cases,
    stopped_by_signals,
    topic_name,
)
from unsafechain.streaming.stages import (
    GENERATED,
    PROMPTS,
    RECORDS,
    Emitted,
    GenerateStage,
    Stage,
    run_stage,
    stage_failed,
)
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

EVAL_STAGES = ("eval-generate", "eval-assess")
EVAL_GENERATED, EVAL_RECORDS = f"eval-{GENERATED}", f"eval-{RECORDS}"
# The stages are the build's; what they emit goes to the evaluation's topics.
_EVAL_TOPICS = {GENERATED: EVAL_GENERATED, RECORDS: EVAL_RECORDS}


def prompts_topic(candidate: str) -> str:
    """The short name of a model's cases topic: ``eval-prompts.<model>``."""
    return f"eval-{PROMPTS}.{candidate}"


def create_eval_topics(config: EvalConfig) -> list[str]:
    """Create the evaluation's topics (and their dead-letter topics); say which were
    new. Topics that exist are left as they are."""
    topics = [prompts_topic(c.name) for c in config.candidates] + [EVAL_GENERATED, EVAL_RECORDS]
    return create_topics(config.kafka, topics)


def _to_eval_topics(emitted: Emitted) -> Emitted:
    return [(_EVAL_TOPICS[topic], case) for topic, case in emitted]


def run_eval_worker(
    config: EvalConfig,
    stage_name: str,
    *,
    candidate: str | None = None,
    metrics_port: int | None = None,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Run one evaluation stage as a member of its consumer group until SIGTERM or
    SIGINT (or ``until()``), which finish the batch in hand, commit and leave.

    Args:
        config: The evaluation's configuration; its ``kafka`` section says where.
        stage_name: ``eval-generate`` (with ``candidate``) or ``eval-assess``.
        candidate: The model whose cases an ``eval-generate`` worker generates.
        metrics_port: Serve the consumer lag on this port; none: don't.
        until: Polled between batches (a worker in a thread takes no signals).

    Raises:
        EvalError: The stage or the model is not one of the configuration's.
    """
    if stage_name not in EVAL_STAGES:
        raise EvalError(f"stage: {stage_name!r} is not one of {', '.join(EVAL_STAGES)}")
    names = [c.name for c in config.candidates]
    if stage_name == "eval-generate" and candidate not in names:
        raise EvalError(
            f"--candidate: eval-generate needs one of the configuration's models "
            f"({', '.join(names)}), got {candidate!r}"
        )
    stopping = threading.Event()
    with stopped_by_signals(stopping.set, f"{stage_name} worker"):
        _run_worker(
            config, stage_name, candidate, metrics_port, lambda: stopping.is_set() or until()
        )


def _run_worker(
    config: EvalConfig,
    stage_name: str,
    candidate: str | None,
    metrics_port: int | None,
    until: Callable[[], bool],
) -> None:
    plan = plan_evaluation(config)
    create_eval_topics(config)
    fingerprint = config.fingerprint()
    loop = asyncio.new_event_loop()
    closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
    endpoint = None
    try:
        stage: Stage
        if stage_name == "eval-generate":
            resolved = next(c for c in plan.candidates if c.name == candidate)
            # Built inside the event loop: gRPC channels bind to the loop that makes them.
            generator, pool = loop.run_until_complete(_generator_in_loop(config, resolved))
            closers.append(generator.aclose)
            if pool is not None:
                closers.append(pool.aclose)
            stage = GenerateStage(generator, config.eval.seed, seed_key=prompt_key)
            consumed, group = prompts_topic(resolved.name), f"eval-generate.{resolved.name}"
        else:
            assess, judges, judge_pool = loop.run_until_complete(_engines_in_loop(plan))
            closers += [judges.aclose, judge_pool.aclose]
            stage, consumed, group = assess, EVAL_GENERATED, "eval-assess"

        async def handle(case: case_pb2.Case) -> Emitted:
            theirs = case.provenance.config_fingerprint
            if theirs != fingerprint:
                raise PermanentError(
                    f"case {case.id} was made with evaluation configuration {theirs}; this "
                    f"{stage_name} worker runs {fingerprint}: start the workers with the "
                    "evaluation's configuration, or give each its own kafka.topic_prefix"
                )
            return _to_eval_topics(await run_stage(stage, case, keep_failures=False))

        if until():
            return
        lag = None
        if metrics_port is not None:
            lag = ConsumerLag()
            endpoint = lag.serve("0.0.0.0", metrics_port)
        runner = MessageRunner(
            config.kafka,
            consumed,
            group,
            handle,
            give_up=lambda case, reason: _to_eval_topics(stage_failed(case, stage.name, reason)),
            concurrency=config.eval.concurrency,
            loop=loop,
            lag=lag,
        )
        logger.info("%s: consuming %s", runner.group, topic_name(config.kafka, consumed))
        runner.run(done=until)
    finally:
        if endpoint is not None:
            endpoint.close()
        for close in closers:
            loop.run_until_complete(close())
        loop.close()


async def _generator_in_loop(
    config: EvalConfig, candidate: ResolvedCandidate
) -> tuple[Generator, BackendPool | None]:
    return candidate_generator(config, candidate)


async def _engines_in_loop(plan: EvalPlan) -> tuple[AssessStage, EvalJudges, BackendPool]:
    return evaluation_engines(plan)


def run_kafka_evaluation(
    config: EvalConfig, *, progress: bool = True, stop: Callable[[], bool] = lambda: False
) -> EvalResult:
    """Evaluate on Kafka: publish the cases not stored yet to their models' topics,
    store what the workers deliver to the records topic, and once every case is in,
    write the results, samples and report. Run again on the same output to resume
    (cases still missing are published again; the store keeps each once).

    Raises:
        EvalError: The output holds another evaluation, a model cannot be resolved, no
            case arrived for ``kafka.idle_timeout_seconds``, or ``stop()`` held.
        BenchmarkError: A benchmark cannot be read.
    """
    start = start_evaluation(config)
    try:
        if start.total:
            create_eval_topics(config)
            _publish_and_sink(start, progress, stop)
        return finish_evaluation(start)
    finally:
        start.store.close()


def _publish_and_sink(start: EvalStart, progress: bool, stop: Callable[[], bool]) -> None:
    config = start.plan.config
    settings = config.kafka
    wanted = {case.id for cases in start.todo.values() for case in cases}
    group = f"{group_name(settings, 'eval-sink')}.{start.eval_id}"
    consumer = make_consumer(settings, [topic_name(settings, EVAL_RECORDS)], group)
    try:
        for name, cases in start.todo.items():
            if cases:
                sent = publish_cases(settings, prompts_topic(name), cases)
                logger.info("published %d cases of %s", sent, name)
        ours = f"{start.eval_id}/"
        idle = settings.idle_timeout_seconds
        last = time.monotonic()
        with tqdm(total=len(wanted), desc="eval", unit="case", disable=not progress) as bar:
            while not wanted <= start.store.ids:
                if stop():
                    raise EvalError("stopped; run the same command again to resume")
                if time.monotonic() - last > idle:
                    missing = len(wanted - start.store.ids)
                    raise EvalError(
                        f"no case arrived for {idle:g} s ({missing} missing): are the workers "
                        "running? `unsafechain worker eval-generate --candidate NAME` for each "
                        "model and `unsafechain worker eval-assess`, with this configuration"
                    )
                batch = poll_batch(consumer)
                for record in batch:
                    try:
                        case = decode(record.value)
                    except DecodeError as error:
                        logger.warning("records: undecodable message: %s", error)
                        continue
                    if not case.provenance.build_id.startswith(ours):
                        continue  # Another evaluation's, stored by its own sink.
                    if start.store.write(case) and case.id in wanted:
                        bar.update()
                        last = time.monotonic()
                if batch:
                    commit(consumer, "eval sink")
    finally:
        consumer.close(timeout_ms=BROKER_CALL_TIMEOUT_MS)
