"""Local ``transformers`` models: the model's own chat template, batched sampling,
token log-probabilities."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from unsafechain.backends.base import BackendError, BackendUnavailable, ModelBackend
from unsafechain.domain.reasoning import THINK_OPEN
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    ModelRef,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

# Held around every local generate call; see TransformersBackend.
_SAMPLING_LOCK = threading.Lock()
# Loading a model switches process-wide state (weights are first made on the meta
# device), so two threads loading at once break each other's models.
_LOADING_LOCK = threading.Lock()


class TransformersBackend(ModelBackend):
    """A causal LM loaded in this process.

    Calls run on a daemon thread, so the event loop stays free and a process that is
    shutting down never waits on one; :meth:`aclose` stops a call in
    progress at its next token (it fails; nothing cut short is returned). One call runs
    at a time
    across every local model of the process: sampling draws from torch's global
    random generator, so a seeded call is reproducible only if no other model
    samples in between. ``generate_many`` batches requests with the same sampling
    settings into one padded forward pass.

    Texts are encoded without the tokenizer's special tokens, raw prompts and
    chat-template renderings alike: both hold every special token the model is to
    see (a chat template writes the BOS itself), and a Llama tokenizer would put a
    second BOS before the first.

    Args:
        model: Hub name or local path.
        device: ``cpu``, ``cuda``, ``cuda:1`` …; ``auto`` picks CUDA when present.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_batch_size: Upper bound on sequences in one forward pass.
        adapter: A LoRA adapter folder merged into the model at load.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        adapter: str | None = None,
    ):
        self._name = model
        self._adapter = adapter
        self._closing = threading.Event()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._max_batch_size = max_batch_size
        # transformers annotates loaded tokenizers and models as unions of their classes
        # and their outputs as unions of output types; these are causal LMs.
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        with _LOADING_LOCK:
            # A training run saves its tokenizer (with the training template) beside its
            # adapter; generation renders prompts with the model's own template.
            self._tokenizer: Any = AutoTokenizer.from_pretrained(model)
            loaded: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
            if adapter is not None:
                loaded = _with_adapter(loaded, adapter, len(self._tokenizer))
            self._model: Any = loaded.to(self._device).eval()
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._encoder = _batch_encoder(self._tokenizer)
        forward = inspect.signature(self._model.forward).parameters
        self._one_logit = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        # Token id -> its text, for the log-probability alternatives: a judgment lists
        # a few hundred, and decoding each one every time cost 5% of a judge batch.
        # At most one entry per vocabulary token.
        self._pieces: dict[int, str] = {}
        # Whether this model's key/value cache can be repeated across a batch (see
        # _with_shared_prefix); None until a shared prefix was first tried.
        self._prefix_cache_repeatable: bool | None = None
        logger.info(
            "loaded %s%s on %s", model, f" with adapter {adapter}" if adapter else "", self._device
        )

    @property
    def ref(self) -> ModelRef:
        return ModelRef(backend="transformers", model=self._name, adapter=self._adapter or "")

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tokenizer.chat_template)

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self._tokenizer

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        return (await self.generate_many([request]))[0]

    async def generate_each(
        self, requests: list[GenerationRequest]
    ) -> list[list[Generation] | BackendError]:
        """The requests batched into padded forward passes. A request that cannot be
        rendered or is longer than the model's context fails alone; a forward pass that
        fails fails every request in it."""
        if not requests:
            return []
        return await _WORKER.run(self._generate_sync, list(requests))

    @property
    def context_length(self) -> int | None:
        """The most tokens the model takes, prompt and completion together, if known."""
        return getattr(self._model.config, "max_position_embeddings", None)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this model."""
        return len(self._encode([text])[0])

    def token_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids the model is given for ``request``."""
        return self._encode([self.render(request)])[0]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # The texts hold their special tokens already (see the class docstring).
        if self._encoder is not None:
            return [
                encoding.ids
                for encoding in self._encoder.encode_batch_fast(texts, add_special_tokens=False)
            ]
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _left_padded(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``rows``, padded on the left to the
        longest (``generate`` appends new tokens on the right of every row)."""
        return self._tensors(_laid_out(rows, 0, self._tokenizer.pad_token_id))

    def _tensors(self, layout: tuple[list[list[int]], list[list[int]]]) -> dict[str, torch.Tensor]:
        ids, mask = layout
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self._device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self._device),
        }

    def _with_shared_prefix(self, rows: Sequence[list[int]], samples: int) -> dict[str, Any] | None:
        """``generate``'s inputs for ``rows`` with the key/value cache of the tokens
        they all begin with computed once, or None where they share too few.

        Every Llama Guard request begins with the same task line and category list
        (about 170 of a judgment's 210 tokens); a padded batch would compute them once
        per row. Here they are run once, their cache is repeated for every row (and
        sample), and each row is laid out as the prefix, its padding, then the rest of
        its tokens, with an attention mask that skips the padding: the positions
        ``generate`` derives from the mask run on from the prefix, so each row sees
        what it would alone. Only the float sums' order differs (scores agree to about
        1e-6).
        """
        if len(rows) < 2 or self._prefix_cache_repeatable is False:
            return None
        shared = _shared_prefix_length(rows)
        if shared < _SHARED_PREFIX_MIN:
            return None
        with torch.inference_mode():
            prefix = torch.tensor([rows[0][:shared]], dtype=torch.long, device=self._device)
            # Only the cache is wanted: the logits of one position, not of all of them
            # (for a large vocabulary the output layer is a real share of the pass).
            cache = self._model(input_ids=prefix, use_cache=True, **self._one_logit).past_key_values
        # Known only once the model has made a cache; remembered, so a model whose
        # cache cannot be repeated spends at most this one prefix pass.
        self._prefix_cache_repeatable = hasattr(cache, "batch_repeat_interleave")
        if not self._prefix_cache_repeatable:
            logger.info("%s: its key/value cache cannot be repeated; no shared prefix", self._name)
            return None
        cache.batch_repeat_interleave(len(rows) * samples)
        inputs: dict[str, Any] = self._tensors(
            _laid_out(rows, shared, self._tokenizer.pad_token_id)
        )
        inputs["past_key_values"] = cache
        return inputs

    def _check_fits(self, tokens: int) -> None:
        context = self.context_length
        if context is not None and tokens >= context:
            raise BackendError(
                f"{self._name}: the prompt is {tokens} tokens, the model's context is "
                f"{context}; it is not sent"
            )

    def render(self, request: GenerationRequest) -> str:
        """The exact text the model is given for ``request``: the raw prompt as it is,
        or the conversation rendered with the model's chat template."""
        if request.prompt is not None:
            return request.prompt
        if not self.has_chat_template:
            raise BackendError(f"{self._name} has no chat template; send a rendered prompt")
        messages = request.messages or ()
        return self._tokenizer.apply_chat_template(
            [m.as_dict() for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )

    def _generate_sync(
        self, requests: list[GenerationRequest]
    ) -> list[list[Generation] | BackendError]:
        self._refuse_if_closing()
        results: list[list[Generation] | BackendError | None] = [None] * len(requests)
        texts: dict[int, str] = {}
        for position, request in enumerate(requests):
            try:
                texts[position] = self.render(request)
            except BackendError as error:
                results[position] = error
        # One tokenizer call for the whole batch: it both checks the lengths and gives
        # the ids the forward passes use.
        token_ids = dict(zip(texts, self._encode(list(texts.values())), strict=True))
        groups: dict[SamplingParams, list[int]] = {}
        for position, ids in token_ids.items():
            try:
                self._check_fits(len(ids))
            except BackendError as error:
                results[position] = error
                continue
            groups.setdefault(requests[position].params, []).append(position)
        with _SAMPLING_LOCK:
            for params, positions in groups.items():
                per_call = max(1, self._max_batch_size // params.n)
                for start in range(0, len(positions), per_call):
                    chunk = positions[start : start + per_call]
                    outputs: list[list[Generation]] | BackendError
                    try:
                        outputs = self._run(
                            [texts[p] for p in chunk], [token_ids[p] for p in chunk], params
                        )
                    except BackendError as error:
                        outputs = error
                    for index, p in enumerate(chunk):
                        results[p] = (
                            outputs if isinstance(outputs, BackendError) else outputs[index]
                        )
        return [result for result in results if result is not None]

    def _run(
        self, texts: Sequence[str], token_ids: Sequence[list[int]], params: SamplingParams
    ) -> list[list[Generation]]:
        if params.greedy and params.n > 1:
            # Greedy samples are all the same sequence: decode it once.
            once = self._run(texts, token_ids, dataclasses.replace(params, n=1))
            return [samples * params.n for samples in once]
        encoded = self._with_shared_prefix(token_ids, params.n) or self._left_padded(token_ids)
        # New tokens are capped so that the prompt and its completion fit the model's
        # context; a capped completion ends with finish reason "length".
        max_new_tokens = params.max_new_tokens
        context = self.context_length
        if context is not None:
            max_new_tokens = min(max_new_tokens, context - encoded["input_ids"].shape[1])
        if params.seed is not None:
            torch.manual_seed(params.seed)
        # top_k is always passed: left out, transformers samples from the 50 most likely
        # tokens (its default, or whatever the model's generation config says); 0 is off.
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
            }
        )
        with torch.inference_mode():
            output = self._model.generate(
                **encoded,
                **sampling,
                max_new_tokens=max_new_tokens,
                num_return_sequences=params.n,
                stop_strings=list(params.stop) or None,
                tokenizer=self._tokenizer if params.stop else None,
                return_dict_in_generate=True,
                stopping_criteria=StoppingCriteriaList([_WhenSet(self._closing)]),
                output_logits=params.top_logprobs > 0,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        # A call stopped by aclose() is cut short: it fails rather than look finished.
        self._refuse_if_closing()
        prompt_length = encoded["input_ids"].shape[1]
        new_tokens = output.sequences[:, prompt_length:]
        step_logprobs = (
            torch.stack(output.logits, dim=1).float().log_softmax(dim=-1)
            if params.top_logprobs > 0
            else None
        )
        eos_ids = self._eos_ids()
        generations = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            length, finish_reason = len(ids), "length"
            for position, token_id in enumerate(ids):
                if token_id in eos_ids:
                    length, finish_reason = position, "stop"
                    break
            text = self._tokenizer.decode(ids[:length], skip_special_tokens=True)
            if params.stop and finish_reason == "length":
                for stop in params.stop:
                    if stop in text:
                        text, finish_reason = text[: text.index(stop)], "stop"
            tokens = None
            if step_logprobs is not None:
                tokens = self._token_logprobs(ids[:length], step_logprobs[row], params.top_logprobs)
            # The prompt of every row: its text ends inside an open think section when
            # the chat template opens one (R1-distill's ends with "<think>\\n").
            opens_think = texts[row // params.n].rstrip().endswith(THINK_OPEN)
            generations.append(
                Generation(
                    text=text,
                    finish_reason=finish_reason,
                    tokens=tokens,
                    prompt_opens_think=opens_think,
                )
            )
        return [generations[i : i + params.n] for i in range(0, len(generations), params.n)]

    def _token_logprobs(
        self, ids: list[int], logprobs: torch.Tensor, top_k: int
    ) -> tuple[TokenLogprob, ...]:
        top_values, top_ids = logprobs[: len(ids)].topk(min(top_k, logprobs.shape[-1]), dim=-1)
        result = []
        for position, token_id in enumerate(ids):
            alternatives = tuple(
                (self._piece(t), float(v))
                for t, v in zip(
                    top_ids[position].tolist(), top_values[position].tolist(), strict=True
                )
            )
            result.append(
                TokenLogprob(
                    self._piece(token_id), float(logprobs[position, token_id]), alternatives
                )
            )
        return tuple(result)

    def _piece(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = piece
        return piece

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    def _refuse_if_closing(self) -> None:
        if self._closing.is_set():
            raise BackendUnavailable(f"{self._name} is shutting down")

    async def aclose(self) -> None:
        """Stop a call in progress at its next token and refuse new ones."""
        self._closing.set()
        del self._model


_SHARED_PREFIX_MIN = 32
"""The fewest tokens a batch's rows must share for their cache to be computed once."""


def _shared_prefix_length(rows: Sequence[list[int]]) -> int:
    """How many tokens every row begins with, leaving each row at least one of its own
    (the one whose logits give the first new token)."""
    first = rows[0]
    length = min(len(row) for row in rows) - 1
    for row in rows[1:]:
        if row[:length] != first[:length]:
            length = next(i for i in range(length) if row[i] != first[i])
    return max(length, 0)


def _laid_out(
    rows: Sequence[list[int]], shared: int, pad: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and attention mask of ``rows`` padded to one length: each row is its
    first ``shared`` tokens, then padding, then the rest (``shared`` = 0 is left
    padding); the mask is 1 on tokens, 0 on padding."""
    longest = max(len(row) for row in rows) - shared
    ids, mask = [], []
    for row in rows:
        rest = len(row) - shared
        padding = longest - rest
        ids.append(row[:shared] + [pad] * padding + row[shared:])
        mask.append([1] * shared + [0] * padding + [1] * rest)
    return ids, mask


def _batch_encoder(tokenizer: Any) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust tokenizer that encodes a batch of texts as the
    tokenizer does with ``add_special_tokens=False``, in one call and without the
    Python conversion of every encoding that the tokenizer's own call makes (a third of
    a batch's tokenizing time); None for a slow tokenizer.

    It is a copy, set up once: the tokenizer's own calls set padding, truncation and
    the splitting of special tokens on its Rust tokenizer as each call asks, so sharing
    it would race with a call on another thread. Being taken at load, it does not see
    tokens added to the tokenizer later; the backend adds none.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_padding()
    encoder.no_truncation()
    encoder.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return encoder


def _with_adapter(model: Any, adapter: str, vocabulary: int) -> Any:
    """``model`` with the LoRA adapter in ``adapter`` merged in.

    Raises:
        ValueError: The folder holds no adapter, or one for another model.
    """
    from peft import PeftModel

    rows = int(model.get_input_embeddings().num_embeddings)
    if vocabulary > rows:
        # Trained with a tokenizer that gained a token on reload (see the trainer).
        model.resize_token_embeddings(vocabulary)
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"adapter: cannot apply {adapter}: {error}") from None


class _WhenSet(StoppingCriteria):
    """Stops generation as soon as ``event`` is set."""

    def __init__(self, event: threading.Event):
        self._event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> Any:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool)


class _DaemonWorker:
    """One long-lived daemon thread that runs the process's local model calls.

    Unlike ``asyncio.to_thread`` (the default executor, joined when the loop and the
    interpreter end), nothing waits for it at shutdown; and unlike a thread per call
    it keeps torch's per-thread set-up, which costs milliseconds a call. Calls are
    serialised by the sampling lock anyway, so one thread loses no parallelism.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...], Any, Any]] = queue.SimpleQueue()
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None

    async def run(self, function: Any, *args: Any) -> Any:
        """``function(*args)`` on the worker thread; its result or error, awaited."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._started:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="transformers-generate", daemon=True
                )
                self._thread.start()
        self._calls.put((function, args, loop, future))
        return await future

    def _serve(self) -> None:
        while True:
            function, args, loop, future = self._calls.get()
            if future.cancelled():
                continue  # Nobody waits for it any more (a deadline passed).
            try:
                result, error = function(*args), None
            except BaseException as failure:
                result, error = None, failure
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_WORKER = _DaemonWorker()
