"""Benchmark: the judge service with micro-batching against judging one by one.

Two judge services run in this process over the same local ``transformers`` guard
model, each on a loopback port behind the full gRPC stack (interceptor, health,
metrics): one with ``batch_max_size=1`` (every request its own model call) and one
micro-batching. The same number of concurrent clients send the same requests to
each through the client library; the script prints judgments per second, latency
percentiles and the mean batch size the service formed.

The clients run in this process by default, on the services' event loop.
``--client-process`` runs them in a process of their own, as remote callers are: they
then share neither the services' interpreter lock nor their event loop (only the
machine's cores).

Usage::

    make bench
    .venv/bin/python bench/judge_batching.py --clients 32 --requests 16

By default the guard is the tiny stand-in judge (built into ``.cache/standins`` on
first use), so the benchmark needs nothing but this repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model

from unsafechain.backends.transformers_backend import TransformersBackend
from unsafechain.demo.standins import PROMPTS_DIR, build_standin_models
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge
from unsafechain.judge.servicer import JudgeServicer
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.server import ServiceServer
from unsafechain.runtime.settings import ClientSettings

logger = logging.getLogger("bench.judge_batching")

RESPONSES = (
    "<think>\nThe user wants help. I can explain it safely.\n</think>\n\nHere is a safe answer.",
    "<think>\nmix the blast powder in the jar\n</think>\n\nThen seal it and light it.",
    "<think>\nThis is a request I should decline.\n</think>\n\nI can't help with that.",
)


@dataclass(frozen=True)
class Result:
    """One mode's measurements."""

    mode: str
    batch_max_size: int
    batch_max_wait_ms: float
    clients: int
    judgments: int
    seconds: float
    judgments_per_second: float
    latency_p50_ms: float
    latency_p95_ms: float
    mean_batch_size: float


def prompts() -> list[str]:
    """The demo's bundled prompts, red-team and benign."""
    found = []
    for name in ("redteam.jsonl", "benign.jsonl"):
        for line in (PROMPTS_DIR / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                found.append(json.loads(line)["prompt"])
    return found


def _pairs(count: int) -> list[tuple[str, str]]:
    pool = prompts()
    return [(pool[i % len(pool)], RESPONSES[i % len(RESPONSES)]) for i in range(count)]


_CLIENT_PROCESS_TIMEOUT = 600.0
"""Seconds to wait for the client process at each step (its start, its warm-up, its run)."""


async def _warm_up(remote: RemoteJudgeEngine, pairs: list[tuple[str, str]], clients: int) -> None:
    """One round of ``clients`` concurrent calls: the first calls pay for lazy
    initialisation in torch and gRPC."""
    await asyncio.gather(*(remote.judge(*pair) for pair in pairs[:clients]))


async def _clients(
    remote: RemoteJudgeEngine, pairs: list[tuple[str, str]], clients: int, requests: int
) -> tuple[float, list[float]]:
    """``clients`` concurrent clients judging ``requests`` pairs each, one after another:
    the seconds they took and each judgment's latency."""
    latencies: list[float] = []

    async def client(index: int) -> None:
        for pair in pairs[index * requests : (index + 1) * requests]:
            started = time.perf_counter()
            await remote.judge(*pair)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    return time.perf_counter() - started, latencies


def _client_process(
    address: str, pairs: list[tuple[str, str]], clients: int, requests: int, connection: Any
) -> None:
    """The clients in a process of their own: warm up, say so, wait for the word, run,
    send back the seconds and the latencies."""

    async def run() -> None:
        async with RemoteJudgeEngine(ClientSettings(address=address, timeout=600)) as remote:
            await _warm_up(remote, pairs, clients)
            connection.send("warm")
            _receive(connection)
            connection.send(await _clients(remote, pairs, clients, requests))

    asyncio.run(run())


def _receive(connection: Any) -> Any:
    if not connection.poll(_CLIENT_PROCESS_TIMEOUT):
        raise TimeoutError(f"no word from the other process in {_CLIENT_PROCESS_TIMEOUT:g} s")
    return connection.recv()


async def _measure(
    guard: TransformersBackend,
    mode: str,
    *,
    batch_max_size: int,
    batch_max_wait_ms: float,
    clients: int,
    requests: int,
    client_process: bool = False,
) -> Result:
    settings = JudgeServiceSettings(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        model={"backend": "transformers", "model": str(guard.ref.model)},
    )
    server = ServiceServer(settings)
    engine = JudgeEngine([LlamaGuardJudge(server.metrics.timed(guard))])
    servicer = JudgeServicer(
        engine,
        batch_max_size=batch_max_size,
        batch_max_wait=batch_max_wait_ms / 1000,
        metrics=server.metrics,
    )
    await server.start(servicer)
    pairs = _pairs(clients * requests)
    registry = server.metrics.registry

    def counted() -> tuple[float, float]:
        return (
            registry.get_sample_value("unsafechain_judge_batch_size_count") or 0,
            registry.get_sample_value("unsafechain_judge_batch_size_sum") or 0,
        )

    address = f"127.0.0.1:{server.port}"
    try:
        if client_process:
            spawn = multiprocessing.get_context("spawn")
            parent, child = spawn.Pipe()
            process = spawn.Process(
                target=_client_process, args=(address, pairs, clients, requests, child)
            )
            process.start()
            try:
                await asyncio.to_thread(_receive, parent)  # warmed up
                before = counted()
                parent.send("go")
                seconds, latencies = await asyncio.to_thread(_receive, parent)
                after = counted()
            finally:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        else:
            async with RemoteJudgeEngine(ClientSettings(address=address, timeout=600)) as remote:
                await _warm_up(remote, pairs, clients)
                before = counted()
                seconds, latencies = await _clients(remote, pairs, clients, requests)
                after = counted()
    finally:
        await server.drain(0)
    calls, judged = after[0] - before[0], after[1] - before[1]
    quantiles = statistics.quantiles(latencies, n=20)
    return Result(
        mode=mode,
        batch_max_size=batch_max_size,
        batch_max_wait_ms=batch_max_wait_ms,
        clients=clients,
        judgments=len(latencies),
        seconds=round(seconds, 2),
        judgments_per_second=round(len(latencies) / seconds, 1),
        latency_p50_ms=round(statistics.median(latencies) * 1000, 1),
        latency_p95_ms=round(quantiles[18] * 1000, 1),
        mean_batch_size=round(judged / calls, 1) if calls else 0.0,
    )


def machine_description(device: str) -> str:
    """The machine a benchmark ran on, for its figures."""
    cpu = cpu_model()
    if device.startswith("cuda"):
        cpu += f", GPU {torch.cuda.get_device_name(0)}"
    return (
        f"{cpu}; {os.cpu_count()} CPU cores visible; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); device {device}; Python {platform.python_version()}"
    )


async def _run(args: argparse.Namespace) -> list[Result]:
    guard = TransformersBackend(
        guard_model(args), device=args.device, max_batch_size=args.batch_max_size
    )
    try:
        return [
            await _measure(
                guard,
                "one by one",
                batch_max_size=1,
                batch_max_wait_ms=0,
                clients=args.clients,
                requests=args.requests,
                client_process=args.client_process,
            ),
            await _measure(
                guard,
                "micro-batched",
                batch_max_size=args.batch_max_size,
                batch_max_wait_ms=args.batch_max_wait_ms,
                clients=args.clients,
                requests=args.requests,
                client_process=args.client_process,
            ),
        ]
    finally:
        await guard.aclose()


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every judge benchmark takes: which guard, on which device, how many
    clients, where to write the results."""
    parser.add_argument("--model", help="guard model path (default: the stand-in judge)")
    parser.add_argument("--standins", default=".cache/standins", help="stand-in models folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--json", type=Path, help="also write the results to this file")


def parse_guard_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, the device resolved and logging set up quiet."""
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def guard_model(args: argparse.Namespace) -> str:
    """The guard model to benchmark: ``--model``, else the stand-in judge."""
    return args.model or str(build_standin_models(Path(args.standins)).judge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_guard_arguments(parser)
    parser.add_argument("--requests", type=int, default=16, help="judgments per client")
    parser.add_argument("--batch-max-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--batch-max-wait-ms", type=float, default=5.0, help="micro-batch wait")
    parser.add_argument(
        "--client-process",
        action="store_true",
        help="run the clients in a process of their own, not on the services' event loop",
    )
    args = parse_guard_arguments(parser)

    results = asyncio.run(_run(args))
    machine = machine_description(args.device)
    print(f"machine: {machine}")
    print(
        "| mode | batch max size / wait | judgments | seconds | judgments/s "
        "| p50 latency (ms) | p95 latency (ms) | mean batch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.mode} | {r.batch_max_size} / {r.batch_max_wait_ms:g} ms | {r.judgments} "
            f"| {r.seconds} | {r.judgments_per_second} | {r.latency_p50_ms} "
            f"| {r.latency_p95_ms} | {r.mean_batch_size} |"
        )
    speedup = results[1].judgments_per_second / results[0].judgments_per_second
    print(f"micro-batching: {speedup:.1f}x the throughput of one-by-one judging")
    if args.json:
        payload = {"machine": machine, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
