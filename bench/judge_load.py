"""Benchmark: the judge service under load, hostile requests among the normal ones.

One judge service runs in this process over a local ``transformers`` guard model,
behind the full gRPC stack (limits, interceptor, health, metrics, micro-batching),
built from its settings as ``unsafechain serve judge`` builds it. Concurrent clients
send ``Judge`` calls for a fixed time; every ``--hostile-every``-th call carries a
prompt over the service's character limit (2 MB), which must be refused at once
without slowing the others. The script prints calls per second, latency
percentiles and the calls that ended in each status code.

Usage::

    make bench
    .venv/bin/python bench/judge_load.py --clients 32 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
from judge_batching import (
    RESPONSES,
    add_guard_arguments,
    guard_model,
    machine_description,
    parse_guard_arguments,
    prompts,
)

from unsafechain.judge.servicer import create_servicer
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.server import ServiceServer
from unsafechain.v1 import judge_pb2, judge_pb2_grpc

HOSTILE_PROMPT = "x" * 2_000_000


@dataclass
class Load:
    """What the clients saw."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    hostile_latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    """One run's figures."""

    clients: int
    seconds: float
    calls: int
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    hostile_calls: int
    hostile_p99_ms: float
    codes: dict[str, int]


async def _client(stub, until: float, index: int, hostile_every: int, load: Load) -> None:
    pool = prompts()
    sent = 0
    while time.perf_counter() < until:
        sent += 1
        hostile = hostile_every > 0 and sent % hostile_every == 0
        prompt = HOSTILE_PROMPT if hostile else pool[(index + sent) % len(pool)]
        request = judge_pb2.JudgeRequest(prompt=prompt, response=RESPONSES[sent % len(RESPONSES)])
        started = time.perf_counter()
        try:
            await stub.Judge(request, timeout=60)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        took = time.perf_counter() - started
        (load.hostile_latencies if hostile else load.latencies).append(took)
        load.codes[("oversized " if hostile else "") + code] += 1


async def _run(args: argparse.Namespace) -> Summary:
    model = guard_model(args)
    settings = JudgeServiceSettings(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        model={"backend": "transformers", "model": model, "device": args.device},
    )
    server = ServiceServer(settings)
    await server.start(create_servicer(settings, server.metrics))
    load = Load(clients=args.clients, seconds=args.seconds)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[("grpc.max_send_message_length", settings.max_message_bytes)],
        ) as channel:
            stub = judge_pb2_grpc.JudgeServiceStub(channel)
            # Warm-up: one round, not counted.
            await _client(stub, time.perf_counter() + 1, 0, 0, Load(1, 1))
            until = time.perf_counter() + args.seconds
            await asyncio.gather(
                *(_client(stub, until, i, args.hostile_every, load) for i in range(args.clients))
            )
    finally:
        await server.drain(0)
    quantiles = statistics.quantiles(load.latencies, n=100)
    hostile = (
        statistics.quantiles(load.hostile_latencies, n=100)
        if len(load.hostile_latencies) > 1
        else [0.0] * 99
    )
    return Summary(
        clients=args.clients,
        seconds=args.seconds,
        calls=len(load.latencies),
        calls_per_second=round(len(load.latencies) / args.seconds, 1),
        p50_ms=round(statistics.median(load.latencies) * 1000, 1),
        p99_ms=round(quantiles[98] * 1000, 1),
        hostile_calls=len(load.hostile_latencies),
        hostile_p99_ms=round(hostile[98] * 1000, 1),
        codes=dict(sorted(load.codes.items())),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_guard_arguments(parser)
    parser.add_argument("--seconds", type=float, default=20, help="how long the load runs")
    parser.add_argument(
        "--hostile-every", type=int, default=20, help="every n-th call is oversized (0: none)"
    )
    args = parse_guard_arguments(parser)
    summary = asyncio.run(_run(args))
    machine = machine_description(args.device)
    print(f"machine: {machine}")
    print(
        "| clients | seconds | calls | calls/s | p50 (ms) | p99 (ms) | oversized calls "
        "| oversized p99 (ms) | status codes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    codes = ", ".join(f"{code} {count}" for code, count in summary.codes.items())
    print(
        f"| {summary.clients} | {summary.seconds:g} | {summary.calls} | {summary.calls_per_second} "
        f"| {summary.p50_ms} | {summary.p99_ms} | {summary.hostile_calls} "
        f"| {summary.hostile_p99_ms} | {codes} |"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **asdict(summary)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
