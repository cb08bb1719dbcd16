"""Local HTTP servers that speak the OpenAI and TGI inference APIs.

The servers follow the published request and response shapes, status codes and error
bodies of the real services, so the backends are tested through their real clients
over real sockets. They hold protocol only: what text a request is answered with comes
from a *responder* the test supplies, and how a request fails comes from a queue of
scripted :class:`Fault` s, one consumed per request, or at random for a share of
the requests (:class:`RandomFaults`).

Every server records the requests it got and the most requests it had in flight at
once, for tests to assert on.

Example::

    with OpenAIServer(api_key="sk-test") as server:
        server.add_faults(Fault.rate_limited(retry_after=1))
        ...  # point a client at server.base_url
        assert len(server.requests) == 2
"""

from __future__ import annotations

import enum
import json
import random
import re
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

# ---------------------------------------------------------------------------
# What the model "says": supplied by the test through a responder.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptedToken:
    """A generated token with its log-probability.

    Attributes:
        text: The token's text.
        logprob: Its log-probability.
        top: The most likely tokens at this position, best first, as
            ``(text, logprob)``; servers return as many as the request asked for.
    """

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class FinishReason(enum.Enum):
    """Why generation stopped, in neutral terms each server maps to its own vocabulary."""

    EOS = "eos"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, slots=True)
class ScriptedCompletion:
    """One completion a server answers with."""

    tokens: tuple[ScriptedToken, ...]
    finish: FinishReason = FinishReason.EOS

    @property
    def text(self) -> str:
        """The completion's text: its tokens joined."""
        return "".join(token.text for token in self.tokens)


Responder = Callable[[dict[str, Any]], list[ScriptedCompletion]]
"""Maps a request's JSON body to the completions to answer with (one per choice)."""


def completion_from_text(
    text: str, *, alternatives: int = 5, finish: FinishReason = FinishReason.EOS
) -> ScriptedCompletion:
    """A completion of ``text`` split into whitespace-led tokens with made-up logprobs.

    Token ``j`` gets log-probability ``-0.1 * (j + 1)``; its alternatives are the
    token itself followed by ``" alt1"``, ``" alt2"``, … each one nat less likely.
    """
    tokens = []
    for position, piece in enumerate(re.findall(r"\s*\S+", text)):
        logprob = -0.1 * (position + 1)
        alternates = ((f" alt{rank}", logprob - rank) for rank in range(1, alternatives))
        top = ((piece, logprob), *alternates)
        tokens.append(ScriptedToken(piece, logprob, top))
    return ScriptedCompletion(tuple(tokens), finish)


def default_responder(request: dict[str, Any]) -> list[ScriptedCompletion]:
    """Answer ``n`` completions (1 where the API has no ``n``) naming their index and seed.

    Reads ``n`` and ``seed`` from the top level (OpenAI) or from ``parameters`` (TGI).
    """
    parameters = request.get("parameters") or request
    n = request.get("n") or 1
    seed = parameters.get("seed")
    return [completion_from_text(f"sample {index} seed {seed}") for index in range(n)]


# ---------------------------------------------------------------------------
# How a request fails: scripted faults.
# ---------------------------------------------------------------------------


class FaultKind(enum.Enum):
    """The failures a server can be scripted to produce."""

    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    SERVER_ERROR = "server_error"
    INVALID_KEY = "invalid_key"
    SLOW = "slow"
    NOT_JSON = "not_json"
    SCHEMA_BREAKING = "schema_breaking"
    RAW = "raw"


@dataclass(frozen=True, slots=True)
class Fault:
    """A failure for one request. Build one with the class methods.

    Attributes:
        kind: What goes wrong.
        headers: Extra response headers, e.g. ``Retry-After``.
        delay: For :attr:`FaultKind.SLOW`, seconds to wait before answering normally.
        status: For :attr:`FaultKind.RAW`, the status to answer.
        body: For :attr:`FaultKind.RAW`, the JSON body to answer.
    """

    kind: FaultKind
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    status: int = 0
    body: object = None

    @classmethod
    def rate_limited(
        cls, retry_after: float | None = 1, *, retry_after_ms: int | None = None
    ) -> Fault:
        """HTTP 429, with ``Retry-After`` (seconds) and/or ``retry-after-ms`` when given."""
        return cls(FaultKind.RATE_LIMITED, _retry_headers(retry_after, retry_after_ms))

    @classmethod
    def unavailable(cls, retry_after: float | None = None) -> Fault:
        """HTTP 503, with ``Retry-After`` when given."""
        return cls(FaultKind.UNAVAILABLE, _retry_headers(retry_after, None))

    @classmethod
    def server_error(cls) -> Fault:
        """HTTP 500."""
        return cls(FaultKind.SERVER_ERROR)

    @classmethod
    def invalid_key(cls) -> Fault:
        """HTTP 401 as for a wrong API key, whatever key the request carried."""
        return cls(FaultKind.INVALID_KEY)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally, but only after ``seconds`` (longer than the client's timeout)."""
        return cls(FaultKind.SLOW, delay=seconds)

    @classmethod
    def not_json(cls) -> Fault:
        """HTTP 200 with a body that claims to be JSON and is not."""
        return cls(FaultKind.NOT_JSON)

    @classmethod
    def schema_breaking(cls) -> Fault:
        """HTTP 200 with valid JSON that lacks the fields the API promises."""
        return cls(FaultKind.SCHEMA_BREAKING)

    @classmethod
    def raw(cls, status: int, body: object) -> Fault:
        """Exactly this status and JSON body, for errors only one protocol has."""
        return cls(FaultKind.RAW, status=status, body=body)


@dataclass(frozen=True, slots=True)
class RandomFaults:
    """Faults for a share of the requests, drawn at random, on top of the scripted queue.

    Attributes:
        rate: The probability that a request (one not given a scripted fault) fails.
        faults: The failures drawn from, with equal chances.
        seed: Seeds the draws, so that a run is repeatable.
    """

    rate: float
    faults: tuple[Fault, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")
        if self.rate and not self.faults:
            raise ValueError("a positive rate needs faults to draw from")


def _retry_headers(
    retry_after: float | None, retry_after_ms: int | None
) -> tuple[tuple[str, str], ...]:
    headers = []
    if retry_after is not None:
        # RFC 9110 delta-seconds is an integer; keep fractions only when asked for.
        value = int(retry_after) if float(retry_after).is_integer() else retry_after
        headers.append(("Retry-After", str(value)))
    if retry_after_ms is not None:
        headers.append(("retry-after-ms", str(retry_after_ms)))
    return tuple(headers)


# ---------------------------------------------------------------------------
# The server machinery shared by both protocols.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as the server received it.

    Attributes:
        method: HTTP method.
        path: Path with query string.
        headers: Headers, names lower-cased.
        body: The JSON body parsed, ``None`` when there was none or it was not JSON.
        received_at: ``time.monotonic()`` when the request arrived.
        fault: The fault it was answered with (scripted or random), ``None`` for none.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float
    fault: FaultKind | None = None


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: object, **kwargs: Any) -> _Response:
        return cls(status, json.dumps(payload).encode(), **kwargs)


_UNPARSEABLE = object()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive between requests, as the real servers do.
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as asyncio (uvicorn, so vLLM) sets on every connection: the headers
    # and the body go out in two writes, and with Nagle's algorithm the body waits for
    # the client's delayed ACK of the headers, about 40 ms on Linux, on top of `latency`.
    disable_nagle_algorithm = True
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self.server.app.serve(self)

    def do_POST(self) -> None:
        self.server.app.serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the recorded requests are the log."""


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A client may hold a keep-alive connection open; stopping must not wait for it.
    block_on_close = False
    # The listen backlog of uvicorn (so vLLM): socketserver's 5 drops the connections a
    # client opens at once beyond it, which then wait a second or more for their SYN to
    # be sent again.
    request_queue_size = 2048

    def __init__(self, app: LoopbackServer, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.app = app
        self.connections = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        # One call per accepted connection, in the serving thread: no lock needed.
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out hang up before the answer is written; that is expected.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """A threaded HTTP server on a free loopback port, served from a daemon thread.

    Subclasses name their request handler class (``handler``), which reaches the
    server object as ``self.server.app``, and may end what holds requests open when
    the server stops (:meth:`closing`).
    """

    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._httpd: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle -------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free loopback port and serve in a daemon thread."""
        self._stopping.clear()
        self._httpd = LoopbackHTTPServer(self, self.handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; requests still sleeping are cut short."""
        if self._httpd is None or self._thread is None:
            return
        self._stopping.set()
        self.closing()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """The TCP connections accepted so far; keep-alive clients reuse theirs."""
        return self._httpd.connections if self._httpd is not None else 0

    @property
    def port(self) -> int:
        """The bound port."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Root URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def closing(self) -> None:
        """Called as the server stops, before it shuts down; nothing by default."""


class _ProtocolServer(LoopbackServer):
    """Threaded loopback HTTP server; subclasses supply the protocol."""

    handler = _Handler

    def __init__(
        self,
        *,
        responder: Responder = default_responder,
        api_key: str | None = None,
        latency: float = 0.0,
        random_faults: RandomFaults | None = None,
    ):
        self.responder = responder
        self.api_key = api_key
        self.latency = latency
        self.random_faults = random_faults
        self._random = random.Random(random_faults.seed if random_faults else 0)
        self._faults: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        super().__init__()

    # What tests script and inspect ------------------------------------------

    def add_faults(self, *faults: Fault) -> None:
        """Queue faults; each request consumes the next one, then requests succeed."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def max_in_flight(self) -> int:
        """The most requests that were being handled at the same time."""
        with self._lock:
            return self._max_in_flight

    # Serving ----------------------------------------------------------------

    def serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = _UNPARSEABLE
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            fault = self._next_fault()
            self._requests.append(
                RecordedRequest(
                    handler.command,
                    handler.path,
                    headers,
                    None if body is _UNPARSEABLE else body,
                    time.monotonic(),
                    fault.kind if fault else None,
                )
            )
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            delay = self.latency + (fault.delay if fault else 0.0)
            if delay:
                self._stopping.wait(delay)
            response = self._answer(handler.command, handler.path, headers, body, fault)
        finally:
            # Counted out before answering: a client that has the answer may send its
            # next request at once, which must not find this one still counted.
            with self._lock:
                self._in_flight -= 1
        self._write(handler, response)

    def _next_fault(self) -> Fault | None:
        """The next scripted fault, else a random one at the configured rate (lock held)."""
        if self._faults:
            return self._faults.popleft()
        drawn = self.random_faults
        if drawn is not None and drawn.rate and self._random.random() < drawn.rate:
            return self._random.choice(drawn.faults)
        return None

    def _answer(
        self, method: str, path: str, headers: Mapping[str, str], body: Any, fault: Fault | None
    ) -> _Response:
        if fault is not None and fault.kind is not FaultKind.SLOW:
            return self._fault_response(fault, headers)
        route = self._route(method, path.split("?", 1)[0])
        if route is None:
            return self._error(404, f"Invalid URL ({method} {path})", "not_found")
        handle, needs_auth = route
        if needs_auth and self.api_key is not None:
            presented = _bearer_token(headers)
            if presented != self.api_key:
                return self._unauthorized(presented)
        if method == "POST":
            if body is _UNPARSEABLE or not isinstance(body, dict):
                return self._error(400, "The request body is not a JSON object.", "validation")
            return handle(body)
        return handle(None)

    def _fault_response(self, fault: Fault, headers: Mapping[str, str]) -> _Response:
        match fault.kind:
            case FaultKind.RATE_LIMITED:
                response = self._rate_limited()
            case FaultKind.UNAVAILABLE:
                response = self._error(503, "The service is temporarily unavailable.", "overloaded")
            case FaultKind.SERVER_ERROR:
                response = self._error(
                    500, "The server had an error processing the request.", "incomplete_generation"
                )
            case FaultKind.INVALID_KEY:
                response = self._unauthorized(_bearer_token(headers))
            case FaultKind.NOT_JSON:
                response = _Response(200, b"<html><body>upstream reset</body></html>")
            case FaultKind.SCHEMA_BREAKING:
                response = _Response.json(200, self._schema_breaking_body())
            case FaultKind.RAW:
                response = _Response.json(fault.status, fault.body)
            case _:
                raise AssertionError(f"unhandled fault {fault.kind}")
        response.headers.extend(fault.headers)
        return response

    def _write(self, handler: _Handler, response: _Response) -> None:
        try:
            handler.send_response(response.status)
            handler.send_header("Content-Type", response.content_type)
            handler.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers:
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(response.body)
        except ConnectionError:
            # The client gave up (a timeout under test); nothing is left to answer.
            handler.close_connection = True

    # The protocol -------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[Callable[[Any], _Response], bool] | None:
        """The handler for ``method path`` and whether it needs the API key."""
        raise NotImplementedError

    def _error(self, status: int, message: str, kind: str = "generation") -> _Response:
        """An error response in the protocol's error shape.

        ``kind`` is TGI's ``error_type``; OpenAI derives its error type from the status.
        """
        raise NotImplementedError

    def _rate_limited(self) -> _Response:
        raise NotImplementedError

    def _unauthorized(self, presented: str | None) -> _Response:
        raise NotImplementedError

    def _schema_breaking_body(self) -> object:
        raise NotImplementedError

    def _completions(self, body: dict[str, Any]) -> list[ScriptedCompletion]:
        return list(self.responder(body))


def _bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _mask_key(key: str) -> str:
    # OpenAI echoes a wrong key masked, keeping its ends, so users can tell keys apart.
    return f"{key[:3]}{'*' * max(len(key) - 7, 4)}{key[-4:]}"


def _count_words(text: str) -> int:
    return len(text.split())


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


# ---------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------


class OpenAIServer(_ProtocolServer):
    """The OpenAI REST API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

    Args:
        model: The one model served; other model names answer 404 ``model_not_found``.
        api_key: When set, requests must carry ``Authorization: Bearer <api_key>``.
        reasoning_model: Answer like OpenAI's reasoning models, which reject
            ``max_tokens`` in favour of ``max_completion_tokens``.
        bos_token: Serve like vLLM a model whose tokenizer puts this BOS text first:
            ``/v1/completions`` encodes the prompt with special tokens unless the
            request says ``add_special_tokens: false``, so a prompt holding the BOS
            would reach the model with two. Real vLLM would say nothing; this server
            refuses such a request (400), so that no test passes with it. ``None``
            serves like OpenAI, which adds nothing.
        accepts_top_k: Take ``top_k`` as vLLM does (``-1`` or ``0`` is off, else at
            least 1); without it the server is OpenAI itself, which rejects the
            unknown parameter.
        responder: Chooses the completions; see :data:`Responder`.
        latency: Seconds every request takes, so concurrent requests overlap.
        random_faults: Fail a share of the requests at random (:class:`RandomFaults`).
    """

    def __init__(
        self,
        *,
        model: str = "test-model",
        api_key: str | None = None,
        reasoning_model: bool = False,
        bos_token: str | None = None,
        accepts_top_k: bool = False,
        responder: Responder = default_responder,
        latency: float = 0.0,
        random_faults: RandomFaults | None = None,
    ):
        super().__init__(
            responder=responder, api_key=api_key, latency=latency, random_faults=random_faults
        )
        self.model = model
        self.reasoning_model = reasoning_model
        self.bos_token = bos_token
        self.accepts_top_k = accepts_top_k

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``: the root with ``/v1``."""
        return f"{self.url}/v1"

    def _route(self, method: str, path: str) -> tuple[Callable[[Any], _Response], bool] | None:
        routes: dict[tuple[str, str], Callable[[Any], _Response]] = {
            ("GET", "/v1/models"): self._list_models,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("POST", "/v1/completions"): self._legacy_completions,
        }
        if (method, path) in routes:
            return routes[method, path], True
        if method == "GET" and path.startswith("/v1/models/"):
            return (lambda _: self._retrieve_model(path.removeprefix("/v1/models/"))), True
        return None

    # Errors: {"error": {"message", "type", "param", "code"}} ------------------

    def _error(self, status: int, message: str, kind: str = "generation") -> _Response:
        error_type = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "invalid_request_error",
            429: "requests",
        }.get(status, "server_error")
        return self._error_response(status, message, error_type)

    def _error_response(
        self,
        status: int,
        message: str,
        error_type: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> _Response:
        body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        return _Response.json(status, body)

    def _rate_limited(self) -> _Response:
        response = self._error_response(
            429,
            f"Rate limit reached for {self.model} on requests per min (RPM): Limit 3, Used 3, "
            "Requested 1. Please try again in 1s.",
            "requests",
            code="rate_limit_exceeded",
        )
        response.headers += [
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
        ]
        return response

    def _unauthorized(self, presented: str | None) -> _Response:
        if presented is None:
            return self._error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        return self._error_response(
            401,
            f"Incorrect API key provided: {_mask_key(presented)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            code="invalid_api_key",
        )

    def _schema_breaking_body(self) -> object:
        return {"id": "chatcmpl-broken", "object": "chat.completion", "created": int(time.time())}

    # Endpoints -----------------------------------------------------------------

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "system"}

    def _list_models(self, _: None) -> _Response:
        return _Response.json(200, {"object": "list", "data": [self._model_object()]})

    def _retrieve_model(self, model: str) -> _Response:
        if model != self.model:
            return self._model_not_found(model)
        return _Response.json(200, self._model_object())

    def _model_not_found(self, model: str) -> _Response:
        return self._error_response(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            code="model_not_found",
        )

    def _chat_completions(self, body: dict[str, Any]) -> _Response:
        try:
            self._validate_common(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' must be a non-empty array.", "messages")
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or "role" not in message:
                    raise _BadRequest(
                        f"Missing required parameter: 'messages[{index}].role'.",
                        f"messages[{index}].role",
                    )
            if self.reasoning_model and "max_tokens" in body:
                return self._error_response(
                    400,
                    "Unsupported parameter: 'max_tokens' is not supported with this model. "
                    "Use 'max_completion_tokens' instead.",
                    "invalid_request_error",
                    param="max_tokens",
                    code="unsupported_parameter",
                )
            top_logprobs = body.get("top_logprobs")
            if top_logprobs is not None:
                if not body.get("logprobs"):
                    raise _BadRequest(
                        "Invalid parameter: 'top_logprobs' is only allowed when 'logprobs' "
                        "is enabled.",
                        "top_logprobs",
                    )
                if not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
                    raise _BadRequest("'top_logprobs' must be between 0 and 20.", "top_logprobs")
        except _BadRequest as error:
            return self._bad_request(error)
        if body["model"] != self.model:
            return self._model_not_found(body["model"])

        want_logprobs = bool(body.get("logprobs"))
        k = body.get("top_logprobs") or 0
        choices = []
        completion_tokens = 0
        for index, completion in enumerate(self._completions(body)):
            completion_tokens += len(completion.tokens)
            choices.append(
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": completion.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": (
                        {"content": _chat_logprobs(completion, k), "refusal": None}
                        if want_logprobs
                        else None
                    ),
                    "finish_reason": _OPENAI_FINISH[completion.finish],
                }
            )
        prompt_tokens = sum(_count_words(str(m.get("content", ""))) for m in body["messages"])
        return _Response.json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)
                | {
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },
                },
                "service_tier": "default",
                "system_fingerprint": "fp_test",
            },
        )

    def _legacy_completions(self, body: dict[str, Any]) -> _Response:
        try:
            self._validate_common(body)
            if not isinstance(body.get("prompt"), str | list):
                raise _BadRequest("Missing required parameter: 'prompt'.", "prompt")
            logprobs = body.get("logprobs")
            if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= 5):
                raise _BadRequest("'logprobs' must be between 0 and 5.", "logprobs")
            adds_bos = body.get("add_special_tokens", True) is not False
            if self.bos_token and adds_bos and self.bos_token in str(body["prompt"]):
                raise _BadRequest(
                    f"test server: the prompt holds the BOS {self.bos_token!r} and would get "
                    "another one: send add_special_tokens false",
                    "add_special_tokens",
                )
        except _BadRequest as error:
            return self._bad_request(error)
        if body["model"] != self.model:
            return self._model_not_found(body["model"])

        choices = []
        completion_tokens = 0
        for index, completion in enumerate(self._completions(body)):
            completion_tokens += len(completion.tokens)
            choices.append(
                {
                    "text": completion.text,
                    "index": index,
                    "logprobs": (
                        None if logprobs is None else _legacy_logprobs(completion, logprobs)
                    ),
                    "finish_reason": _OPENAI_FINISH[completion.finish],
                }
            )
        return _Response.json(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "system_fingerprint": "fp_test",
                "choices": choices,
                "usage": _usage(_count_words(str(body["prompt"])), completion_tokens),
            },
        )

    def _validate_common(self, body: dict[str, Any]) -> None:
        if not isinstance(body.get("model"), str):
            raise _BadRequest("you must provide a model parameter", "model")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 128:
            raise _BadRequest(f"{n!r} is not a valid value for 'n' - it must be 1 to 128.", "n")
        temperature = body.get("temperature")
        if temperature is not None and not 0 <= temperature <= 2:
            raise _BadRequest(
                f"{temperature} is greater than the maximum of 2 - 'temperature'", "temperature"
            )
        top_p = body.get("top_p")
        if top_p is not None and not 0 <= top_p <= 1:
            raise _BadRequest(f"{top_p} is greater than the maximum of 1 - 'top_p'", "top_p")
        stop = body.get("stop")
        if isinstance(stop, list) and len(stop) > 4:
            raise _BadRequest(f"{stop} is too long - 'stop'", "stop")
        if "top_k" in body:
            top_k = body["top_k"]
            if not self.accepts_top_k:
                raise _BadRequest("Unrecognized request argument supplied: top_k", "top_k")
            if not isinstance(top_k, int) or top_k < -1:
                raise _BadRequest(
                    f"top_k must be 0 or -1 (disable), or at least 1, got {top_k}.", "top_k"
                )

    def _bad_request(self, error: _BadRequest) -> _Response:
        return self._error_response(400, error.message, "invalid_request_error", param=error.param)


_OPENAI_FINISH = {
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprobs(completion: ScriptedCompletion, k: int) -> list[dict[str, Any]]:
    return [
        {
            "token": token.text,
            "logprob": token.logprob,
            "bytes": list(token.text.encode()),
            "top_logprobs": [
                {"token": text, "logprob": logprob, "bytes": list(text.encode())}
                for text, logprob in token.top[:k]
            ],
        }
        for token in completion.tokens
    ]


def _legacy_logprobs(completion: ScriptedCompletion, k: int) -> dict[str, Any]:
    offsets, offset = [], 0
    for token in completion.tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in completion.tokens],
        "token_logprobs": [token.logprob for token in completion.tokens],
        "top_logprobs": [dict(token.top[:k]) for token in completion.tokens],
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------------
# TGI (text-generation-inference)
# ---------------------------------------------------------------------------


class TGIServer(_ProtocolServer):
    """TGI's native API: ``/generate`` and the compat route ``/``, ``/health``, ``/info``,
    and its OpenAI-shaped Messages API ``/v1/chat/completions``.

    Requests are validated as TGI's router does (422 with ``error_type`` ``validation``).

    Args:
        model_id: The served model, reported by ``/info``.
        api_key: When set, generation routes need ``Authorization: Bearer <api_key>``.
        max_top_n_tokens: The most alternatives per token a request may ask for, on the
            generate routes (``top_n_tokens``) and the Messages API (``top_logprobs``);
            TGI's ``--max-top-n-tokens``, 5 unless a server is started with more.
        bos_token: The BOS text of the served model's tokenizer, which TGI puts before
            the ``inputs`` of the generate routes: ``inputs`` that hold it would reach
            the model with two. Real TGI would say nothing; this server refuses them
            (422), so that no test passes with them. ``None`` serves a model without one.
        responder: Chooses the completion; TGI answers with the first one returned.
        latency: Seconds every request takes, so concurrent requests overlap.
        random_faults: Fail a share of the requests at random (:class:`RandomFaults`).
    """

    max_stop_sequences = 4

    def __init__(
        self,
        *,
        model_id: str = "test-org/test-model",
        api_key: str | None = None,
        max_top_n_tokens: int = 5,
        bos_token: str | None = "<|begin_of_text|>",
        responder: Responder = default_responder,
        latency: float = 0.0,
        random_faults: RandomFaults | None = None,
    ):
        super().__init__(
            responder=responder, api_key=api_key, latency=latency, random_faults=random_faults
        )
        self.model_id = model_id
        self.max_top_n_tokens = max_top_n_tokens
        self.bos_token = bos_token

    @property
    def base_url(self) -> str:
        """What a TGI client takes as its URL: the server root."""
        return self.url

    def _route(self, method: str, path: str) -> tuple[Callable[[Any], _Response], bool] | None:
        routes: dict[tuple[str, str], tuple[Callable[[Any], _Response], bool]] = {
            ("GET", "/health"): (lambda _: _Response(200, content_type="text/plain"), False),
            ("GET", "/info"): (lambda _: _Response.json(200, self._info()), False),
            ("POST", "/generate"): (self._generate, True),
            ("POST", "/"): (self._compat_generate, True),
            ("POST", "/v1/chat/completions"): (self._chat_completions, True),
        }
        return routes.get((method, path))

    # Errors: {"error": "...", "error_type": "..."} ----------------------------

    def _error(self, status: int, message: str, kind: str = "generation") -> _Response:
        return _Response.json(status, {"error": message, "error_type": kind})

    def _rate_limited(self) -> _Response:
        return self._error(429, "Model is overloaded", "overloaded")

    def _unauthorized(self, presented: str | None) -> _Response:
        return self._error(401, "Unauthorized", "authentication")

    def _schema_breaking_body(self) -> object:
        return {"text": "no generated_text field here"}

    # Endpoints -----------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128,
            "max_best_of": 2,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": 4095,
            "max_total_tokens": 4096,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": "3.3.6",
            "sha": None,
            "docker_label": None,
        }

    def _generate(self, body: dict[str, Any]) -> _Response:
        try:
            generation, generated_tokens = self._generation(body)
        except _BadRequest as error:
            return self._error(422, error.message, "validation")
        return _Response.json(
            200, generation, headers=[("x-generated-tokens", str(generated_tokens))]
        )

    def _compat_generate(self, body: dict[str, Any]) -> _Response:
        if body.get("stream"):
            return self._error(422, "this test server does not stream", "validation")
        try:
            generation, generated_tokens = self._generation(body)
        except _BadRequest as error:
            return self._error(422, error.message, "validation")
        # TGI wraps the answer of its compat route in a list, as the Inference API did.
        return _Response.json(
            200, [generation], headers=[("x-generated-tokens", str(generated_tokens))]
        )

    def _generation(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise _BadRequest("`inputs` cannot be empty")
        if self.bos_token and self.bos_token in inputs:
            raise _BadRequest(
                f"test server: `inputs` hold the BOS {self.bos_token!r}, and TGI adds "
                "another one: leave it out"
            )
        parameters = body.get("parameters") or {}
        self._validate_sampling(parameters)
        if not parameters.get("max_new_tokens", 1) > 0:
            raise _BadRequest("`max_new_tokens` must be strictly positive")
        top_n_tokens = parameters.get("top_n_tokens") or 0
        self._validate_top_n_tokens(top_n_tokens)
        completion = self._completions(body)[0]
        generation: dict[str, Any] = {"generated_text": completion.text}
        if parameters.get("details"):
            do_sample = bool(parameters.get("do_sample"))
            details: dict[str, Any] = {
                "finish_reason": _TGI_FINISH[completion.finish],
                "generated_tokens": len(completion.tokens),
                "seed": parameters.get("seed") if do_sample else None,
                "prefill": [],
                "tokens": [_tgi_token(token.text, token.logprob) for token in completion.tokens],
            }
            if top_n_tokens:
                details["top_tokens"] = [
                    [_tgi_token(text, logprob) for text, logprob in token.top[:top_n_tokens]]
                    for token in completion.tokens
                ]
            generation["details"] = details
        return generation, len(completion.tokens)

    def _validate_top_n_tokens(self, top_n_tokens: int) -> None:
        # The Messages API's top_logprobs becomes top_n_tokens, checked alike.
        if not 0 <= top_n_tokens <= self.max_top_n_tokens:
            raise _BadRequest(
                f"`top_n_tokens` must be >= 0 and <= {self.max_top_n_tokens}. Given: {top_n_tokens}"
            )

    def _validate_sampling(self, parameters: Mapping[str, Any]) -> None:
        temperature = parameters.get("temperature")
        if temperature is not None and temperature <= 0:
            raise _BadRequest("`temperature` must be strictly positive")
        top_p = parameters.get("top_p")
        if top_p is not None and not 0 < top_p < 1:
            raise _BadRequest("`top_p` must be > 0.0 and < 1.0")
        top_k = parameters.get("top_k")
        if top_k is not None and top_k <= 0:
            raise _BadRequest("`top_k` must be strictly positive")
        stop = parameters.get("stop") or []
        if len(stop) > self.max_stop_sequences:
            raise _BadRequest(
                f"`stop` supports up to {self.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}"
            )

    def _chat_completions(self, body: dict[str, Any]) -> _Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._error(422, "`messages` cannot be empty", "validation")
        # Like TGI's, this route has no top_k: one sent is ignored, as serde ignores any
        # unknown field. The Messages API treats temperature 0 as greedy, unlike /generate.
        sampling = {key: value for key, value in body.items() if key in ("top_p", "stop")}
        if body.get("temperature"):
            sampling["temperature"] = body["temperature"]
        want_logprobs = bool(body.get("logprobs"))
        k = body.get("top_logprobs") or 0
        try:
            self._validate_sampling(sampling)
            self._validate_top_n_tokens(k if want_logprobs else 0)
        except _BadRequest as error:
            return self._error(422, error.message, "validation")
        completion = self._completions(body)[0]
        logprobs = None
        if want_logprobs:
            logprobs = {
                "content": [
                    {
                        "token": token.text,
                        "logprob": token.logprob,
                        "top_logprobs": [
                            {"token": text, "logprob": logprob} for text, logprob in token.top[:k]
                        ],
                    }
                    for token in completion.tokens
                ]
            }
        prompt_tokens = sum(_count_words(str(m.get("content", ""))) for m in messages)
        return _Response.json(
            200,
            {
                "object": "chat.completion",
                "id": "",
                "created": int(time.time()),
                "model": self.model_id,
                "system_fingerprint": "3.3.6-native",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": logprobs,
                        "finish_reason": _OPENAI_FINISH[completion.finish],
                    }
                ],
                "usage": _usage(prompt_tokens, len(completion.tokens)),
            },
        )


_TGI_FINISH = {
    FinishReason.EOS: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.LENGTH: "length",
}


def _tgi_token(text: str, logprob: float) -> dict[str, Any]:
    # Token ids only need to be stable per text; TGI's come from the tokenizer.
    return {
        "id": zlib.crc32(text.encode()) % 32000,
        "text": text,
        "logprob": logprob,
        "special": False,
    }
