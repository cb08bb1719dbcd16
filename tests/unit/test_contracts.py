from pathlib import Path

from google.protobuf import json_format

from unsafechain.domain.convert import (
    sampling_from_pb,
    sampling_to_pb,
    verdict_from_pb,
    verdict_to_pb,
)
from unsafechain.domain.types import (
    JudgeIdentity,
    JudgeTarget,
    ModelRef,
    RefusalClass,
    SamplingParams,
    Verdict,
    VerdictLabel,
)
from unsafechain.v1 import (
    case_pb2,
    correction_pb2,
    correction_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

ROOT = Path(__file__).parents[2]


def test_each_service_is_defined_with_its_rpcs():
    services = {
        "GenerationService": generation_pb2_grpc,
        "JudgeService": judge_pb2_grpc,
        "CorrectionService": correction_pb2_grpc,
        "TrainingService": training_pb2_grpc,
    }
    for name, module in services.items():
        assert hasattr(module, f"{name}Stub")
        assert hasattr(module, f"{name}Servicer")
    methods = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].methods_by_name
    assert set(methods) == {"Judge", "JudgeBatch", "Info"}
    for module, name in (
        (generation_pb2, "GenerationService"),
        (correction_pb2, "CorrectionService"),
    ):
        assert "Info" in module.DESCRIPTOR.services_by_name[name].methods_by_name
    watch = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].methods_by_name[
        "WatchTrainingRun"
    ]
    assert watch.server_streaming


def test_verdict_and_sampling_survive_the_round_trip_through_protobuf():
    verdict = Verdict(
        JudgeIdentity("guard", "llama_guard", ModelRef("openai", "m", "http://h/v1")),
        JudgeTarget.REASONING,
        VerdictLabel.UNSAFE,
        ("S1", "S10"),
        0.75,
        "unsafe\nS1,S10",
    )
    assert verdict_from_pb(verdict_to_pb(verdict)) == verdict
    no_score = Verdict(JudgeIdentity("g", "llama_guard"), JudgeTarget.FULL, VerdictLabel.ERROR)
    assert verdict_from_pb(verdict_to_pb(no_score)) == no_score
    refused = Verdict(
        JudgeIdentity("xstest", "refusal"),
        JudgeTarget.ANSWER,
        VerdictLabel.SAFE,
        refusal=RefusalClass.PARTIAL_REFUSAL,
    )
    assert verdict_from_pb(verdict_to_pb(refused)) == refused
    params = SamplingParams(n=5, temperature=0.5, top_p=0.9, top_k=40, max_new_tokens=64, seed=3)
    assert sampling_from_pb(sampling_to_pb(params)) == params


def test_case_serialises_to_json_and_back():
    case = case_pb2.Case(id="c1", prompt=case_pb2.Prompt(id="c1", text="hi"))
    case.completions.add(index=0, text="t", label=case_pb2.VERDICT_LABEL_SAFE)
    data = json_format.MessageToDict(case, preserving_proto_field_name=True)
    assert json_format.ParseDict(data, case_pb2.Case()) == case
