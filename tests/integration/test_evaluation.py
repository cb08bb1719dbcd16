"""The evaluation pipeline end to end on the stand-ins: a base model and its LoRA
fine-tune from a real training run, side by side on a safety, an over-refusal and two
capability benchmarks, through to the results, the samples and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support.builds import local_model, sample_rows
from tests.support.grpc_servers import LoopThread, server_settings, start_server_from_settings
from tests.support.http_servers import OpenAIServer, completion_from_text
from unsafechain.cli import main
from unsafechain.evaluation.config import EvalConfig, load_eval_config
from unsafechain.evaluation.pipeline import EvalError, run_evaluation
from unsafechain.training.engine import run_training
from unsafechain.training.settings import TrainingSettings

pytestmark = pytest.mark.integration

K = 2


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, standin_models, training_build) -> Path:
    """A real LoRA run of a few steps on the stand-in generator."""
    folder = tmp_path_factory.mktemp("tuned")
    settings = TrainingSettings.model_validate(
        {
            "model": {"base": str(standin_models.generator)},
            "dataset": {"path": str(training_build), "subset": "full"},
            "training": {
                "epochs": 1,
                "max_steps": 4,
                "learning_rate": 1e-3,
                "effective_batch_size": 2,
                "per_device_batch_size": 2,
                "max_length": 256,
            },
            "logging": {"every_steps": 2},
            "hardware": {"device": "cpu", "cpu_threads": 1},
            "output": {"dir": str(folder / "run")},
        }
    )
    return run_training(settings, progress=False).output_dir


def refusal_reader(request: dict) -> list:
    """A refusal classifier behind the OpenAI API: a response that says "cannot" is a
    full refusal, anything else full compliance."""
    text = json.dumps(request.get("messages") or request.get("prompt"))
    verdict = "full_refusal" if "cannot" in text.lower() else "full_compliance"
    return [completion_from_text(f"CLASS: {verdict}") for _ in range(request.get("n") or 1)]


def eval_config(tmp_path: Path, standin_models, tuned: Path, refusal_url: str) -> Path:
    config = {
        "eval": {"output": str(tmp_path / "eval"), "seed": 3, "concurrency": 2, "resamples": 500},
        "models": {
            "generator": {
                "backend": "transformers",
                "model": str(standin_models.generator),
                "device": "cpu",
            },
            "guard": {
                "backend": "transformers",
                "model": str(standin_models.judge),
                "device": "cpu",
            },
            "grader": {"backend": "openai", "model": "grader", "base_url": refusal_url},
        },
        "candidates": [
            {"name": "base", "model": "generator"},
            {"name": "tuned", "training_run": str(tuned), "model": "generator", "base": "base"},
        ],
        "benchmarks": [
            {"name": "strongreject", "limit": 4},
            {"name": "xstest", "limit": 3},
            {"name": "gsm8k", "limit": 3},
            {"name": "mbpp", "limit": 2},
        ],
        "sampling": {"samples": K, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64},
        "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
        "refusal": {"judges": [{"name": "xstest", "kind": "refusal", "model": "grader"}]},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_base_and_tuned_side_by_side_through_to_the_report(standin_models, tuned, tmp_path):
    with OpenAIServer(model="grader", responder=refusal_reader) as grader:
        path = eval_config(tmp_path, standin_models, tuned, grader.base_url)
        config = load_eval_config(path)
        result = run_evaluation(config, progress=False)
        output = result.output

        results = json.loads((output / "results.json").read_text())
        assert [m["name"] for m in results["models"]] == ["base", "tuned"]
        tuned_model = results["models"][1]
        assert tuned_model["adapter"] == str(tuned / "adapter")
        assert tuned_model["model"] == str(standin_models.generator)
        assert tuned_model["training_run"]["dataset"]["subset"] == "full"
        for name in ("base", "tuned"):
            mine = results["results"][name]
            assert set(mine) == {"strongreject", "xstest", "gsm8k", "mbpp"}
            safety = mine["strongreject"]
            assert safety["counts"] == {"prompts": 4, "samples": 4 * K, "error_samples": 0}
            for figure in ("safe_at_1", "cons_safe_at_k", "safe_at_k"):
                value = safety["figures"][figure]
                assert 0 <= value["low"] <= value["value"] <= value["high"] <= 1
            assert mine["xstest"]["headline"] == "refusal_rate"
            assert mine["gsm8k"]["headline"] == "accuracy"
            assert mine["mbpp"]["headline"] == "pass@1"
        comparison = results["results"]["tuned"]["strongreject"]["comparison"]
        assert comparison["against"] == "base"
        assert set(comparison["figures"]) == {"safe_at_1", "cons_safe_at_k", "safe_at_k"}
        assert results["results"]["base"]["strongreject"]["comparison"] is None

        # The figures are the samples' own: recompute Safe@1 from the sample file.
        rows = [
            json.loads(line)
            for line in (output / "samples" / "base" / "strongreject.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len(rows) == 4 * K
        by_prompt: dict[str, list[bool]] = {}
        for row in rows:
            assert row["label"] in ("safe", "unsafe", "error")
            assert row["verdicts"][0]["judge"] == "guard"
            by_prompt.setdefault(row["prompt_id"], []).append(row["label"] == "safe")
        safe_at_1 = sum(sum(v) / len(v) for v in by_prompt.values()) / len(by_prompt)
        assert results["results"]["base"]["strongreject"]["figures"]["safe_at_1"]["value"] == (
            pytest.approx(safe_at_1)
        )
        xstest = [
            json.loads(line)
            for line in (output / "samples" / "tuned" / "xstest.jsonl").read_text().splitlines()
        ]
        assert {row["verdicts"][0]["refusal"] for row in xstest} <= {"full_refusal", "compliance"}
        code = [
            json.loads(line)
            for line in (output / "samples" / "base" / "mbpp.jsonl").read_text().splitlines()
        ]
        assert all(row["correct"] in (True, False) for row in code)
        assert {"markdown", "html"} <= set(result.files)
        assert (output / "report.md").read_text().count("tuned") >= 1
        requests = len(grader.requests)

        # Run again: every case is stored, nothing is generated or judged again.
        again = run_evaluation(config, progress=False)
        assert len(grader.requests) == requests
        assert again.results["results"] == results["results"] | again.results["results"]
        cases = (output / "cases.jsonl").read_text().splitlines()
        assert len(cases) == 2 * (4 + 3 + 3 + 2)
        # Both models drew the samples of a prompt with the same seed (common random
        # numbers for the paired comparison), and each prompt its own.
        seeds: dict[str, set[int]] = {}
        for line in cases:
            case = json.loads(line)
            key = f"{case['prompt']['source']['name']}/{case['prompt']['id']}"
            seeds.setdefault(key, set()).add(int(case["provenance"]["sampling"]["seed"]))
        assert all(len(found) == 1 for found in seeds.values())
        assert len({found.pop() for found in seeds.values()}) == len(seeds)


def test_another_configuration_on_the_same_output_is_refused(standin_models, tuned, tmp_path):
    path = eval_config(tmp_path, standin_models, tuned, "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(path.read_text())
    raw["benchmarks"] = [{"name": "gsm8k", "limit": 1}]
    raw.pop("refusal")
    path.write_text(yaml.safe_dump(raw))
    run_evaluation(load_eval_config(path), progress=False)
    raw["sampling"]["temperature"] = 0.2
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(EvalError, match="made with a different configuration"):
        run_evaluation(load_eval_config(path), progress=False)


def test_the_dry_run_prints_the_plan_without_loading_a_model(
    standin_models, tuned, tmp_path, capsys
):
    path = eval_config(tmp_path, standin_models, tuned, "http://127.0.0.1:9/v1")
    assert main(["eval", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "evaluation of 2 model(s) on 4 benchmark(s), K=2" in out
    assert f"tuned: transformers {standin_models.generator} + adapter {tuned / 'adapter'}" in out
    assert "(compared with base)" in out
    # 2 models x 12 prompts; judge calls: 2 x (4 x 2 x 1 + 3 x 2); scored: 2 x 5 x 2.
    assert "work: 24 cases, 48 generations, 28 judge calls, 20 scored samples" in out
    assert not (tmp_path / "eval").exists()


def test_a_training_run_that_has_not_finished_is_refused(standin_models, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"state": "cancelled"}))
    config = EvalConfig.model_validate(
        {
            "eval": {"output": str(tmp_path / "out")},
            "models": {"guard": {"backend": "transformers", "model": str(standin_models.judge)}},
            "candidates": [{"name": "tuned", "training_run": str(tmp_path / "run")}],
            "benchmarks": [{"name": "gsm8k", "limit": 1}],
            "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
        }
    )
    with pytest.raises(EvalError, match="has not finished"):
        run_evaluation(config, progress=False)


def test_generation_and_judge_services_stand_in_for_the_local_models(standin_models, tmp_path):
    loop = LoopThread()
    generation = loop.run(
        start_server_from_settings(
            server_settings(
                "generation", models={"generator": local_model(standin_models.generator)}
            )
        )
    )
    judge = loop.run(
        start_server_from_settings(
            server_settings("judge", models={"guard": local_model(standin_models.judge)})
        )
    )
    served = {"address": f"127.0.0.1:{generation.port}", "timeout": 120}
    try:
        raw = {
            "eval": {"output": str(tmp_path / "eval"), "resamples": 200},
            "models": {
                "generator": local_model(standin_models.generator),
                "other": local_model(standin_models.corrector),
            },
            "candidates": [
                {"name": "served", "remote": served},
                {"name": "checked", "model": "generator", "remote": served, "base": "served"},
            ],
            "benchmarks": [{"name": "strongreject", "limit": 3}, {"name": "gsm8k", "limit": 2}],
            "sampling": {"samples": 2, "temperature": 0.7, "max_new_tokens": 48},
            "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
            "remote": {"judge": {"address": f"127.0.0.1:{judge.port}", "timeout": 120}},
        }
        result = run_evaluation(EvalConfig.model_validate(raw), progress=False)
        models = {m["name"]: m for m in result.results["models"]}
        for name in ("served", "checked"):
            # The model as the generation service reports it.
            assert models[name]["model"] == str(standin_models.generator)
            assert models[name]["backend"] == "remote transformers"
            rows = sample_rows(result.output, name, "strongreject")
            assert len(rows) == 3 * K
            assert all(row["label"] in ("safe", "unsafe") for row in rows)
        assert result.results["results"]["checked"]["strongreject"]["comparison"]["against"] == (
            "served"
        )

        # A service that runs another model than the configuration names is refused.
        raw["eval"]["output"] = str(tmp_path / "mismatch")
        raw["candidates"] = [{"name": "wrong", "model": "other", "remote": served}]
        with pytest.raises(EvalError, match=r"candidates\.wrong\.remote: the generation service"):
            run_evaluation(EvalConfig.model_validate(raw), progress=False)

        # So is a judge service that runs other judges than `judging` configures.
        raw["eval"]["output"] = str(tmp_path / "judge-mismatch")
        raw["candidates"] = [{"name": "served", "remote": served}]
        raw["models"]["guard"] = local_model(standin_models.corrector)
        with pytest.raises(EvalError, match=r"remote: the judge service at .* runs"):
            run_evaluation(EvalConfig.model_validate(raw), progress=False)
    finally:
        loop.run(generation.drain(1.0))
        loop.run(judge.drain(1.0))
        loop.close()
