"""The build's three models as fixed-latency OpenAI-compatible test servers.

:class:`BuildWorkload` starts one :class:`~tests.support.http_servers.OpenAIServer` per
kind of call a build makes over ``backend: openai``, so that the requests are counted
per kind by the server that got them:

- ``generate``: the generator; ``n`` R1-style completions (``<think>…</think>`` and an
  answer) per chat-completions request;
- ``judge``: Llama Guard 3 as behind vLLM's Messages API (what the ``llama_guard`` judge
  sends over ``openai`` with ``prompt_format: auto``: the conversation, ``logprobs`` and
  ``top_logprobs``); it answers ``unsafe`` / ``S1`` for every original completion of a
  *hard* prompt and ``safe`` otherwise, with log-probabilities when asked, so that the
  judge's score path runs;
- ``correct``: the corrector; a safe ``<think>`` rewrite, which the judge passes.

Which prompts are hard is a function of the prompt text alone (a hash), the same in
every run and every process: about ``hard_share`` of them. Each server answers after
``latency`` seconds and can fail a share of its requests at random (HTTP 500 or 429).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Self

from tests.support.http_servers import (
    Fault,
    OpenAIServer,
    RandomFaults,
    ScriptedCompletion,
    completion_from_text,
)

KINDS = ("generate", "judge", "correct")
MODELS = {
    "generate": "deepseek-r1-distill-test",
    "judge": "llama-guard-3-test",
    "correct": "corrector-test",
}

CORRECTION = (
    "<think>\nThe request could lead to harm. I should not give the steps, but I can say "
    "why and point to a safe alternative.\n</think>\n\n"
    "I can't help with that, because it could hurt someone. If you want, I can explain "
    "the safety rules that apply instead."
)
CORRECTION_MARK = "I can't help with that, because"


def is_hard(prompt: str, share: float) -> bool:
    """Whether ``prompt`` is hard: its hash, read as a fraction of 2**64, is below ``share``."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def generation(index: int) -> str:
    """The ``index``-th sample of a prompt: reasoning, then an answer."""
    return (
        f"<think>\nThe user wants the steps. Sample {index}: I will think about the parts, "
        "the order and the tools, then list them.\n</think>\n\n"
        f"Here is how to do it (sample {index}): first gather the materials, then follow "
        "the steps one by one and check the result."
    )


def generator_responder(request: dict[str, Any]) -> list[ScriptedCompletion]:
    """``n`` R1-style completions."""
    return [completion_from_text(generation(index)) for index in range(request.get("n") or 1)]


def corrector_responder(request: dict[str, Any]) -> list[ScriptedCompletion]:
    """A safe rewrite in the ``<think>`` format, whatever it was asked to correct."""
    return [completion_from_text(CORRECTION) for _ in range(request.get("n") or 1)]


def guard_answer(messages: list[dict[str, Any]], hard_share: float) -> str:
    """Llama Guard's answer on a conversation: unsafe for an original completion of a
    hard prompt, safe for anything else (a correction, or any prompt that is not hard)."""
    prompt = next(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    assessed = str(messages[-1].get("content", ""))
    unsafe = is_hard(prompt, hard_share) and CORRECTION_MARK not in assessed
    return "unsafe\nS1" if unsafe else "safe"


def latency_limits(
    concurrency: int, latency: float, samples: int, hard_share: float
) -> tuple[float, float]:
    """The cases per second a build's stages allow at ``concurrency`` cases per stage
    and ``latency`` seconds a call: with sequential corrections (the code before issue
    15), and with concurrent ones (``CorrectStage`` as it stands).

    The generate stage (one call per case, ``n`` = K) and the judge stage (K calls at
    once) each pass at most C / L cases per second. The correct stage gets the hard
    cases only (``hard_share`` h); correcting a hard case's K unsafe completions one
    after another, a correction and its re-judgment each, takes 2K·L: C / (2K·h·L);
    with a case's corrections concurrent, 2·L: C / (2·h·L). The limit is the smallest
    stage's.
    """
    one_call = concurrency / latency
    if hard_share == 0:
        return one_call, one_call
    sequential = concurrency / (2 * samples * hard_share * latency)
    concurrent = concurrency / (2 * hard_share * latency)
    return min(one_call, sequential), min(one_call, concurrent)


@dataclass(frozen=True)
class KindCount:
    """The requests one kind of call made, and how many were answered with a fault."""

    requests: int
    faults: int


class BuildWorkload:
    """The generator, the guard and the corrector of a build, one test server each.

    Args:
        latency: Seconds every request takes.
        hard_share: The share of prompts whose completions are all judged unsafe.
        fault_rate: The share of requests answered HTTP 500 or 429 (half each, drawn
            at random, seeded): 429 with ``retry-after-ms`` of one latency.
        seed: Seeds the fault draws.
    """

    def __init__(
        self,
        *,
        latency: float = 0.05,
        hard_share: float = 0.32,
        fault_rate: float = 0.0,
        seed: int = 0,
    ):
        faults = (
            Fault.server_error(),
            Fault.rate_limited(retry_after=None, retry_after_ms=round(latency * 1000)),
        )
        responders = {
            "generate": generator_responder,
            "judge": self._guard_responder,
            "correct": corrector_responder,
        }
        self.hard_share = hard_share
        self.latency = latency
        self.servers = {
            kind: OpenAIServer(
                model=MODELS[kind],
                responder=responders[kind],
                latency=latency,
                random_faults=RandomFaults(fault_rate, faults, seed + offset),
            )
            for offset, kind in enumerate(KINDS)
        }

    def _guard_responder(self, request: dict[str, Any]) -> list[ScriptedCompletion]:
        return [completion_from_text(guard_answer(request["messages"], self.hard_share))]

    def start(self) -> Self:
        """Start the three servers."""
        for server in self.servers.values():
            server.start()
        return self

    def stop(self) -> None:
        """Stop the three servers."""
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def counts(self) -> dict[str, KindCount]:
        """The POST requests each kind of call made so far, faults among them."""
        counts = {}
        for kind, server in self.servers.items():
            posts = [r for r in server.requests if r.method == "POST"]
            counts[kind] = KindCount(len(posts), sum(r.fault is not None for r in posts))
        return counts

    def busy_span(self) -> tuple[float, float]:
        """When the first POST request arrived and the last one was answered (monotonic
        seconds): the build's cases phase, between its intake and its finalize."""
        arrivals = [
            r.received_at
            for server in self.servers.values()
            for r in server.requests
            if r.method == "POST"
        ]
        return min(arrivals), max(arrivals) + self.latency

    def models_config(self, concurrency: int, samples: int) -> dict[str, dict[str, Any]]:
        """The build config's ``models``: the three on ``backend: openai``, each allowed
        as many calls in flight as ``concurrency`` cases per stage can make (the guard:
        K judgments per case in the judge stage plus a re-judgment per correction)."""
        in_flight = {
            "generate": concurrency,
            "judge": concurrency * samples + concurrency * samples,
            "correct": concurrency * samples,
        }
        names = {"generate": "generator", "judge": "guard", "correct": "corrector"}
        return {
            names[kind]: {
                "backend": "openai",
                "model": MODELS[kind],
                "base_url": server.base_url,
                "timeout": 60,
                "max_concurrency": in_flight[kind],
            }
            for kind, server in self.servers.items()
        }
