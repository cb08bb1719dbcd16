"""Preparing a run's inputs as the trainers take them: the tokenizer with the training
chat template, the conversations or pairs as a ``datasets.Dataset``, the counts of rows,
sequences and tokens, and the LoRA target modules checked against the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer
from trl.data_utils import common_prefix_length, pack_dataset

from unsafechain.domain.settings import SetupError
from unsafechain.training.data import TrainingData
from unsafechain.training.settings import TrainingSettings
from unsafechain.training.templates import (
    TrainingTemplate,
    choose_training_template,
    trained_tokens,
)


def load_training_tokenizer(settings: TrainingSettings) -> tuple[Any, TrainingTemplate]:
    """The model's tokenizer with the training chat template in place of its own."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            settings.model.base, revision=settings.model.revision
        )
    except (OSError, ValueError) as error:
        raise SetupError(
            f"model.base: cannot load the tokenizer of {settings.model.base}: {error}"
        ) from None
    template = choose_training_template(
        tokenizer, configured=settings.model.chat_template, model_name=settings.model.base
    )
    tokenizer.chat_template = template.template
    if tokenizer.pad_token is None:
        # Padding positions carry no loss; the end-of-turn token is as good as any.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def sft_dataset(data: TrainingData) -> datasets.Dataset:
    """The rows as TRL's conversational language-modeling dataset (``messages``)."""
    return datasets.Dataset.from_list([{"messages": row.messages()} for row in data.rows])


def dpo_dataset(data: TrainingData) -> datasets.Dataset:
    """The pairs as TRL's conversational preference dataset (``prompt``, ``chosen``,
    ``rejected``)."""
    return datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": pair.prompt}],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
            for pair in data.pairs
        ]
    )


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """What the training sequences hold.

    Attributes:
        rows: Rows (pairs) that reach training: those with a trained token left after
            the cut at ``max_length``.
        sequences: Training sequences (packed blocks with packing; for DPO the pairs).
        tokens: Tokens in them (for DPO: prompt, chosen and rejected).
        trained_tokens: Tokens the loss covers (for DPO: the chosen and rejected ones).
    """

    rows: int
    sequences: int
    tokens: int
    trained_tokens: int


def sft_counts(rows: int, prepared: datasets.Dataset) -> TokenCounts:
    """Counts of a prepared SFT dataset (``input_ids`` and ``labels`` columns)."""
    tokens = trained = 0
    for example in prepared.select_columns(["input_ids", "labels"]):
        tokens += len(example["input_ids"])
        trained += sum(1 for label in example["labels"] if label != -100)
    return TokenCounts(rows, len(prepared), tokens, trained)


def count_sft_rows(tokenizer: Any, data: TrainingData, settings: TrainingSettings) -> TokenCounts:
    """Counts of the SFT sequences, prepared as the trainer prepares them: rendered
    with the training template, cut at ``max_length``, rows without a trained token
    left out, packed when asked."""
    max_length, packing = settings.training.max_length, settings.training.packing
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for row in data.rows:
        ids, mask = trained_tokens(tokenizer, row.messages())
        if not packing:
            # Packing (best-fit decreasing) cuts each row at max_length itself, and
            # keeps a row left without a trained token.
            ids, mask = ids[:max_length], mask[:max_length]
            if 1 not in mask:
                continue
        columns["input_ids"].append(ids)
        columns["labels"].append([i if m else -100 for i, m in zip(ids, mask, strict=True)])
    prepared = datasets.Dataset.from_dict(columns)
    rows = len(prepared)
    if packing and rows:
        prepared = pack_dataset(prepared, max_length, "bfd")
    return sft_counts(rows, prepared)


def dpo_counts(prepared: datasets.Dataset, max_length: int) -> TokenCounts:
    """Counts of a prepared DPO dataset (``prompt_ids``, ``chosen_ids``, ``rejected_ids``),
    each side cut at ``max_length`` with its prompt, as the collator cuts it."""
    tokens = trained = 0
    for example in prepared:
        prompt = len(example["prompt_ids"])
        for side in ("chosen_ids", "rejected_ids"):
            length = min(prompt + len(example[side]), max_length)
            tokens += length
            trained += max(length - prompt, 0)
    return TokenCounts(len(prepared), len(prepared), tokens, trained)


def count_dpo_pairs(tokenizer: Any, data: TrainingData, max_length: int) -> TokenCounts:
    """Counts of the DPO pairs, tokenized as the trainer tokenizes them."""
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for pair in data.pairs:
        prompt_messages = [{"role": "user", "content": pair.prompt}]
        prompt = tokenizer.apply_chat_template(
            prompt_messages, tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"]
        sides = [
            tokenizer.apply_chat_template(
                [*prompt_messages, {"role": "assistant", "content": text}],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
            for text in (pair.chosen, pair.rejected)
        ]
        shared = min(common_prefix_length(prompt, side) for side in sides)
        if shared >= max_length:
            continue
        columns["prompt_ids"].append(prompt[:shared])
        columns["chosen_ids"].append(sides[0][shared:])
        columns["rejected_ids"].append(sides[1][shared:])
    return dpo_counts(datasets.Dataset.from_dict(columns), max_length)


def trainable_parameters(model: torch.nn.Module, settings: TrainingSettings) -> int:
    """The parameters the run trains: every one, or the LoRA adapter's, refusing LoRA
    target modules the model lacks.

    Raises:
        SetupError: A target module is not a linear module of the model.
    """
    if settings.method != "lora":
        return sum(p.numel() for p in model.parameters())
    wanted = set(settings.lora.target_modules)
    found: set[str] = set()
    trainable = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in wanted and isinstance(module, torch.nn.Linear):
            found.add(leaf)
            trainable += settings.lora.rank * (module.in_features + module.out_features)
    missing = sorted(wanted - found)
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise SetupError(
            f"lora.target_modules: {', '.join(missing)} not in the model; its linear modules "
            f"are {', '.join(linear)}"
        )
    return trainable
