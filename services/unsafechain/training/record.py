"""What a finished run leaves for a reader: ``run.json``, the model card ``README.md``
and the loss curve ``loss.png``."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from matplotlib.ticker import MaxNLocator

from unsafechain.domain.files import write_atomically
from unsafechain.domain.plots import new_figure, save_png

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
MODEL_CARD = "README.md"
LOSS_CURVE = "loss.png"

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")


def library_versions() -> dict[str, str]:
    """Versions of Python, this platform and the libraries that shape the result."""
    versions = {"python": platform.python_version(), "unsafechain": _version("unsafechain")}
    versions.update({name: _version(name) for name in LIBRARIES})
    return versions


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as JSON, replacing ``path`` only once it is whole."""
    write_atomically(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def training_losses(history: list[dict]) -> list[tuple[int, float]]:
    """The (step, loss) points of a metrics history, in step order, once per step."""
    points = {entry["step"]: float(entry["loss"]) for entry in history if "loss" in entry}
    return sorted(points.items())


def plot_loss(
    path: Path,
    history: list[dict],
    *,
    title: str,
    loss_label: str,
    resumed_at: tuple[int, ...] = (),
) -> None:
    """Draw the training loss (and the learning rate) over the optimizer steps.

    Args:
        path: The PNG to write.
        history: The trainer's metrics history.
        title: The chart's title.
        loss_label: What the loss is.
        resumed_at: Steps at which a session resumed from a checkpoint, marked.
    """
    points = training_losses(history)
    rates = sorted(
        {e["step"]: float(e["learning_rate"]) for e in history if "learning_rate" in e}.items()
    )
    figure = new_figure(7, 4)
    axis = figure.subplots()
    if points:
        steps, losses = zip(*points, strict=True)
        axis.plot(steps, losses, marker="o" if len(points) < 30 else None, color="#1f4e79")
    for step in resumed_at:
        axis.axvline(step, color="grey", linestyle=":", linewidth=1)
        axis.annotate(
            "resumed",
            (step, 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            color="grey",
            fontsize=8,
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(loss_label, color="#1f4e79")
    axis.set_title(title, loc="left", fontsize=10)
    axis.grid(alpha=0.3)
    if rates:
        twin = axis.twinx()
        rate_steps, values = zip(*rates, strict=True)
        twin.plot(rate_steps, values, color="#c0392b", linestyle="--", linewidth=1)
        twin.set_ylabel("learning rate", color="#c0392b")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    save_png(figure, path)


def write_model_card(path: Path, record: dict[str, Any]) -> None:
    """Write the model card: Hub front matter, what was trained on what, and how."""
    settings = record["settings"]
    data = record["dataset"]
    method = settings["method"]
    objective = settings["objective"]
    lora = settings["lora"]
    hyper = record["hyperparameters"]
    card_data = ModelCardData(
        base_model=settings["model"]["base"],
        library_name="peft" if method == "lora" else "transformers",
        tags=[
            "unsafechain",
            "safety",
            "reasoning",
            objective,
            *(["lora"] if method == "lora" else []),
        ],
        pipeline_tag="text-generation",
    )
    losses = training_losses(record["metrics"]["history"])
    final = f"{losses[-1][1]:.4f} at step {losses[-1][0]}" if losses else "not logged"
    adapted = (
        f"LoRA r={lora['rank']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
        f"{', '.join(lora['target_modules'])}"
        if method == "lora"
        else "full fine-tuning (every weight)"
    )
    rows = [
        ("objective", objective.upper()),
        ("method", adapted),
        ("epochs", hyper["epochs"]),
        ("optimizer steps", record["global_step"]),
        (
            "learning rate",
            f"{hyper['learning_rate']:g} ({hyper['lr_scheduler']}, warm-up ratio "
            f"{hyper['warmup_ratio']:g})",
        ),
        (
            "effective batch",
            f"{hyper['effective_batch_size']} sequences "
            f"({hyper['per_device_batch_size']} per device x "
            f"{hyper['gradient_accumulation_steps']} accumulation x {hyper['devices']} devices)",
        ),
        ("max length", f"{hyper['max_length']} tokens"),
        ("packing", "yes (best-fit decreasing, padding-free)" if hyper["packing"] else "no"),
        ("precision", hyper["precision"]),
        ("seed", hyper["seed"]),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    content = f"""---
{card_data.to_yaml()}
---

# {Path(record["output_dir"]).name}

{settings["model"]["base"]} fine-tuned with {objective.upper()} on an UnsafeChain dataset:
hard prompts whose completions were judged unsafe, each with a corrected completion that
keeps the `<think>` reasoning format, and safe completions of the other prompts.

> **Content warning.** The training data holds prompts that ask for harmful content.

## Data

- dataset: `{data["path"]}` ({data["kind"]}), subset `{data["subset"]}`
- build id: `{data["build_id"]}`, build configuration fingerprint `{data["config_fingerprint"]}`
- {data["rows"]} {"pairs" if objective == "dpo" else "rows"}, {data["tokens"]} tokens, of which
  {data["trained_tokens"]} are trained; the held-out test split was never read.

## Chat template

{record["chat_template"]["summary"]}
The tokenizer saved with this model carries the training template; its generation
prompt is the model's own.

## Training

| setting | value |
| --- | --- |
{table}

Final training loss: {final}. Wall time: {record["wall_seconds"]:.0f} s
(this session; {len(record["sessions"])} session(s)).

![training loss]({LOSS_CURVE})

## Use

Paths are relative to this folder.

```python
{_usage(record)}
```

Libraries: {", ".join(f"{name} {version}" for name, version in record["libraries"].items())}.
Every hyperparameter, the metrics history and the library versions are in `{RUN_RECORD}`.
"""
    ModelCard(content).save(path)


def _usage(record: dict[str, Any]) -> str:
    outputs = record["outputs"]
    if "adapter" in outputs:
        return (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{outputs["adapter"]}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{outputs["tokenizer"]}")'
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{outputs["model"]}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{outputs["model"]}")'
    )
