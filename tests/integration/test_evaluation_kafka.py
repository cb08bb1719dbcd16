"""The evaluation on Kafka (a real broker, Tansu): generate workers per model and an
assess worker in threads, the evaluation command as the sink, and the same figures
and samples as the evaluation in one process."""

from __future__ import annotations

import threading

import pytest

from tests.support.builds import local_model, sample_rows
from tests.support.kafka_broker import kafka_section
from unsafechain.evaluation.config import EvalConfig
from unsafechain.evaluation.kafka import run_eval_worker, run_kafka_evaluation
from unsafechain.evaluation.pipeline import EvalError, run_evaluation

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_the_evaluation_on_kafka_gives_what_it_gives_in_one_process(
    standin_models, tmp_path, bootstrap
):
    raw: dict = {
        "eval": {"output": str(tmp_path / "embedded"), "seed": 5, "concurrency": 2},
        "models": {
            "generator": local_model(standin_models.generator),
            "other": local_model(standin_models.corrector),
            "guard": local_model(standin_models.judge),
        },
        "candidates": [
            {"name": "base", "model": "generator"},
            {"name": "other", "model": "other", "base": "base"},
        ],
        "benchmarks": [{"name": "strongreject", "limit": 3}, {"name": "gsm8k", "limit": 2}],
        "sampling": {"samples": 2, "temperature": 0.7, "max_new_tokens": 48},
        "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
        "kafka": kafka_section(bootstrap, "evalbus"),
    }
    embedded = run_evaluation(EvalConfig.model_validate(raw), progress=False)
    raw["eval"]["output"] = str(tmp_path / "kafka")
    config = EvalConfig.model_validate(raw)

    stop = threading.Event()
    workers = [
        threading.Thread(
            target=run_eval_worker,
            args=(config, "eval-generate"),
            kwargs={"candidate": name, "until": stop.is_set},
        )
        for name in ("base", "other")
    ]
    workers.append(
        threading.Thread(
            target=run_eval_worker, args=(config, "eval-assess"), kwargs={"until": stop.is_set}
        )
    )
    for worker in workers:
        worker.start()
    try:
        result = run_kafka_evaluation(config, progress=False)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers)

    for model in ("base", "other"):
        for benchmark in ("strongreject", "gsm8k"):
            mine = result.results["results"][model][benchmark]
            theirs = embedded.results["results"][model][benchmark]
            assert mine["figures"] == theirs["figures"], (model, benchmark)
            assert mine["counts"] == theirs["counts"]
            on_kafka, in_process = (
                sample_rows(out, model, benchmark) for out in (result.output, embedded.output)
            )
            assert [(r["prompt_id"], r["completion"]) for r in on_kafka] == [
                (r["prompt_id"], r["completion"]) for r in in_process
            ]
    comparison = result.results["results"]["other"]["strongreject"]["comparison"]
    assert comparison == embedded.results["results"]["other"]["strongreject"]["comparison"]

    # Everything is stored: running again publishes nothing and needs no worker.
    again = run_kafka_evaluation(config, progress=False)
    assert again.results["results"] == result.results["results"]


def test_a_generate_worker_needs_one_of_the_models(standin_models, tmp_path, bootstrap):
    config = EvalConfig.model_validate(
        {
            "eval": {"output": str(tmp_path / "out")},
            "models": {"guard": local_model(standin_models.judge)},
            "candidates": [{"name": "base", "model": "guard"}],
            "benchmarks": [{"name": "gsm8k", "limit": 1}],
            "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
            "kafka": kafka_section(bootstrap, "evalbus-bad"),
        }
    )
    with pytest.raises(EvalError, match="eval-generate needs one of the configuration's models"):
        run_eval_worker(config, "eval-generate", candidate="nobody")
