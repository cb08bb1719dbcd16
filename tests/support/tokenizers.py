"""Tiny real tokenizers made in a few milliseconds, for tests of chat templates."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unsafechain.training.templates import R1_ASSISTANT, R1_BOS, R1_EOS, R1_USER

R1_PAD = "<｜▁pad▁｜>"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# The published DeepSeek-R1-Distill template's handling of assistant turns, trimmed to
# what a single-turn conversation uses: everything up to </think> is dropped.
R1_DROPPING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "What does the probe ask? The probe reasons here first. The probe answers here.",
    "How do I bake bread? Let me think about flour, water and an oven.",
    "user assistant system think answer reasoning",
]


def _backend() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def r1_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the DeepSeek-R1-Distill special tokens and ``chat_template``."""
    backend = _backend()
    specials = [R1_BOS, R1_EOS, R1_PAD, R1_USER, R1_ASSISTANT]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=R1_BOS,
        eos_token=R1_EOS,
        pad_token=R1_PAD,
        chat_template=chat_template,
    )


def chatml_tokenizer(chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML turn tokens and ``chat_template``."""
    backend = _backend()
    specials = [CHATML_START, CHATML_END]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=CHATML_END,
        pad_token=CHATML_END,
        chat_template=chat_template,
    )
