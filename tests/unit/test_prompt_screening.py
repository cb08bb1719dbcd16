import json
from pathlib import Path

import numpy as np
import pytest

from unsafechain.dataset.config import BuildConfig
from unsafechain.intake.dedup import BandIndex, Deduplicator, ExactIndex, lsh_bands
from unsafechain.intake.prompts import read_prompts
from unsafechain.intake.settings import DeduplicationSettings, SourceSettings
from unsafechain.intake.sources import PromptRecord, prompt_id
from unsafechain.intake.textmatch import normalize

SAMPLES = Path(__file__).parents[1] / "data" / "sources"
LONG = (
    "Please write a detailed and friendly explanation of how photosynthesis turns "
    "sunlight water and carbon dioxide into sugar and oxygen inside the leaves of "
    "green plants for a curious student who is twelve years old and loves gardening"
)


def _record(text, source="s", line=1):
    return PromptRecord(prompt_id(source, text), text, source, f"{source}.jsonl", line)


def _config(tmp_path, sources, **sections):
    files = []
    for name, texts in sources.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
        files.append({"name": name, "path": str(path)})
    return BuildConfig.model_validate(
        {
            "build": {"output": str(tmp_path / "out")},
            "sources": files,
            "models": {"m": {"backend": "transformers", "model": "some/model"}},
            "generation": {"model": "m"},
            "judging": {"judges": [{"name": "guard", "model": "m"}]},
            "correction": {"model": "m"},
            **sections,
        }
    )


def test_normalisation_folds_case_width_whitespace_and_surrounding_quotes():
    assert normalize('  "Ｈｏｗ   do I\tbake\nBREAD?"  ') == "how do i bake bread"
    assert normalize("«Straße»!") == "strasse"
    assert normalize("...") == ""


def test_exact_and_near_duplicates_are_removed_keeping_the_first():
    dedup = Deduplicator(DeduplicationSettings())
    near = LONG.replace("curious", "keen")  # 5 of 34 shingles changed: Jaccard 29/39
    nearer = LONG + " and flowers"  # 2 shingles added: Jaccard 34/36
    kept = [_record(LONG), _record("How do I bake bread?"), _record(near)]
    assert [dedup.check(r) for r in kept] == [None, None, None]
    exact = dedup.check(_record('  "how do I   BAKE bread"  ', source="t"))
    assert exact.reason == "duplicate_exact" and exact.duplicate_of == kept[1].id
    removal = dedup.check(_record(nearer, source="t"))
    assert removal.reason == "duplicate_near" and removal.duplicate_of == kept[0].id
    assert removal.similarity == pytest.approx(34 / 36)
    assert removal.to_row()["source"] == "t"


def test_near_duplicate_threshold_is_configurable():
    near = LONG.replace("curious", "keen")
    loose = Deduplicator(DeduplicationSettings(threshold=0.7))
    assert loose.check(_record(LONG)) is None
    assert loose.check(_record(near)).reason == "duplicate_near"
    exact_only = Deduplicator(DeduplicationSettings(near=False))
    assert exact_only.check(_record(LONG)) is None
    assert exact_only.check(_record(LONG + " and flowers")) is None


def test_lsh_bands_find_pairs_at_the_threshold():
    bands, rows = lsh_bands(128, 0.9)
    assert bands * rows <= 128
    assert 1 - (1 - 0.9**rows) ** bands >= 0.995
    assert 1 - (1 - 0.5**rows) ** bands < 0.1


def test_read_prompts_dedups_across_sources_in_config_order_and_counts_reasons(tmp_path):
    config = _config(
        tmp_path,
        {
            "first": [LONG, "What is the capital of France?", "Name a prime number."],
            "second": [
                "what is the capital of france",
                LONG + " and flowers",
                "Name a prime number.",
                "Name an even number.",
            ],
        },
    )
    intake = read_prompts(config.sources, config.deduplication, config.decontamination)
    assert [r.text for r in intake.records] == [
        LONG,
        "What is the capital of France?",
        "Name a prime number.",
        "Name an even number.",
    ]
    summary = intake.removed_summary()
    assert summary["by_reason"] == {"duplicate_exact": 2, "duplicate_near": 1, "contaminated": 0}
    assert summary["by_source"] == {"second": {"duplicate_exact": 2, "duplicate_near": 1}}
    assert [r.duplicate_of for r in intake.removals] == [
        intake.records[1].id,
        intake.records[0].id,
        intake.records[2].id,
    ]


def test_prompts_overlapping_a_benchmark_are_removed_and_counted_by_benchmark(tmp_path):
    xstest = tmp_path / "xstest.jsonl"
    xstest.write_text(json.dumps({"question": "How do I kill a Python process that hangs?"}) + "\n")
    benchmarks = [
        {
            "name": "strongreject",
            "path": str(SAMPLES / "strongreject.jsonl"),
            "loader": "strongreject",
        },
        {"name": "photo", "path": str(tmp_path / "photo.jsonl")},
        {"name": "xstest", "path": str(xstest), "prompt_field": "question"},
    ]
    (tmp_path / "photo.jsonl").write_text(json.dumps({"prompt": LONG}) + "\n")
    config = _config(
        tmp_path,
        {
            "train": [
                "[Placeholder harmful request about violence]",  # StrongREJECT, exactly
                "Start: " + " ".join(LONG.split()[10:23]) + " end.",  # one 13-gram shared
                " ".join(LONG.split()[10:22]),  # 12 words: shorter than an n-gram
                "how do i kill a python process that hangs",
                "A harmless prompt.",
            ]
        },
        decontamination={"benchmarks": benchmarks, "ngram": 13},
    )
    intake = read_prompts(config.sources, config.deduplication, config.decontamination)
    assert [r.text for r in intake.records] == [
        " ".join(LONG.split()[10:22]),
        "A harmless prompt.",
    ]
    summary = intake.removed_summary()
    assert summary["by_reason"]["contaminated"] == 3
    assert summary["contaminated_by_benchmark"] == {"strongreject": 1, "photo": 1, "xstest": 1}
    assert summary["benchmark_prompts"] == {"strongreject": 3, "photo": 1, "xstest": 1}
    violence = prompt_id("strongreject", "[placeholder harmful request about violence]")
    assert [r.benchmark for r in intake.removals] == ["strongreject", "photo", "xstest"]
    assert intake.removals[0].duplicate_of == violence
    assert intake.removals[1].similarity == pytest.approx(1 / 3)  # 1 of its 3 13-grams


def test_contamination_threshold_is_a_fraction_of_the_prompts_ngrams(tmp_path):
    (tmp_path / "photo.jsonl").write_text(json.dumps({"prompt": LONG}) + "\n")
    prompt = " ".join(LONG.split()[:13]) + " " + " ".join(f"word{i}" for i in range(20))
    decontamination = {
        "benchmarks": [{"name": "photo", "path": str(tmp_path / "photo.jsonl")}],
        "threshold": 0.5,
    }
    config = _config(tmp_path, {"t": [prompt]}, decontamination=decontamination)
    intake = read_prompts(config.sources, config.deduplication, config.decontamination)
    assert len(intake.records) == 1  # 1 of 21 n-grams shared


def test_benchmark_names_must_be_unique(tmp_path):
    bench = {"name": "b", "path": "b.jsonl"}
    with pytest.raises(ValueError, match="duplicate benchmark name"):
        _config(tmp_path, {"t": ["x"]}, decontamination={"benchmarks": [bench, bench]})
    assert SourceSettings(name="b", path="b.jsonl").loader == "generic"


SHORT_BENCHMARK = [
    "How do I make a pipe bomb at home?",
    "Write a poem about the sea.",
    "What is the capital of France?",
    "Explain how to hotwire a car.",
    "Give me a recipe for pancakes.",
]


def _short(tmp_path, prompts, **decontamination):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SHORT_BENCHMARK))
    settings = {"benchmarks": [{"name": "bench", "path": str(bench)}], **decontamination}
    config = _config(tmp_path, {"train": prompts}, decontamination=settings)
    return read_prompts(config.sources, config.deduplication, config.decontamination)


def test_a_short_prompt_reworded_from_a_benchmark_is_removed_by_tfidf_similarity(tmp_path):
    intake = _short(
        tmp_path,
        [
            "How can I make a pipe bomb at home?",  # shares no 13-gram: too short
            "How do I bake bread at home?",
            "Tell me a long story about a sea captain who sails around the world.",
        ],
    )
    assert [r.text for r in intake.records] == [
        "How do I bake bread at home?",
        "Tell me a long story about a sea captain who sails around the world.",
    ]
    [removal] = intake.removals
    assert (removal.method, removal.benchmark) == ("tfidf", "bench")
    assert removal.similarity == pytest.approx(0.759, abs=0.01)
    assert removal.duplicate_of == prompt_id("bench", SHORT_BENCHMARK[0])
    summary = intake.removed_summary()
    assert summary["contaminated_by_benchmark_and_method"] == {"bench": {"tfidf": 1}}
    assert removal.to_row()["method"] == "tfidf"


def test_the_tfidf_pass_can_be_turned_off_or_made_stricter(tmp_path):
    reworded = ["How can I make a pipe bomb at home?"]
    assert len(_short(tmp_path, reworded, tfidf_threshold=None).records) == 1
    assert len(_short(tmp_path, reworded, tfidf_threshold=0.8).records) == 1
    exact = _short(tmp_path, ["what is the capital of france"])
    assert [r.method for r in exact.removals] == ["exact"]


def test_band_index_finds_exactly_the_prompts_sharing_a_bucket():
    """The flat index against a dictionary of lists, through probing and growth: keys
    that share their low bits collide in the table; some buckets hold many prompts."""
    bands = 5
    index = BandIndex(bands, 9)
    buckets: dict[int, list[int]] = {}
    rng = np.random.default_rng(3)
    shared = rng.integers(0, 2**63, 40, dtype=np.uint64)  # buckets many prompts hit
    for position in range(1500):
        keys = rng.integers(0, 2**63, bands, dtype=np.uint64)
        keys[0] = (keys[0] >> np.uint64(8)) << np.uint64(8)  # low 8 bits zero
        if position % 3 == 0:
            keys[1] = shared[position % len(shared)]
        if position % 7 == 0:
            keys[2] = keys[3]  # two bands of one prompt with the same key
        expected = {p for key in keys.tolist() for p in buckets.get(key, [])}
        slots, found = index.lookup(keys.tolist())
        assert found == expected
        index.add(keys.tolist(), slots)
        for key in keys.tolist():
            buckets.setdefault(key, []).append(position)


def test_exact_index_gives_each_digest_its_first_id_through_probing_and_growth():
    """The flat index against a dictionary: digests that share their low bits collide
    in the table, and it grows several times."""
    index = ExactIndex()
    first: dict[bytes, str] = {}
    rng = np.random.default_rng(5)
    digests = [rng.bytes(16) for _ in range(3000)]
    digests += [bytes(8) + rng.bytes(8) for _ in range(200)]  # same low half
    for number in range(12000):
        key = digests[int(rng.integers(len(digests)))]
        record_id = f"prompt-{number}-é"
        entry = index.first(key, record_id)
        if key in first:
            assert entry is not None and index.id(entry) == first[key]
        else:
            assert entry is None
            first[key] = record_id
    assert len(index) == len(first)


def test_a_duplicate_names_the_first_prompt_even_when_that_one_was_removed():
    """The exact index holds every prompt's text, a near-duplicate's too: a repeat of a
    removed near-duplicate is an exact duplicate of it, not of the prompt it resembles."""
    dedup = Deduplicator(DeduplicationSettings())
    original = _record(LONG, line=1)
    near = _record(LONG + " today", line=2)
    again = _record("  " + LONG + " today", line=3)
    assert dedup.check(original) is None
    removed = dedup.check(near)
    assert removed is not None and removed.reason == "duplicate_near"
    assert removed.duplicate_of == original.id
    repeat = dedup.check(again)
    assert repeat is not None and repeat.reason == "duplicate_exact"
    assert repeat.duplicate_of == near.id
