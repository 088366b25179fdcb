"""The OpenAI-compatible HTTP layer: validation, tokenisation, streaming (SSE), errors and metrics.

    POST /v1/completions, /v1/chat/completions   GET /v1/models, /health, /metrics

`build_app` turns any *engine client* into a FastAPI app. An engine client has the `AsyncEngine` interface:
`generate(Request)` (an async iterator of token deltas whose first step raises ValueError for a request the
engine refuses), `stats()` and `check_health()` (plain or awaitable). In process that is `AsyncEngine`; behind Ray
Serve it is a handle to a target replica; this module does not know which.

Request handling: pydantic models accept and ignore unknown OpenAI fields (clients send many); values are checked
here with the OpenAI parameter name in the error, then the engine validates again as the last word. Every error is
OpenAI-shaped JSON `{"error": {"message", "type", "param", "code"}}`: 400 for bad values, wrong types and malformed
JSON (FastAPI's 422 is mapped to 400), 401 for a wrong API key, 404 for an unknown model, 503 with Retry-After
when the engine has no replica to serve (`router/errors.py`), and 500 with a generic message (logged, never a
traceback) for anything unexpected.

Detokenisation is incremental and byte-safe: each step decodes the whole output and emits the new suffix, holding
back a trailing U+FFFD (a multi-byte character whose remaining bytes are still to come) and any tail that could be
the start of a stop string. The engine cuts at a matched stop string; the final delta is computed from its cut, so
a stop string never reaches the client and the streamed chunks concatenate to the non-streamed text.

Metrics (vLLM names, so vLLM dashboards and `vllm bench serve` work unchanged), one CollectorRegistry per app:
    tau (acceptance length)   1 + rate(vllm:spec_decode_num_accepted_tokens_total[5m])
                                  / rate(vllm:spec_decode_num_drafts_total[5m])
    draft acceptance rate     rate(vllm:spec_decode_num_accepted_tokens_total[5m])
                                  / rate(vllm:spec_decode_num_draft_tokens_total[5m])
    p90 TTFT                  histogram_quantile(0.9, rate(vllm:time_to_first_token_seconds_bucket[5m]))
    inter-token latency is observed once per engine step that delivered tokens (several with speculation).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import time
import uuid
from contextlib import aclosing
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.errors import EngineUnavailable, RequestTimeout
from workers.engine.async_engine import EngineBusy
from workers.engine.sequence import Request
from workers.params import SamplingParams

log = logging.getLogger(__name__)

# --- errors ---------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
                code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(_error_body(message, **kw), status_code=status)


# --- request models (lenient about unknown fields, strict about the ones we use) --------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None -> 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's): 0 or -1 disables
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_draft_tokens: int | None = None  # specray extension: k for this request
    ignore_eos: bool = False  # extension (vLLM's): benchmarks use it to fix the output length
    logprobs: Any = None
    echo: bool = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # newer clients send this instead of max_tokens


# --- detokenisation -----------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Token-id deltas in, text deltas out; the deltas concatenate to the final text (see the module docstring)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.ids: list[int] = []
        self.sent = ""  # text already handed out

    def add(self, token_ids: list[int], finished: bool = False, stop_text_end: int | None = None) -> str:
        self.ids += token_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if stop_text_end is not None:
            text = text[:stop_text_end]
        if not finished:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix_len(text)]
        if not text.startswith(self.sent):
            # the tokenizer rewrote earlier text (space clean-up); what was sent cannot be taken back, so wait
            # until the text extends it again, and at the end send whatever is new past its length
            if not finished:
                return ""
            log.warning("detokenised text is not an extension of what was streamed")
        delta = text[len(self.sent):]
        self.sent += delta
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


# --- metrics ------------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class _EngineCollector:
    """Engine-side numbers (spec counters, queue gauges) from the latest `stats()`, read at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.latest: dict = {}

    def collect(self):
        s, m = self.latest, [self.model_name]
        for name, key, doc in (
            ("vllm:spec_decode_num_drafts", "num_drafts", "Verification steps that verified >= 1 draft token."),
            ("vllm:spec_decode_num_draft_tokens", "num_draft_tokens", "Draft tokens verified."),
            ("vllm:spec_decode_num_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted."),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, s.get(key, 0))
            yield c
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted draft tokens by position in the block.",
                                      labels=["model_name", "position"])
        for i, v in enumerate(s.get("accepted_per_pos", [])):
            per_pos.add_metric([self.model_name, str(i)], v)
        yield per_pos
        for name, key, doc in (
            ("specray:fallback_steps", "fallback_steps",
             "Sequence-steps verified without draft tokens although k > 0 (draft slow, dead or out of ideas)."),
            ("specray:target_draft_wait_seconds", "draft_wait_seconds",
             "Target idle time waiting for draft tokens. rate() of it / rate(step time) = share of time idle."),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, s.get(key, 0))
            yield c
        lat = sorted(s.get("draft_rpc_latency_s") or [])
        if lat:
            g = GaugeMetricFamily("specray:draft_rpc_latency_seconds",
                                  "Verdict sent -> next draft block received, recent sample quantiles.",
                                  labels=["model_name", "quantile"])
            for q in (0.5, 0.9, 0.99):
                g.add_metric([self.model_name, str(q)], lat[min(len(lat) - 1, int(q * (len(lat) - 1)))])
            yield g
        for name, key, doc in (("vllm:num_requests_running", "running", "Sequences in the running batch."),
                               ("vllm:num_requests_waiting", "waiting", "Sequences waiting for a slot.")):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, s.get(key, 0))
            yield g


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine = _EngineCollector(model_name)
        self.registry.register(self.engine)
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_LATENCY_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between token deliveries.",
                             buckets=_LATENCY_BUCKETS, **kw).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", **kw).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", **kw).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.rejected = Counter("specray:requests_rejected", "Requests answered 503: no replica, or all at capacity.",
                                **kw).labels(model_name)


async def _maybe_await(x):
    return await x if inspect.isawaitable(x) else x


# --- the app ------------------------------------------------------------------------------------------------------


def build_app(engine_client, model_name: str, tokenizer, api_key: str | None = None, *, max_model_len: int,
              default_num_draft_tokens: int | None = None) -> FastAPI:
    """engine_client: AsyncEngine interface (see the module docstring); tokenizer: the served model's HF tokenizer
    (give the router its own instance: fast tokenizers are not safe to share across threads)."""
    app = FastAPI(title="specray", docs_url=None, redoc_url=None)
    metrics = Metrics(model_name)
    app.state.metrics = metrics
    created = int(time.time())

    # --- errors -------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, type=e.type, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _error(400, "the request body is not valid JSON", code="invalid_json")
        err = errors[0] if errors else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'request body'}: {err.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), code=e.status_code)

    @app.exception_handler(EngineUnavailable)
    @app.exception_handler(EngineBusy)  # the in-process engine at capacity
    async def _unavailable(_, e: EngineUnavailable | EngineBusy):
        metrics.rejected.inc()
        out = _error(503, str(e), type="service_unavailable")
        out.headers["Retry-After"] = str(e.retry_after_s)
        return out

    @app.exception_handler(RequestTimeout)
    async def _timeout(_, e: RequestTimeout):
        return _error(504, str(e), type="timeout")

    @app.exception_handler(Exception)
    async def _unexpected(request: HTTPRequest, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, "internal server error", type="internal_server_error")

    async def auth(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    # --- request -> engine Request ------------------------------------------------------------------------------
    def check_model(body: _SamplingFields) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    def completion_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        if prompt and all(isinstance(p, (str, list)) for p in prompt):  # a batch of prompts
            if len(prompt) != 1:
                raise APIError(400, f"batched prompts are not supported (got {len(prompt)}); send one per request",
                               param="prompt")
            return completion_prompt(prompt[0])
        return list(prompt)

    def chat_prompt(messages: list[ChatMessage]) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        convo = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):  # content parts: only text is understood
                if any(p.get("type") != "text" for p in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(str(p.get("text", "")) for p in content)
            convo.append({"role": m.role, "content": content or ""})
        try:
            text = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja raise_exception(...) in templates: e.g. roles must alternate
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def engine_request(body: _SamplingFields, prompt_ids: list[int], max_tokens: int | None, prefix: str,
                       prompt_param: str) -> Request:
        if body.n != 1:
            raise APIError(400, f"only n=1 is supported, got n={body.n}", param="n")
        if body.logprobs not in (None, False, 0) or body.echo:
            raise APIError(400, "logprobs and echo are not supported", param="logprobs" if body.logprobs else "echo")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        if not 0.0 <= temperature <= 100.0:
            raise APIError(400, f"temperature must be in [0, 100], got {temperature}", param="temperature")
        if not 0.0 < top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
        if top_k < 0:
            raise APIError(400, f"top_k must be >= 0 (0 or -1 disables it), got {top_k}", param="top_k")
        if body.seed is not None and not -(2**63) <= body.seed < 2**64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if n >= max_model_len:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                                f"{n} tokens, which leaves no room for output", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_model_len - n
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if n + max_tokens > max_model_len:
            raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                                f"{n} tokens and max_tokens is {max_tokens} ({n + max_tokens} in total); reduce "
                                "the prompt or max_tokens", param="max_tokens", code="context_length_exceeded")
        k = body.num_draft_tokens if body.num_draft_tokens is not None else default_num_draft_tokens
        extra = {} if k is None else {"num_draft_tokens": k}
        return Request(f"{prefix}-{uuid.uuid4().hex}", list(prompt_ids), max_tokens,
                       SamplingParams(temperature, top_k, top_p, body.seed), stop=stop, ignore_eos=body.ignore_eos,
                       **extra)

    async def timed(gen):
        """Pass deltas through, observing TTFT, inter-token and end-to-end latency."""
        t0 = last = time.perf_counter()
        first = True
        async with aclosing(gen):  # closing us closes the engine stream now, which aborts the sequence
            async for item in gen:
                now = time.perf_counter()
                if item.token_ids:
                    (metrics.ttft if first else metrics.itl).observe(now - (t0 if first else last))
                    first, last = False, now
                if item.finished:
                    metrics.e2e.observe(now - t0)
                    metrics.success.labels(model_name, item.finish_reason or "unknown").inc()
                    if item.stats is not None:
                        metrics.prompt_tokens.inc(item.stats.prompt_tokens)
                        metrics.generation_tokens.inc(item.stats.completion_tokens)
                yield item

    async def start(req: Request):
        """Open the engine stream and wait for its first delta, so refusals become a 400 before any response."""
        gen = timed(engine_client.generate(req))
        try:
            first = await gen.__anext__()
        except ValueError as e:
            await gen.aclose()
            raise APIError(400, str(e)) from None
        except BaseException:
            await gen.aclose()
            raise
        return gen, first

    def usage(stats) -> dict:
        p, c = (stats.prompt_tokens, stats.completion_tokens) if stats else (0, 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(http: HTTPRequest, body: _SamplingFields, req: Request, chat: bool) -> Response:
        gen, first = await start(req)
        rid, obj = req.seq_id, ("chat.completion" if chat else "text_completion")
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        detok = IncrementalDetokenizer(tokenizer, req.stop)
        if not body.stream:
            async def collect():
                async with aclosing(gen):
                    item, ids = first, list(first.token_ids)
                    while not item.finished:
                        item = await gen.__anext__()
                        ids += item.token_ids
                return item, ids

            # a client that hangs up on a non-streamed request must free its slot too (vLLM's with_cancellation)
            work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnect(http))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():
                    work.cancel()  # closes `gen`, which aborts the sequence in the engine
                    await asyncio.wait({work})
            if work.cancelled():
                return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
            item, ids = work.result()
            text = detok.add(ids, True, item.stats.stop_text_end if item.stats else None)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            choice |= {"logprobs": None, "finish_reason": item.finish_reason}
            return JSONResponse(head | {"object": obj, "choices": [choice], "usage": usage(item.stats)})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list, **extra) -> str:
            payload = head | {"object": chunk_obj, "choices": choices} | extra
            if include_usage and "usage" not in extra:
                payload["usage"] = None
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def choice(text: str, finish_reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        async def events():
            async with aclosing(gen):
                try:
                    if chat:
                        yield sse([choice("", None, role=True)])
                    item = first
                    while True:
                        stats = item.stats
                        text = detok.add(item.token_ids, item.finished, stats.stop_text_end if stats else None)
                        if text or item.finished:
                            yield sse([choice(text, item.finish_reason if item.finished else None)])
                        if item.finished:
                            break
                        item = await gen.__anext__()
                    if include_usage:
                        yield sse([], usage=usage(item.stats))
                except RequestTimeout as e:  # the status line is gone: report in-band, then end the stream
                    yield f"data: {json.dumps(_error_body(str(e), 'timeout'))}\n\n"
                except Exception:  # the status line is gone: report in-band, then end the stream properly
                    log.exception("stream %s failed", rid)
                    yield f"data: {json.dumps(_error_body('internal server error', 'internal_server_error'))}\n\n"
                yield "data: [DONE]\n\n"

        return _SSEResponse(events(), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- routes -------------------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body)
        prompt_ids = completion_prompt(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        req = engine_request(body, prompt_ids, max_tokens, "cmpl", "prompt")
        return await respond(http, body, req, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body)
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        prompt_ids = chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req = engine_request(body, prompt_ids, max_tokens, "chatcmpl", "messages")
        return await respond(http, body, req, chat=True)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "specray", "max_model_len": max_model_len}]}

    @app.get("/health")
    async def health():
        try:
            await _maybe_await(engine_client.check_health())
        except Exception as e:
            return _error(503, f"engine unavailable: {e}", type="service_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        metrics.engine.latest = await _maybe_await(engine_client.stats())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _SSEResponse(StreamingResponse):
    """Always closes the event generator, also when sending fails (client gone), so the engine-side abort in its
    `finally` runs now rather than whenever the generator is garbage-collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()




async def _until_disconnect(http: HTTPRequest) -> None:
    """Return when the client has gone away (the body has been read, so the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
