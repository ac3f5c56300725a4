"""The OpenAI-compatible HTTP app: `create_app(llm)` -> FastAPI, routes translated to `llm.submit`.

    POST /v1/chat/completions, POST /v1/completions   (stream: true -> SSE, else one JSON body)
    GET  /v1/models, GET /health, GET /metrics

The app is thin (ARCHITECTURE section 5): each HTTP request becomes one scheduler request
(`llm.submit`), its text pieces stream out as Server-Sent Events, a client that disconnects
cancels it (its KV is freed at once), errors leave in OpenAI's shape with the right status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import errors
from .errors import APIError
from .metrics import ServerMetrics, _openai_reason
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kvtrt.serve")


def _is_error(exc: BaseException, name: str) -> bool:
    """Match runtime errors by class name through the MRO (the runtime's classes may move between modules)."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


class ServerState:
    """What the routes share: the loaded LLM (or None while loading), metrics, live requests."""

    def __init__(self, served_model_name: str, api_key: str | None, retry_after_s: int):
        self.llm: Any = None
        self.load_error: str | None = None
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.retry_after_s = retry_after_s
        self.created = int(time.time())
        self.active: set[Any] = set()
        self.draining = False
        self.metrics = ServerMetrics(lambda: self.llm, served_model_name)

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.draining


def create_app(llm: Any, served_model_name: str = "kvtrt", api_key: str | None = None, *,
               close_on_shutdown: bool | None = None, retry_after_s: int = 1) -> FastAPI:
    """The FastAPI app serving `llm`.

    llm: a loaded `kvtrt.LLM` (anything with `submit`/`encode`/`stats`), or a zero-argument callable
    that loads one: it then runs in a background thread at startup and `/health` answers 503 until it
    returns. served_model_name: the `model` clients send and `/v1/models` lists. api_key: when set,
    `/v1/*` needs `Authorization: Bearer KEY` (401 otherwise). close_on_shutdown: close the LLM when
    the app stops (default: only when the app loaded it). retry_after_s: `Retry-After` on a 429."""
    state = ServerState(served_model_name, api_key, retry_after_s)
    loader: Callable[[], Any] | None = None
    if hasattr(llm, "submit"):
        state.llm = llm
    elif callable(llm):
        loader = llm
    else:
        raise TypeError("create_app needs a loaded kvtrt LLM or a callable that loads one")
    if close_on_shutdown is None:
        close_on_shutdown = loader is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None:
            def load():
                try:
                    state.llm = loader()
                    log.info("model loaded; serving %s", served_model_name)
                except Exception as exc:  # reported by /health and every request
                    state.load_error = f"{type(exc).__name__}: {exc}"
                    log.exception("loading the model failed")

            threading.Thread(target=load, name="kvtrt-serve-load", daemon=True).start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited (up to its graceful timeout) for the
            # responses in flight; whatever still runs now is cancelled, then the scheduler stops
            state.draining = True
            for req in list(state.active):
                _cancel(req)
            if close_on_shutdown and state.llm is not None and hasattr(state.llm, "close"):
                await run_in_threadpool(state.llm.close)

    app = FastAPI(title="kvtrt", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kvtrt = state

    # -- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.error(exc.status, exc.code)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return await _api_error(request, errors.from_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code=kind, headers=dict(exc.headers or {}))
        return await _api_error(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await _api_error(request, errors.internal(f"{type(exc).__name__}: {exc}"))

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.llm is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": served_model_name}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        card = {"id": served_model_name, "object": "model", "created": state.created, "owned_by": "kvtrt"}
        if state.llm is not None:
            card["max_model_len"] = state.llm.manifest.max_positions
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _guarded(_complete(state, request, "chat"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _guarded(_complete(state, request, "completion"))

    return app


async def _guarded(call):
    """Any failure that is not already an `APIError` becomes an OpenAI-shaped 500 (logged once)."""
    try:
        return await call
    except APIError:
        raise
    except Exception as exc:
        log.exception("request failed")
        raise errors.internal(f"{type(exc).__name__}: {exc}") from None


def _version() -> str:
    from .. import __version__

    return __version__


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not token and request.headers.get("x-api-key"):
        scheme, token = "bearer", request.headers["x-api-key"]
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise errors.unauthorized()


async def _parse(request: Request, model: type) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise errors.bad_request(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_body")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation(exc.errors(include_url=False)) from None
    parsed.check_supported()
    return parsed


def _cancel(req: Any) -> None:
    try:
        req.cancel()
    except Exception:  # cancelling a finished request is harmless, never an error to report
        log.debug("cancel failed", exc_info=True)


def _submit(state: ServerState, body: Any, kind: str) -> tuple[Any, int]:
    """Encode the prompt and submit it (runs in a worker thread). -> (request, prompt tokens)."""
    llm = state.llm
    what = "messages" if kind == "chat" else "prompt"
    try:
        if kind == "chat":
            ids = llm.encode(body.chat_messages())
        else:
            prompt = body.single_prompt()
            ids = llm.encode(prompt)
    except APIError:
        raise
    except Exception as exc:  # a chat template refusing the roles, ids out of the vocabulary
        raise errors.bad_request(f"{what}: {exc}", param=what, code="invalid_value") from None
    limit = llm.manifest.max_positions
    requested = body.limit()
    if requested is None:
        max_new = limit - len(ids)
        if max_new < 1:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens, and the {what} hold {len(ids)} tokens, "
                f"leaving no room for the completion. Please shorten the {what}.", param=what)
    else:
        max_new = requested
        if len(ids) + max_new > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_new} tokens ({len(ids)} in the {what}, {max_new} for the completion). "
                f"Please reduce the length of the {what} or the completion.", param=what)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    seed = body.seed if body.seed is not None else (secrets.randbits(31) if temperature > 0 else 0)
    kw: dict[str, Any] = dict(max_new_tokens=max_new, temperature=temperature,
                              top_k=max(0, body.top_k or 0), top_p=1.0 if body.top_p is None else float(body.top_p),
                              seed=seed, stop=body.stop_strings())
    if body.kv is not None:
        kw["kv"] = body.kv
    if body.repetition_penalty is not None:
        kw["repetition_penalty"] = float(body.repetition_penalty)
    if body.min_tokens:
        kw["min_new_tokens"] = body.min_tokens
    if body.ignore_eos:
        kw["ignore_eos"] = True
    try:
        req = llm.submit(ids, **kw)
    except Exception as exc:
        raise _map_submit_error(exc, state, what) from None
    return req, len(ids)


def _map_submit_error(exc: Exception, state: ServerState, what: str) -> APIError:
    message = str(exc)
    if _is_error(exc, "QueueFullError"):
        return errors.queue_full(f"the server's queue is full: {message}", state.retry_after_s)
    if _is_error(exc, "KVSpecError"):
        return errors.bad_request(f"kv: {message}", param="kv", code="invalid_kv_spec")
    if _is_error(exc, "PromptTooLongError"):
        return errors.context_length_exceeded(message, param=what)
    if _is_error(exc, "KVMemoryError"):
        return errors.bad_request(message, param="max_tokens", code="kv_memory_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return errors.bad_request(message, code="invalid_value")
    if isinstance(exc, RuntimeError) and "clos" in message.lower():  # submit after llm.close(): draining
        return errors.not_ready("the server is shutting down")
    return errors.internal(f"{type(exc).__name__}: {message}")


async def _complete(state: ServerState, request: Request, kind: str):
    _authorize(state, request)
    if state.load_error:
        raise errors.internal(f"the model failed to load: {state.load_error}")
    if state.draining:
        raise errors.not_ready("the server is shutting down")
    if state.llm is None:
        raise errors.not_ready()
    body = await _parse(request, ChatCompletionRequest if kind == "chat" else CompletionRequest)
    if body.model is not None and body.model != state.served_model_name:
        raise errors.model_not_found(body.model, state.served_model_name)
    req, prompt_tokens = await run_in_threadpool(_submit, state, body, kind)
    state.active.add(req)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, req, kind, rid, created, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(state, request, req, kind, rid, created)


def _usage(result: Any) -> dict[str, int]:
    prompt = len(result.prompt_ids)
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _result(req: Any) -> Any:
    """The finished request's result (its stream has ended, so this does not wait for decoding)."""
    return await run_in_threadpool(req.result, 60.0)


async def _drain(req: Any) -> None:
    async for _ in req.astream():
        pass


async def _whole(state: ServerState, request: Request, req: Any, kind: str, rid: str, created: int):
    """A non-streaming answer; a client that goes away cancels the request."""
    done = False
    stream = asyncio.ensure_future(_drain(req))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not stream.done():  # the client left first
            state.metrics.client_cancelled()
            return Response(status_code=499)
        stream.result()  # re-raise a failure of the request
        result = await _result(req)
        done = True
    except Exception as exc:
        raise errors.internal(f"generation failed: {type(exc).__name__}: {exc}") from None
    finally:
        gone.cancel()
        if not done:
            stream.cancel()
            _cancel(req)
        state.active.discard(req)
    state.metrics.observe(result)
    reason = _openai_reason(result.finish_reason)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": state.served_model_name,
            "system_fingerprint": None, "choices": [choice], "usage": _usage(result)}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only `http.disconnect` comes)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(state: ServerState, req: Any, kind: str, rid: str, created: int,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: `data: {chunk}` per text piece, a last chunk with finish_reason, `data: [DONE]`.

    Starlette cancels this generator when the client disconnects; the `finally` then cancels the
    request so its KV is freed at once."""
    model = state.served_model_name
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(piece: str | None, reason: str | None = None, role: bool = False) -> dict:
        if kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if piece is not None:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
        out = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
               "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    finished = False
    try:
        if kind == "chat":
            yield _event(chunk("", role=True))
        async for piece in req.astream():
            if piece:
                yield _event(chunk(piece))
        result = await _result(req)
        finished = True
        state.metrics.observe(result)
        yield _event(chunk(None if kind == "chat" else "", _openai_reason(result.finish_reason)))
        if include_usage:
            yield _event({"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
                          "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        if not finished:
            state.metrics.client_cancelled()
        raise
    except Exception as exc:  # the response has started: the error travels as an event
        log.exception("stream %s failed", rid)
        err = errors.internal(f"generation failed: {type(exc).__name__}: {exc}")
        state.metrics.error(err.status, err.code)
        yield _event(err.body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            _cancel(req)
        state.active.discard(req)
