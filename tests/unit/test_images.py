"""The container image and its stand-in in the tests agree: the pods the tests start
(:data:`tests.support.kube_sandbox.PLATFORM_IMAGE`) get the entrypoint, working folder,
user and environment ``images/Dockerfile`` gives the image, and the chart runs the
user the image has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.support.kube_sandbox import PLATFORM_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def final_stage() -> list[str]:
    """The instructions of the Dockerfile's last stage, continuation lines joined."""
    text = (ROOT / "images" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from:]


def test_the_stand_in_runs_what_the_image_runs() -> None:
    stage = final_stage()
    (entrypoint,) = [line for line in stage if line.startswith("ENTRYPOINT ")]
    assert entrypoint == 'ENTRYPOINT ["unsafechain"]'
    assert Path(PLATFORM_IMAGE.entrypoint[0]).name == "unsafechain"
    (workdir,) = [line.split()[1] for line in stage if line.startswith("WORKDIR ")]
    assert PLATFORM_IMAGE.working_dir == workdir
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(line[4:] for line in stage if line.startswith("ENV ")))
    )
    for name, value in env.items():
        if name != "PATH":
            assert PLATFORM_IMAGE.env.get(name) == value, name


def test_the_chart_runs_the_images_user() -> None:
    (user,) = [line.split()[1] for line in final_stage() if line.startswith("USER ")]
    values = yaml.safe_load((ROOT / "charts" / "unsafechain" / "values.yaml").read_text())
    uid = values["security"]["runAsUser"]
    assert user == f"{uid}:{uid}"
