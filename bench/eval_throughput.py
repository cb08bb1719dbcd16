"""Benchmark: the evaluation's throughput against fixed-latency OpenAI-compatible servers.

Two protocol-faithful OpenAI-compatible test servers (``tests/support/http_servers.py``)
run on loopback, each answering every request after a fixed latency: one serves the
evaluated model (R1-style ``<think>`` completions, ``n`` of them per request), the other
a Llama Guard 3 judge (the platform renders the published Llama Guard prompt and sends
it to ``/v1/completions``, as for a vLLM server; the judge answers ``safe`` or
``unsafe`` / ``S1`` with log-probabilities). ``run_evaluation`` (what ``unsafechain
eval`` runs) evaluates two models side by side on a StrongREJECT-layout file of
``--prompts`` prompts, K samples each, ``eval.concurrency`` C and both backends'
``max_concurrency`` C.

With C requests in flight and every request taking L seconds, a stage can make at
most C / L requests per second. The script counts the requests each server recorded
and prints, per stage, the requests per second achieved while the stage was active
(its first request to its last answer) and over the whole run, each as a fraction of
that ceiling, with the wall time and where it went (before the first request, the
cases, after the last answer: results, samples and report).

Usage::

    make bench
    .venv/bin/python bench/eval_throughput.py --prompts 200 --samples 4 --concurrency 16 \\
        --latency 0.2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The test servers live in tests/support; the script runs from bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge_batching import machine_description

from tests.support.http_servers import (
    OpenAIServer,
    RecordedRequest,
    ScriptedCompletion,
    completion_from_text,
)
from unsafechain.evaluation.benchmarks import SAMPLES_DIR
from unsafechain.evaluation.config import EvalConfig
from unsafechain.evaluation.pipeline import run_evaluation

logger = logging.getLogger("bench.eval_throughput")

MODEL = "deepseek-r1-distill-test"
GUARD = "llama-guard-3-test"
GUARD_BOS = "<|begin_of_text|>"
CANDIDATES = ("base", "tuned")

COMPLETIONS = (
    "<think>\nThe user asks for something harmful. I should not help with it.\n</think>\n\n"
    "I can't help with that.",
    "<think>\nThe user wants the steps. I will list them.\n</think>\n\n"
    "Here is how to do it: first gather the materials, then follow the steps.",
)
UNSAFE_MARK = "Here is how"


def model_responder(request: dict[str, Any]) -> list[ScriptedCompletion]:
    """``n`` R1-style completions, refusals and compliances in turn."""
    n = request.get("n") or 1
    return [completion_from_text(COMPLETIONS[index % len(COMPLETIONS)]) for index in range(n)]


def guard_responder(request: dict[str, Any]) -> list[ScriptedCompletion]:
    """Llama Guard 3's answer on the rendered prompt: unsafe (S1) for a compliance."""
    assessed = str(request.get("prompt", "")).rsplit("Agent: ", 1)[-1]
    answer = "\n\nunsafe\nS1" if UNSAFE_MARK in assessed else "\n\nsafe"
    return [completion_from_text(answer)]


def write_prompts(path: Path, count: int) -> None:
    """A StrongREJECT-layout CSV of ``count`` distinct prompts, the bundled sample's
    prompts repeated with a variant number (an id is the hash of the prompt)."""
    with (SAMPLES_DIR / "strongreject_dataset.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["category", "source", "forbidden_prompt"])
        writer.writeheader()
        for index in range(count):
            row = rows[index % len(rows)]
            writer.writerow(
                {
                    "category": row["category"],
                    "source": row["source"],
                    "forbidden_prompt": f"{row['forbidden_prompt']} (variant {index})",
                }
            )


def eval_config(args: argparse.Namespace, folder: Path, model_url: str, guard_url: str):
    """The evaluation: two candidates on the model server, one Llama Guard judge."""
    prompts = folder / "strongreject.csv"
    write_prompts(prompts, args.prompts)
    backend = {"backend": "openai", "timeout": 60, "max_concurrency": args.concurrency}
    return EvalConfig.model_validate(
        {
            "eval": {
                "output": str(folder / "eval"),
                "concurrency": args.concurrency,
                "resamples": args.resamples,
            },
            "models": {
                "model": backend | {"model": MODEL, "base_url": model_url},
                "guard": backend | {"model": GUARD, "base_url": guard_url},
            },
            "candidates": [
                {"name": CANDIDATES[0], "model": "model"},
                {"name": CANDIDATES[1], "model": "model", "base": CANDIDATES[0]},
            ],
            "benchmarks": [{"name": "strongreject", "path": str(prompts)}],
            "sampling": {"samples": args.samples, "temperature": 0.6, "max_new_tokens": 1024},
            "judging": {
                "judges": [
                    {
                        "name": "guard",
                        "kind": "llama_guard",
                        "model": "guard",
                        "prompt_format": "published",
                    }
                ]
            },
        }
    )


@dataclass(frozen=True)
class Stage:
    """One server's requests: how many, how fast, against the ceiling C / L."""

    requests: int
    samples: int
    active_seconds: float
    per_second_active: float
    fraction_active: float
    per_second_wall: float
    fraction_wall: float
    max_in_flight: int


@dataclass(frozen=True)
class Result:
    """One run's figures."""

    models: int
    prompts: int
    samples: int
    concurrency: int
    latency: float
    ceiling_per_second: float
    wall_seconds: float
    before_seconds: float
    cases_seconds: float
    after_seconds: float
    generation: Stage
    judge: Stage
    unsafe_fraction: float


def _posts(server: OpenAIServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.method == "POST"]


def _stage(requests: list[RecordedRequest], server: OpenAIServer, wall: float, args) -> Stage:
    ceiling = args.concurrency / args.latency
    if requests:
        arrivals = [r.received_at for r in requests]
        active = max(arrivals) - min(arrivals) + args.latency
    else:
        active = 0.0
    active_rate = len(requests) / active if active else 0.0
    wall_rate = len(requests) / wall
    return Stage(
        requests=len(requests),
        samples=sum(int(r.body.get("n") or 1) for r in requests),
        active_seconds=round(active, 2),
        per_second_active=round(active_rate, 1),
        fraction_active=round(active_rate / ceiling, 3),
        per_second_wall=round(wall_rate, 1),
        fraction_wall=round(wall_rate / ceiling, 3),
        max_in_flight=server.max_in_flight,
    )


def measure(args: argparse.Namespace) -> Result:
    """Run the evaluation once against the two servers; its figures."""
    model_server = OpenAIServer(model=MODEL, responder=model_responder, latency=args.latency)
    guard_server = OpenAIServer(
        model=GUARD, bos_token=GUARD_BOS, responder=guard_responder, latency=args.latency
    )
    with model_server, guard_server, tempfile.TemporaryDirectory() as scratch:
        config = eval_config(args, Path(scratch), model_server.base_url, guard_server.base_url)
        started = time.monotonic()
        result = run_evaluation(config, progress=args.progress)
        ended = time.monotonic()
        generated, judged = _posts(model_server), _posts(guard_server)
        wall = ended - started
        arrivals = [r.received_at for r in generated + judged]
        first, last = min(arrivals), max(arrivals) + args.latency
        safety = [result.results["results"][name]["strongreject"] for name in CANDIDATES]
        unsafe = 1 - sum(s["figures"]["safe_at_1"]["value"] for s in safety) / len(safety)
        return Result(
            models=len(CANDIDATES),
            prompts=args.prompts,
            samples=args.samples,
            concurrency=args.concurrency,
            latency=args.latency,
            ceiling_per_second=round(args.concurrency / args.latency, 1),
            wall_seconds=round(wall, 2),
            before_seconds=round(first - started, 2),
            cases_seconds=round(last - first, 2),
            after_seconds=round(ended - last, 2),
            generation=_stage(generated, model_server, wall, args),
            judge=_stage(judged, guard_server, wall, args),
            unsafe_fraction=round(unsafe, 3),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="safety prompts per model")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (K)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="eval.concurrency, and max_concurrency of both backends",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument(
        "--resamples", type=int, default=10_000, help="bootstrap resamples (eval.resamples)"
    )
    parser.add_argument("--progress", action="store_true", help="show the progress bar")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1 or args.concurrency < 1 or args.latency <= 0:
        parser.error("--prompts, --samples and --concurrency must be at least 1, --latency > 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    r = measure(args)
    machine = machine_description("cpu")
    print(f"machine: {machine}")
    print(
        f"{r.models} models x {r.prompts} prompts x K={r.samples}; concurrency {r.concurrency}, "
        f"latency {r.latency:g} s: ceiling {r.ceiling_per_second:g} requests/s per stage"
    )
    print(
        "| stage | requests | samples | active s | requests/s active | of ceiling "
        "| requests/s whole run | of ceiling | most in flight |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in (("generation", r.generation), ("judge", r.judge)):
        print(
            f"| {name} | {s.requests} | {s.samples} | {s.active_seconds} "
            f"| {s.per_second_active} | {s.fraction_active:.1%} | {s.per_second_wall} "
            f"| {s.fraction_wall:.1%} | {s.max_in_flight} |"
        )
    print(
        f"wall {r.wall_seconds} s: {r.before_seconds} s before the first request, "
        f"{r.cases_seconds} s of cases, {r.after_seconds} s after the last answer "
        f"(results, samples, report); unsafe samples {r.unsafe_fraction:.0%}"
    )
    if args.json:
        payload = {"machine": machine, **asdict(r)}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
