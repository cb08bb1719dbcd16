"""Benchmark: SFT tokens per second with packing against padding, on rows of mixed lengths.

The same rows are trained on twice, one epoch each, through ``run_training`` (the engine
``unsafechain train`` runs), with the same seed, model and LoRA settings:

- **padding**: batches of ``--batch`` rows, each padded to the longest row of its batch;
- **packing**: rows packed best-fit decreasing into blocks of ``--block`` tokens,
  padding-free (each row attends only to itself), one block per batch.

Rows mimic a reasoning dataset: a short prompt and a ``<think>`` response whose length
follows a long-tailed (log-normal) distribution, from a few dozen to ~1,000 tokens. The
figure compared is the trainer's own ``train_tokens_per_second``: real (non-padding)
tokens trained on per second of the training loop.

Usage::

    .venv/bin/python bench/training_packing.py --rows 400 --batch 8 --block 1024

By default the model is the tiny stand-in generator (built into ``.cache/standins``
on first use); ``--model PATH`` benchmarks another causal LM with an R1-style template.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from unsafechain.demo.standins import build_standin_models
from unsafechain.training.engine import run_training
from unsafechain.training.settings import TrainingSettings

logger = logging.getLogger("bench.training_packing")

SENTENCES = (
    "The user asks about a general topic, so I should give a clear answer.",
    "First I check what is being asked and whether it could cause harm.",
    "Then I work through the steps one at a time and keep notes as I go.",
    "I should double check the numbers before I write the final answer.",
    "This part needs care, so I will explain the safe way to do it.",
)
PROMPTS = (
    "How do I grow tomatoes?",
    "What is the capital of France?",
    "Sara has 12 apples and buys 30 more. How many apples does she have now?",
    "Write a Python function that reverses a list.",
)


def mixed_rows(count: int, seed: int) -> list[dict]:
    """Rows whose responses have log-normally distributed lengths."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        sentences = max(1, min(80, round(rng.lognormvariate(2.0, 0.9))))
        reasoning = " ".join(rng.choice(SENTENCES) for _ in range(sentences))
        answer = " ".join(rng.choice(SENTENCES) for _ in range(max(1, sentences // 4)))
        response = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        rows.append({"prompt": PROMPTS[index % len(PROMPTS)], "response": response})
    return rows


def measure(model: str, rows: Path, output: Path, *, packing: bool, args) -> dict:
    """Train one epoch in one mode; the trainer's throughput figures."""
    batch = 1 if packing else args.batch
    settings = TrainingSettings.model_validate(
        {
            "model": {"base": model},
            "dataset": {"path": str(rows)},
            "training": {
                "epochs": 1,
                "learning_rate": 1e-4,
                "effective_batch_size": batch,
                "per_device_batch_size": batch,
                "max_length": args.block,
                "packing": packing,
            },
            "checkpoints": {"every_steps": 100_000},
            "logging": {"every_steps": 10},
            "hardware": {"device": "cpu", "cpu_threads": args.threads},
            "output": {"dir": str(output)},
        }
    )
    result = run_training(settings, progress=False)
    final = result.record["metrics"]["final"]
    data = result.record["dataset"]
    return {
        "mode": "packing" if packing else "padding",
        "rows_per_batch": f"1 block of {args.block}" if packing else str(batch),
        "steps": result.global_step,
        "sequences": data["sequences"],
        "tokens": final["num_input_tokens_seen"],
        "seconds": final["train_runtime"],
        "tokens_per_second": final["train_tokens_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the stand-in generator)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8, help="rows per padded batch")
    parser.add_argument(
        "--block", type=int, default=1024, help="tokens per packed block (and max length)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    model = args.model or str(build_standin_models(Path(".cache/standins")).generator)
    made = mixed_rows(args.rows, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = sorted(len(tokenizer(row["prompt"] + row["response"])["input_ids"]) for row in made)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        rows = folder / "rows.jsonl"
        rows.write_text("".join(json.dumps(row) + "\n" for row in made))
        results = [
            measure(model, rows, folder / mode, packing=mode == "packing", args=args)
            for mode in ("padding", "packing")
        ]
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), model {model}, {args.rows} rows of about "
        f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}, mean "
        f"{sum(lengths) / len(lengths):.0f})"
    )
    print("| mode | rows per batch | steps | sequences | tokens | seconds | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['mode']} | {r['rows_per_batch']} | {r['steps']} | {r['sequences']} | "
            f"{r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} |"
        )
    speedup = results[1]["tokens_per_second"] / results[0]["tokens_per_second"]
    print(f"packing trains {speedup:.2f}x as many tokens per second as padding")


if __name__ == "__main__":
    main()
