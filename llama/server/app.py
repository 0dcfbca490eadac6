"""The FastAPI application: routes, authentication, errors, streaming and the chat page.

``create_app(config, load)`` builds the app around an :class:`EngineThread` that calls
``load()`` (returning ``(engine, safety_checkers)``) once the server is up, so that
``/health`` answers (503, ``loading``, with progress) while the model loads.
"""

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import progress
from ..chat_format import UNSAFE_ERROR
from ..engine import SamplingParams
from ..safety import SAFETY_REFUSAL, all_safe, run_checks
from .engine_thread import LOADING, READY, Choice, EngineThread
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    FINISH_REASONS,
    ApiError,
    CompletionLogprobs,
    ParsedRequest,
    TokenText,
    chat_logprobs,
    check_context,
    merge_completion_logprobs,
    parse_chat,
    parse_completion,
    parse_json_object,
    sse,
    usage,
)

log = logging.getLogger("llama.server")

STATIC = Path(__file__).resolve().parent / "static"
METRIC_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/"}


@dataclass
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    max_queue: int = 64  # requests waiting for a slot, beyond the max_batch_size running
    stall_timeout_s: float = 120.0
    max_body_bytes: int = 8 * 2**20


class CountRequests:
    """ASGI middleware: every HTTP answer counted by path and status (streams too, unlike BaseHTTPMiddleware)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            self.metrics.http_requests.inc(1, path if path in METRIC_PATHS else "other", str(status[0]))


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class EventStream(StreamingResponse):
    """The server-sent events of a :class:`Run`; its engine requests are released however the response ends
    (even when the client leaves before the first event)."""

    def __init__(self, run: "Run"):
        super().__init__(run.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.release(self.run.choices)


def create_app(config: ServerConfig, load: Callable[[], Tuple[Any, list]],
               on_load_failure: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    metrics = Metrics()
    worker = EngineThread(load, metrics, config.stall_timeout_s, on_load_failure)
    started = int(time.time())
    safety_lock = asyncio.Lock()  # one safety check at a time: a checker (Llama Guard) is not thread-safe

    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="llama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.config = config
    app.state.metrics = metrics
    engine_value = lambda attr: (lambda: getattr(worker.engine, attr) if worker.engine is not None else 0)  # noqa: E731
    metrics.gauge("llama_queue_length", "Requests waiting for a slot.", engine_value("num_waiting"))
    metrics.gauge("llama_running_rows", "Requests holding a slot (rows of the running batch).",
                  engine_value("num_running"))
    metrics.gauge("llama_max_batch_size", "Slots: requests decoded together at most.", engine_value("max_batch_size"))
    metrics.gauge("llama_requests_in_flight", "Requests admitted and not yet answered.", lambda: worker.num_in_flight)
    metrics.gauge("llama_engine_healthy", "1 when the engine is loaded and making progress, else 0.",
                  lambda: float(worker.state == READY))

    # ------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else ("method_not_allowed" if e.status_code == 405 else None)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        message = message.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, message, "invalid_request_error", None, kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal server error (the server's log has the details)",
                                       "server_error", None, "internal_error"))

    # ------------------------------------------------------------------ helpers

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "no API key provided: send the header 'Authorization: Bearer YOUR_KEY'",
                           "invalid_request_error", None, "missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    async def read_json(request: Request) -> Dict[str, Any]:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes",
                               "invalid_request_error", None, "request_too_large")
        return parse_json_object(bytes(body))

    def check_model(model: Optional[str]) -> None:
        if model is not None and model != config.model_name:
            raise ApiError(404, f"the model '{model[:100]}' does not exist; this server serves '{config.model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def admit(parsed: ParsedRequest) -> None:
        engine = worker.engine
        wanted = parsed.n * sum(not r for r in parsed.refused)
        capacity = engine.max_batch_size + config.max_queue
        if wanted > capacity:
            raise ApiError(400, f"this request asks for {wanted} completions at once; this server takes at most "
                                f"{capacity} (max_batch_size + --max-queue)", "invalid_request_error", "n",
                           "too_many_choices")
        busy = engine.num_running + engine.num_waiting
        if busy + wanted > capacity:
            raise ApiError(429, f"the server is busy: {engine.num_waiting} request(s) are waiting for one of "
                                f"{engine.max_batch_size} slots and the queue holds {config.max_queue}; retry shortly",
                           "rate_limit_error", None, "queue_full", {"Retry-After": "1"})

    async def check_safety(dialogs: List[List[Dict[str, str]]], role: str) -> List[bool]:
        """Per dialog, whether every checker finds its ``role`` side safe (all True without checkers)."""
        checkers = worker.safety_checkers
        if not checkers or not dialogs:
            return [True] * len(dialogs)
        async with safety_lock:
            reports = await asyncio.to_thread(run_checks, checkers, dialogs, role)
        return [all_safe(r) for r in reports]

    # ------------------------------------------------------------------ generation

    async def generate(request: Request, chat: bool) -> Response:
        arrival = time.monotonic()
        authorize(request)
        data = await read_json(request)
        worker.check_available()
        engine = worker.engine
        parsed = (parse_chat if chat else parse_completion)(data, engine.tokenizer)
        check_model(parsed.model)
        check_context(parsed, engine.max_seq_len)
        admit(parsed)
        try:
            jobs = [(p * parsed.n + j, p, tokens, parsed.sampling.for_choice(SamplingParams, j))
                    for p, tokens in enumerate(parsed.prompts) for j in range(parsed.n)]
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request_error", None, "invalid_value") from None
        safe = await check_safety([d for d, r in zip(parsed.dialogs, parsed.refused) if not r], "user")
        safe_iter = iter(safe)
        blocked = {p: (UNSAFE_ERROR if r else None) for p, r in enumerate(parsed.refused)}
        for p, r in enumerate(parsed.refused):
            if not r and not next(safe_iter):
                blocked[p] = SAFETY_REFUSAL
        worker.check_available()  # again: the safety check may have taken a while
        queue: asyncio.Queue = asyncio.Queue()
        try:
            choices = worker.submit([j for j in jobs if blocked[j[1]] is None], queue, arrival, parsed.id)
        except ValueError as e:  # the engine's own validation (the parsing above should have caught it)
            raise ApiError(400, str(e), "invalid_request_error", None, "invalid_value") from None
        metrics.prompt_tokens.inc(sum(len(parsed.prompts[c.prompt_index]) for c in choices))
        run = Run(parsed, engine.tokenizer, choices, queue, blocked, check_safety, worker.release, metrics,
                  config.model_name)
        if parsed.stream:
            return EventStream(run)
        return await run.complete(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    # ------------------------------------------------------------------ the rest

    def model_card() -> Dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "llama"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        authorize(request)
        check_model(model)
        return model_card()

    @app.get("/health")
    async def health():
        body: Dict[str, Any] = {"status": worker.state if worker.state != READY else "ok", "model": config.model_name}
        if worker.state == LOADING:
            body["progress"] = progress.current()
        if worker.error:
            body["error"] = worker.error
        engine = worker.engine
        if engine is not None:
            body.update(running=engine.num_running, waiting=engine.num_waiting, max_batch_size=engine.max_batch_size,
                        max_seq_len=engine.max_seq_len, max_queue=config.max_queue)
        return JSONResponse(body, status_code=200 if worker.state == READY else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    app.add_middleware(CountRequests, metrics=metrics)
    return app


class Run:
    """The choices of one request as they are generated: a JSON response or a stream of chunks."""

    def __init__(self, parsed: ParsedRequest, tokenizer, choices: List[Choice], queue: asyncio.Queue,
                 blocked: Dict[int, Optional[str]], check_safety, release, metrics: Metrics, model_name: str):
        self.parsed = parsed
        self.tokenizer = tokenizer
        self.choices = choices
        self.queue = queue
        self.blocked = blocked  # prompt index -> refusal text (not run), or None
        self.check_safety = check_safety
        self.release = release  # EngineThread.release
        self.metrics = metrics
        self.model_name = model_name
        self.token_text = TokenText(tokenizer)
        n = parsed.n
        self.texts: Dict[int, List[str]] = {}  # per choice index, its pieces so far
        self.completion_lp: Dict[int, CompletionLogprobs] = {}
        self.generated: Dict[int, int] = {}
        self.finish: Dict[int, str] = {}
        self.indices = [p * n + j for p in range(len(parsed.prompts)) for j in range(n)]
        for p, text in blocked.items():
            if text is not None:
                for j in range(n):
                    self.texts[p * n + j] = [text]
                    self.finish[p * n + j] = "content_filter"
                    metrics.requests.inc(1, "content_filter")

    # ---------------------------------------------------------------- shared

    def _prompt_tokens(self) -> int:
        return sum(len(t) for p, t in enumerate(self.parsed.prompts) if self.blocked[p] is None)

    def _usage(self) -> Dict[str, int]:
        return usage(self._prompt_tokens(), sum(self.generated.values()))

    def _prefix(self, choice: Choice) -> Tuple[str, Optional[Dict[str, Any]]]:
        """Text (and completion logprobs) to put before a choice's first delta: the echoed prompt."""
        s = self.parsed.sampling
        if not s.echo:
            if s.logprobs and not self.parsed.chat:
                self.completion_lp[choice.index] = CompletionLogprobs(self.token_text)
            return "", None
        prompt = self.parsed.prompts[choice.prompt_index]
        text = self.tokenizer.decode(prompt)
        if not s.logprobs:
            return text, None
        lp = CompletionLogprobs(self.token_text)
        self.completion_lp[choice.index] = lp
        scores = list(choice.request.prompt_logprobs or [0.0] * len(prompt))
        scores = [None] + scores[1:]  # the first token has no context to be scored in
        return text, lp.add(prompt, scores, [None] * len(prompt) if s.top_logprobs else None, text)

    def _delta_logprobs(self, choice: Choice, out) -> Optional[Dict[str, Any]]:
        s = self.parsed.sampling
        if not s.logprobs or out.logprobs is None:
            return None
        tops = out.top_logprobs if s.top_logprobs else None
        if self.parsed.chat:
            return chat_logprobs(self.token_text, out.token_ids, out.logprobs, tops)
        return self.completion_lp[choice.index].add(out.token_ids, out.logprobs, tops, out.text)

    async def _events(self) -> AsyncIterator[Tuple[Choice, Any]]:
        """``(choice, RequestOutput)`` until every choice has finished; an ApiError is raised."""
        pending = {c.request_id for c in self.choices}
        while pending:
            item = await self.queue.get()
            if isinstance(item, ApiError):
                raise item
            choice, out = item
            if out.finished:
                pending.discard(out.request_id)
                if out.finish_reason == "abort":
                    raise ApiError(503, "the request was aborted by the server", "server_error", None, "aborted")
            yield choice, out

    async def _finish_reason(self, choice: Choice, reason: str) -> str:
        """The OpenAI finish reason; ``content_filter`` when the reply fails the safety checks."""
        reason = FINISH_REASONS.get(reason, reason)
        dialog = self.parsed.dialogs[choice.prompt_index]
        reply = {"role": "assistant", "content": "".join(self.texts.get(choice.index, []))}
        if not (await self.check_safety([dialog + [reply]], "assistant"))[0]:
            reason = "content_filter"
        return reason

    def _count_finish(self, reason: str) -> None:
        self.metrics.requests.inc(1, reason)

    def _count_unfinished(self, reason: str) -> None:
        for c in self.choices:
            if c.index not in self.finish:
                self._count_finish(reason)

    # ---------------------------------------------------------------- non-streamed

    async def complete(self, request: Request) -> Response:
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                collect.cancel()
                self._count_unfinished("aborted")
                return Response(status_code=499)  # nobody is listening
            return JSONResponse(collect.result())
        except ApiError as e:
            self._count_unfinished("error")
            return error_response(e)
        finally:
            gone.cancel()
            self.release(self.choices)

    async def _collect(self) -> Dict[str, Any]:
        lps: Dict[int, list] = {}
        async for choice, out in self._events():
            i = choice.index
            if i not in self.texts:
                text, lp = self._prefix(choice)
                self.texts[i] = [text]
                lps[i] = [lp] if lp is not None else []
            self.texts[i].append(out.text)
            delta = self._delta_logprobs(choice, out)
            if delta is not None:
                lps[i].append(delta)
            self.generated[i] = out.num_generated_tokens
            if out.finished:
                self.finish[i] = await self._finish_reason(choice, out.finish_reason)
                self._count_finish(self.finish[i])
        results = []
        for i in self.indices:
            text = "".join(self.texts.get(i, []))
            reason = self.finish[i]
            if reason == "content_filter" and i in self.generated:
                text = SAFETY_REFUSAL
            if self.parsed.chat:
                lp = None
                if self.parsed.sampling.logprobs:
                    content = [e for part in lps.get(i, []) for e in part["content"]]
                    lp = {"content": content, "refusal": None}
                results.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": lp, "finish_reason": reason})
            else:
                lp = merge_completion_logprobs(lps.get(i, [])) if self.parsed.sampling.logprobs else None
                results.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        return {"id": self.parsed.id, "object": self.parsed.object, "created": self.parsed.created,
                "model": self.model_name, "choices": results, "usage": self._usage(), "system_fingerprint": None}

    # ---------------------------------------------------------------- streamed

    def _chunk(self, choices: List[Dict[str, Any]], usage_value: Any = None) -> Dict[str, Any]:
        obj = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        chunk = {"id": self.parsed.id, "object": obj, "created": self.parsed.created, "model": self.model_name,
                 "choices": choices, "system_fingerprint": None}
        if self.parsed.include_usage:
            chunk["usage"] = usage_value
        return chunk

    def _choice_chunk(self, i: int, text: Optional[str], logprobs: Any, finish: Optional[str],
                      role: bool = False) -> Dict[str, Any]:
        if self.parsed.chat:
            delta: Dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    async def stream(self) -> AsyncIterator[str]:
        try:
            for i in self.indices:  # refused prompts: answered at once
                if i in self.finish:
                    yield sse(self._chunk([self._choice_chunk(i, "".join(self.texts[i]), None, None, role=True)]))
                    yield sse(self._chunk([self._choice_chunk(i, None if self.parsed.chat else "", None,
                                                              "content_filter")]))
            async for choice, out in self._events():
                i = choice.index
                parts = []
                if i not in self.texts:
                    text, lp = self._prefix(choice)
                    self.texts[i] = [text]
                    if self.parsed.chat or text:
                        parts.append(self._choice_chunk(i, text, lp, None, role=True))
                self.texts[i].append(out.text)
                self.generated[i] = out.num_generated_tokens
                if out.text or out.token_ids:
                    parts.append(self._choice_chunk(i, out.text, self._delta_logprobs(choice, out), None))
                if out.finished:
                    self.finish[i] = await self._finish_reason(choice, out.finish_reason)
                    self._count_finish(self.finish[i])
                    parts.append(self._choice_chunk(i, None if self.parsed.chat else "", None, self.finish[i]))
                for part in parts:
                    yield sse(self._chunk([part]))
            if self.parsed.include_usage:
                yield sse(self._chunk([], self._usage()))
            yield sse("[DONE]")
        except ApiError as e:
            self._count_unfinished("error")
            yield sse(e.body())
            yield sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            self._count_unfinished("aborted")
            raise
        finally:
            self.release(self.choices)


async def _disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
