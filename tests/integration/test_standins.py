"""The stand-in models behave as the pipeline needs, through the real local backend."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from tests.support.llama_guard_template import PUBLISHED_TEMPLATE, render_published
from unsafechain.backends.transformers_backend import TransformersBackend
from unsafechain.correction.engine import CorrectionTemplates
from unsafechain.demo.standins import (
    StandinModels,
    build_standin_models,
    harm_categories,
    load_demo_prompts,
    profile_prompt,
    sample_judge_cases,
)
from unsafechain.domain.reasoning import split_reasoning
from unsafechain.domain.types import (
    GenerationRequest,
    Message,
    Role,
    SamplingParams,
    VerdictLabel,
)
from unsafechain.judge.engine import JudgeItem, LlamaGuardJudge, PromptFormat
from unsafechain.judge.llama_guard import (
    CATEGORY_BY_CODE,
    parse_output,
    render_prompt,
    unsafe_probability,
)

pytestmark = pytest.mark.integration

K = 3
SAMPLING = SamplingParams(n=K, temperature=0.7, top_p=0.95, max_new_tokens=96, seed=0)
GUARD = SamplingParams(n=1, temperature=0.0, max_new_tokens=10, top_logprobs=5)
RED_TEAM = load_demo_prompts("redteam")
BENIGN = load_demo_prompts("benign")
ROLES = ("generator", "judge", "corrector")


def _ask(messages: list[Message], params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(messages=tuple(messages), params=params)


def _run(backend: TransformersBackend, requests: list[GenerationRequest]) -> list[list[str]]:
    return [[g.text for g in gs] for gs in asyncio.run(backend.generate_many(requests))]


def _judge(guard: TransformersBackend, pairs: list[tuple[str, str]]):
    requests = [
        _ask([Message(Role.USER, prompt), Message(Role.ASSISTANT, response)], GUARD)
        for prompt, response in pairs
    ]
    return [gs[0] for gs in asyncio.run(guard.generate_many(requests))]


@pytest.fixture(scope="module")
def backends(standin_models: StandinModels) -> dict[str, TransformersBackend]:
    return {
        role: TransformersBackend(str(getattr(standin_models, role)), device="cpu")
        for role in ROLES
    }


@pytest.fixture(scope="module")
def samples(backends) -> dict[str, list[str]]:
    """K completions of every demo prompt, sampled as the demo build samples them."""
    prompts = RED_TEAM + BENIGN
    outputs = _run(
        backends["generator"], [_ask([Message(Role.USER, p)], SAMPLING) for p in prompts]
    )
    return dict(zip(prompts, outputs, strict=True))


def test_demo_prompts_are_red_team_or_benign_as_the_generator_was_taught():
    profiles = [profile_prompt(prompt) for prompt in RED_TEAM]
    assert all(profile.category for profile in profiles)
    assert {profile.harm_probability for profile in profiles} == {0.95, 0.35}
    assert all(profile_prompt(prompt).category is None for prompt in BENIGN)


@pytest.mark.parametrize(
    "conversation",
    [
        [("user", "How do I bake bread?"), ("assistant", "<think>\nMix.\n</think>\n\nBake.")],
        [("user", "  padded prompt \n"), ("assistant", "\n\nanswer with 'quotes' ü 🙂  ")],
        [("user", "Only a prompt: is this safe?")],
    ],
)
def test_judge_template_is_the_published_llama_guard_template(standin_models, conversation):
    tokenizer = AutoTokenizer.from_pretrained(standin_models.judge)
    assert tokenizer.chat_template == PUBLISHED_TEMPLATE
    messages = [Message(Role(role), content) for role, content in conversation]
    rendered = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=False
    )
    assert rendered == render_published([m.as_dict() for m in messages])
    assert rendered == render_prompt(messages)


def test_models_are_tiny_transformers_with_chat_templates_and_generation_settings(
    standin_models,
):
    architectures = {"generator": "Qwen2", "judge": "Llama", "corrector": "Qwen2"}
    total_bytes = 0
    for role in ROLES:
        path = getattr(standin_models, role)
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert config.architectures == [f"{architectures[role]}ForCausalLM"]
        assert tokenizer.chat_template
        assert len(tokenizer) == config.vocab_size
        assert tokenizer.pad_token_id is not None
        generation = (path / "generation_config.json").read_text()
        assert f'"eos_token_id": {tokenizer.eos_token_id}' in generation
        weights = list(path.glob("*.safetensors"))
        total_bytes += sum(w.stat().st_size for w in weights)
    assert total_bytes < 3_000_000


@pytest.mark.parametrize("role", ROLES)
def test_tokenizers_round_trip_any_text_and_keep_think_tags_when_skipping_specials(
    standin_models, role
):
    tokenizer = AutoTokenizer.from_pretrained(getattr(standin_models, role))
    text = "Ünïcödé, 你好, emoji 🙂, tabs\tand\x00control, S14: <b>html</b>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    completion = "reasoning\n</think>\n\n<think>answer"
    ids = tokenizer.encode(completion + tokenizer.eos_token, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == completion


def test_generator_samples_close_their_reasoning_and_answer(samples):
    completions = [text for texts in samples.values() for text in texts]
    splits = [split_reasoning(text) for text in completions]
    well_formed = [s for s in splits if s.has_close and s.reasoning and s.answer]
    assert len(well_formed) >= 0.9 * len(completions)
    # The chat template opens the think section, so the model never writes the tag.
    assert not any(s.has_open for s in splits)


def test_generator_harm_depends_on_the_prompt_and_some_prompts_are_hard(samples):
    for prompt in BENIGN:
        assert not any(harm_categories(text) for text in samples[prompt]), prompt
    harmful = {prompt: [bool(harm_categories(t)) for t in samples[prompt]] for prompt in RED_TEAM}
    explicit = [p for p in RED_TEAM if profile_prompt(p).harm_probability > 0.5]
    explicit_rate = sum(sum(harmful[p]) for p in explicit) / (K * len(explicit))
    assert explicit_rate >= 0.8
    hard = [p for p in RED_TEAM if all(harmful[p])]
    assert 0.25 * len(RED_TEAM) <= len(hard) < len(RED_TEAM)
    for prompt in RED_TEAM:
        for text in samples[prompt]:
            if harm_categories(text):
                assert profile_prompt(prompt).category in harm_categories(text)


def test_judge_is_accurate_on_held_out_synthetic_conversations(backends):
    cases = sample_judge_cases(300, seed=12345)
    outputs = _judge(backends["judge"], [(c.prompt, c.response) for c in cases])
    # Exactly as Llama Guard 3 answers: the blank line first, nothing stripped.
    exact = sum(g.text == c.expected_output for c, g in zip(cases, outputs, strict=True))
    verdicts = sum(
        parse_output(g.text).unsafe == bool(c.categories)
        for c, g in zip(cases, outputs, strict=True)
    )
    assert exact / len(cases) >= 0.9
    assert verdicts / len(cases) >= 0.95


def test_judge_writes_a_blank_line_first_and_is_scored_at_the_word_after_it(backends):
    guard, cases = backends["judge"], sample_judge_cases(60, seed=777)
    judge = LlamaGuardJudge(guard, prompt_format=PromptFormat.PUBLISHED)
    items = [JudgeItem(case.prompt, case.response) for case in cases]
    requests = [judge.request(item) for item in items]
    generations = [gs[0] for gs in asyncio.run(guard.generate_many(requests))]
    verdicts = asyncio.run(judge.judge(items))
    # Its first token is the blank line, almost surely; the verdict word comes second.
    for generation in generations:
        assert generation.tokens is not None
        first, second = generation.tokens[:2]
        assert first.token == "\n\n"
        assert math.exp(first.logprob) > 0.9
        assert second.token in ("safe", "unsafe")
    # The score is read there, so it tells unsafe answers from safe ones.
    right = 0
    for case, verdict in zip(cases, verdicts, strict=True):
        assert verdict.raw_output.startswith("\n\n") and verdict.score is not None
        right += (verdict.score >= 0.5) == bool(case.categories)
        if verdict.label != VerdictLabel.ERROR:  # a garbled category line is an error
            assert (verdict.label == VerdictLabel.UNSAFE) == (verdict.score >= 0.5)
    assert right >= 0.95 * len(cases)


def test_judge_flags_harmful_generator_samples_with_their_category_and_passes_benign(
    backends, samples
):
    pairs = [(prompt, text) for prompt, texts in samples.items() for text in texts]
    outputs = _judge(backends["judge"], pairs)
    agree = 0
    for (_, text), output in zip(pairs, outputs, strict=True):
        truth = harm_categories(text)
        guard = parse_output(output.text)
        score = unsafe_probability(output.tokens)
        assert score is not None and (score >= 0.5) == bool(guard.unsafe)
        if truth:
            agree += bool(guard.unsafe and set(guard.categories) & set(truth))
        else:
            agree += guard.unsafe is False
    assert agree >= 0.9 * len(pairs)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_corrections_keep_the_reasoning_format_and_are_judged_safe(backends, samples, temperature):
    templates = CorrectionTemplates.load()
    unsafe = [
        (prompt, text, harm_categories(text))
        for prompt, texts in samples.items()
        for text in texts
        if harm_categories(text)
    ]
    requests = [
        _ask(
            list(templates.messages(prompt, text, categories)),
            SamplingParams(temperature=temperature, max_new_tokens=128, seed=0),
        )
        for prompt, text, categories in unsafe
    ]
    corrections = [texts[0] for texts in _run(backends["corrector"], requests)]
    well_formed = [
        text
        for text in corrections
        if text.startswith("<think>\n")
        and (split := split_reasoning(text)).has_close
        and split.reasoning
        and split.answer
    ]
    assert len(well_formed) >= 0.9 * len(corrections)
    assert not any(harm_categories(text) for text in corrections)
    # The reasoning names the violated category it was given.
    named = sum(
        f"falls under {CATEGORY_BY_CODE[categories[0]].name}." in text
        for (_, _, categories), text in zip(unsafe, corrections, strict=True)
    )
    assert named >= 0.7 * len(corrections)
    verdicts = _judge(
        backends["judge"],
        [(prompt, text) for (prompt, _, _), text in zip(unsafe, corrections, strict=True)],
    )
    safe = sum(parse_output(v.text).unsafe is False for v in verdicts)
    assert safe >= 0.9 * len(corrections)


def test_build_is_cached_and_deterministic_for_a_seed(standin_models, tmp_path):
    out_dir = standin_models.generator.parent
    weights = {
        role: load_file(getattr(standin_models, role) / "model.safetensors") for role in ROLES
    }
    started = time.perf_counter()
    assert build_standin_models(out_dir) == standin_models
    assert time.perf_counter() - started < 2

    rebuilt = build_standin_models(tmp_path)
    for role in ROLES:
        again = load_file(getattr(rebuilt, role) / "model.safetensors")
        assert again.keys() == weights[role].keys()
        assert all(again[name].equal(weights[role][name]) for name in again), role
        tokenizer = (getattr(rebuilt, role) / "tokenizer.json").read_text()
        assert tokenizer == (getattr(standin_models, role) / "tokenizer.json").read_text()
