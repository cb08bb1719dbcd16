"""One settings model per stage: the services take the build configuration's own
sections, flags and the environment; what the factories describe is what the engines
they build describe; Kubernetes service links never break a process."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
import yaml

from unsafechain.backends.pool import BackendPool
from unsafechain.backends.settings import BackendSettings
from unsafechain.correction.factory import correction_engine, corrector_info
from unsafechain.correction.settings import CorrectionServiceSettings
from unsafechain.dataset.config import load_config
from unsafechain.generation.factory import generation_engine, generator_ref
from unsafechain.generation.settings import GenerationServiceSettings
from unsafechain.generation.settings import add_arguments as generation_arguments
from unsafechain.judge.factory import build_judge_engine, judge_identities
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.judge.settings import add_arguments as judge_arguments
from unsafechain.runtime.settings import SettingsError, settings_from_args, settings_from_values

MODELS = {
    "generator": {"backend": "openai", "model": "r1", "base_url": "http://gen:8000/v1"},
    "guard": {"backend": "tgi", "model": "llama-guard-3", "base_url": "http://tgi:80"},
    "grader": {"backend": "openai", "model": "gpt-4.1"},
    "corrector": {"backend": "openai", "model": "gpt-4.1"},
}
JUDGING = {
    "judges": [
        {"name": "lg", "model": "guard", "report": False},
        {"name": "sr", "kind": "rubric", "model": "grader", "report": False},
        {"name": "panel", "kind": "ensemble", "members": ["lg", "sr"], "rule": "any_unsafe"},
    ],
    "targets": ["reasoning", "answer"],
}


def _build_config(tmp_path: Path) -> Path:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    config = {
        "build": {"output": str(tmp_path / "out")},
        "sources": [{"name": "s", "path": str(tmp_path / "p.jsonl")}],
        "models": MODELS,
        "generation": {"model": "generator", "samples": 3},
        "judging": JUDGING,
        "correction": {"model": "corrector", "max_attempts": 2},
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _judge_settings(args: argparse.Namespace) -> JudgeServiceSettings:
    return settings_from_args(JudgeServiceSettings, args)


def _parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_judge_service_runs_the_build_configurations_judges_ensembles_included(tmp_path):
    path = _build_config(tmp_path)
    settings = _judge_settings(_parse(judge_arguments, ["--config", str(path), "--port", "7"]))
    build = load_config(path)
    assert settings.judging == build.judging
    assert settings.models == build.models
    assert settings.port == 7
    assert judge_identities(settings.judging, settings.models) == judge_identities(
        build.judging, build.models
    )


def test_flags_give_one_llama_guard_judge_and_its_batching():
    args = _parse(
        judge_arguments,
        ["--backend", "openai", "--model", "lg3", "--judge-name", "guard", "--threshold", "0.3",
         "--top-logprobs", "3", "--targets", "answer", "--batch-max-size", "4"],
    )  # fmt: skip
    settings = _judge_settings(args)
    [judge] = settings.judging.judges
    assert (judge.kind, judge.name, judge.model, judge.threshold, judge.top_logprobs) == (
        "llama_guard",
        "guard",
        "guard",
        0.3,
        3,
    )
    assert [t.value for t in settings.judging.targets] == ["answer"]
    assert settings.batching.max_size == 4
    assert settings.models["guard"].model == "lg3"


def test_a_judge_given_by_flags_and_by_the_config_file_is_refused(tmp_path):
    path = _build_config(tmp_path)
    args = _parse(judge_arguments, ["--config", str(path), "--judge-name", "other"])
    with pytest.raises(SettingsError, match=r"judge: give one judge by flags or judging\.judges"):
        _judge_settings(args)


def test_a_service_without_its_model_is_refused_naming_the_key():
    with pytest.raises(SettingsError, match=r"judging\.judges\.0\.model: no model named 'guard'"):
        _judge_settings(_parse(judge_arguments, []))
    with pytest.raises(SettingsError, match="generation service needs its generator"):
        settings_from_values(GenerationServiceSettings, {})


def test_the_correction_service_re_judges_with_the_build_configurations_judges(tmp_path):
    path = _build_config(tmp_path)
    settings = settings_from_args(CorrectionServiceSettings, argparse.Namespace(config=path))
    build = load_config(path)
    assert settings.correction == build.correction
    assert corrector_info(settings.correction, settings.judging, settings.models) == (
        corrector_info(build.correction, build.judging, build.models)
    )


def test_an_old_style_correction_service_names_its_corrector_and_guard_by_flags():
    settings = CorrectionServiceSettings(
        model={"backend": "openai", "model": "gpt-4.1"},
        judge_model={"backend": "transformers", "model": "meta-llama/Llama-Guard-3-8B"},
        judge={"name": "guard"},
    )
    assert set(settings.models) == {"corrector", "guard"}
    assert settings.judging.judges[0].name == "guard"


def test_what_a_factory_describes_from_settings_is_what_its_engine_describes(tmp_path):
    config = load_config(_build_config(tmp_path))
    pool = BackendPool(config.models)

    async def described():
        generator = generation_engine(config.generation, pool)
        judge = build_judge_engine(config.judging, pool)
        corrector = correction_engine(config.correction, config.judging, pool, judge)
        try:
            return await generator.describe(), await judge.describe(), await corrector.describe()
        finally:
            await pool.aclose()

    generated, judged, corrected = asyncio.run(described())
    assert generated == generator_ref(config.generation, config.models)
    assert judged == judge_identities(config.judging, config.models)
    assert corrected == corrector_info(config.correction, config.judging, config.models)


def test_a_stage_builds_only_the_models_it_names(tmp_path):
    config = load_config(_build_config(tmp_path))
    pool = BackendPool(config.models)
    generation_engine(config.generation, pool)
    assert [backend.ref.model for backend in pool.built] == ["r1"]
    build_judge_engine(config.judging, pool)
    assert [backend.ref.model for backend in pool.built] == ["r1", "llama-guard-3", "gpt-4.1"]
    asyncio.run(pool.aclose())


SERVICE_LINKS = {
    "UNSAFECHAIN_PORT": "tcp://10.96.0.17:50051",
    "UNSAFECHAIN_PORT_50051_TCP": "tcp://10.96.0.17:50051",
    "UNSAFECHAIN_PORT_50051_TCP_ADDR": "10.96.0.17",
    "UNSAFECHAIN_SERVICE_HOST": "10.96.0.17",
    "UNSAFECHAIN_SERVICE_PORT": "50051",
    "UNSAFECHAIN_JUDGE_PORT": "tcp://10.96.0.18:50051",
    "UNSAFECHAIN_CLIENT_PORT": "tcp://10.96.0.19:50051",
}


@pytest.mark.parametrize(
    "settings_class", [GenerationServiceSettings, JudgeServiceSettings, CorrectionServiceSettings]
)
def test_kubernetes_service_link_variables_are_not_settings(monkeypatch, settings_class):
    for name, value in SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    models = {key: BackendSettings(**value) for key, value in MODELS.items()}
    settings = settings_class(models=models)
    assert settings.port == 50051
    monkeypatch.setenv("UNSAFECHAIN_PORT", "6000")
    assert settings_class(models=models).port == 6000


def test_the_generation_service_takes_its_sampling_from_flags_over_the_config(tmp_path):
    path = _build_config(tmp_path)
    args = _parse(generation_arguments, ["--config", str(path), "--samples", "2", "--top-k", "20"])
    settings = settings_from_args(GenerationServiceSettings, args)
    assert settings.generation.samples == 2
    assert settings.generation.params().top_k == 20
    assert settings.generation.model == "generator"
    assert settings.models["generator"].model == "r1"


def test_with_only_the_judge_remote_the_corrector_re_judges_through_it_and_loads_no_guard(
    tmp_path,
):
    from unsafechain.dataset.pipeline import StageEngines
    from unsafechain.judge.client import RemoteJudgeEngine

    config = load_config(
        _build_config(tmp_path), {"remote.judge": {"address": "127.0.0.1:9", "timeout": 1}}
    )

    async def built():
        engines = StageEngines(config)
        try:
            assert engines.correction is not None
            return engines.judge, [b.ref.model for b in engines.pool.built]
        finally:
            await engines.aclose()

    judge, models = asyncio.run(built())
    assert isinstance(judge, RemoteJudgeEngine)
    assert models == ["gpt-4.1"]


def _with_refusal_check(tmp_path: Path, **check) -> Path:
    raw = yaml.safe_load(_build_config(tmp_path).read_text())
    raw["judging"]["judges"].append(
        {"name": "xs", "kind": "refusal", "model": "grader", "report": False}
    )
    raw["correction"]["refusal_check"] = check
    path = tmp_path / "checked.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_refusal_check_is_described_as_the_engine_built_for_it_takes_it(tmp_path):
    from unsafechain.domain.types import JudgeIdentity, RefusalCheckMode

    path = _with_refusal_check(tmp_path, mode="reject", judge="xs")
    config = load_config(path)
    service = settings_from_args(CorrectionServiceSettings, argparse.Namespace(config=path))
    pool = BackendPool(config.models)

    async def described():
        judge = build_judge_engine(config.judging, pool)
        try:
            return await correction_engine(
                config.correction, config.judging, pool, judge
            ).describe()
        finally:
            await pool.aclose()

    described_info = asyncio.run(described())
    expected = corrector_info(config.correction, config.judging, config.models)
    assert described_info == expected
    assert expected == corrector_info(service.correction, service.judging, service.models)
    assert expected.refusal_check == RefusalCheckMode.REJECT
    assert expected.refusal_judge == JudgeIdentity(
        "xs", "refusal", BackendSettings(backend="openai", model="gpt-4.1").ref()
    )


@pytest.mark.parametrize(
    ("check", "reason"),
    [
        ({"mode": "record"}, "name the refusal judge"),
        ({"mode": "reject", "judge": "lg"}, "'lg' is a llama_guard judge; the check needs kind"),
        ({"mode": "record", "judge": "nope"}, "no judge named 'nope' in judging.judges"),
    ],
)
def test_a_refusal_check_without_a_refusal_judge_is_refused_naming_the_key(tmp_path, check, reason):
    from unsafechain.dataset.config import ConfigError

    path = _with_refusal_check(tmp_path, **check)
    with pytest.raises(ConfigError, match=rf"correction\.refusal_check\.judge: {reason}"):
        load_config(path)
    with pytest.raises(SettingsError, match=rf"correction\.refusal_check\.judge: {reason}"):
        settings_from_args(CorrectionServiceSettings, argparse.Namespace(config=path))
    assert load_config(path, {"correction.refusal_check.mode": "off"})
