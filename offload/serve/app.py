"""The HTTP side of `offload serve`: OpenAI-style routes on Starlette, streams through sse-starlette.

Every refusal is an OpenAI error object ({"error": {message, type, param, code}}) with a 4xx status;
the engine runs on the Worker's thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from offload.engine import Engine
from offload.errors import OffloadError
from offload.generate import MAX_BYTES_PER_TOKEN, MIN_TEMPERATURE, oversized_text, text_byte_limit
from offload.serve import streaming
from offload.serve.schema import (
    RequestError,
    Sampling,
    chat_request,
    completion_request,
    kind_of,
    parse_json,
    shown,
)
from offload.serve.worker import Busy, Job, Worker

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a full context of text, far less than a memory problem
OPEN_PATHS = {"/health", "/"}  # the page is static; its API calls carry the key


class Server:
    """The routes' shared state: the engine, its worker and the server's options."""

    def __init__(
        self, engine: Engine, *, queue_size: int, api_key: str | None, max_body_bytes: int, model_name: str
    ) -> None:
        self.engine = engine
        self.worker = Worker(engine, queue_size)
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name
        self.created = int(time.time())

    def model(self) -> dict[str, Any]:
        """The served model as an OpenAI model object."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "offload"}

    def check_model(self, model: Any) -> None:
        """Refuse a request for a model this server does not serve (a missing ``model`` means this one)."""
        if model is None or model == self.model_name:
            return
        if not isinstance(model, str):
            raise RequestError(f"'model' must be a string, got {kind_of(model)}", param="model")
        raise RequestError(
            f"the model {shown(model)} does not exist here; this server serves {self.model_name!r}",
            status=404,
            param="model",
            code="model_not_found",
        )

    def check_text_fits(self, text: str, param: str) -> None:
        """Refuse, before it is tokenized, text too long to fit the context however it tokenizes."""
        context = self.engine.model.config.max_position_embeddings
        size = oversized_text(text, context)
        if size is not None:
            raise RequestError(
                f"the prompt is {size:,} bytes of text, more than the {text_byte_limit(context):,} bytes "
                f"({MAX_BYTES_PER_TOKEN} a token) that the model's context of {context:,} tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    def job(self, sampling: Sampling, prompt_tokens: int, **prompt: Any) -> Job:
        """A job for a prompt of ``prompt_tokens``, or a RequestError when it cannot fit the context."""
        context = self.engine.model.config.max_position_embeddings
        if prompt_tokens >= context:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens",
                param="messages" if "messages" in prompt else "prompt",
                code="context_length_exceeded",
            )
        if sampling.max_tokens is not None and prompt_tokens + sampling.max_tokens > context:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {sampling.max_tokens}; together they "
                f"exceed the model's context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = sampling.temperature
        if temperature is not None and temperature < MIN_TEMPERATURE:
            temperature = 0.0  # below the sampler's floor the answer is the greedy one anyway
        vocabulary = self.engine.model.config.vocab_size
        outside = [token for token, _ in sampling.logit_bias if token >= vocabulary]
        if outside:
            raise RequestError(
                f"'logit_bias' token id {outside[0]} is out of range: the vocabulary has {vocabulary} tokens",
                param="logit_bias",
            )
        params = self.engine.sampling(
            temperature,
            sampling.top_p,
            sampling.top_k,
            sampling.seed,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=sampling.logit_bias,
        )
        return Job(
            sampling=params,
            max_new_tokens=self.engine.max_new_tokens(sampling.max_tokens, prompt_tokens),
            stop=sampling.stop,
            loop=asyncio.get_running_loop(),
            **prompt,
        )

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read up to the body cap."""
        cap = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = RequestError(f"the request body is over the {cap}-byte limit", status=413)
        if declared.isdigit() and int(declared) > cap:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        return parse_json(b"".join(chunks))


def create_app(
    engine: Engine,
    *,
    queue_size: int = 4,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    model_name: str | None = None,
) -> ASGIApp:
    """The ASGI app serving ``engine`` as ``model_name`` (default: its directory's name); its worker
    thread starts here.
    """
    server = Server(
        engine,
        queue_size=queue_size,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        model_name=model_name or engine.directory.name,
    )

    async def page(request: Request) -> Response:
        html = resources.files("offload.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": server.model_name, **server.worker.status()})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [server.model()]})

    async def model(request: Request) -> Response:
        try:
            server.check_model(request.path_params["model"])
        except OffloadError as err:
            return error(err)
        return JSONResponse(server.model())

    async def chat_completions(request: Request) -> Response:
        try:
            payload = await server.body(request)
            server.check_model(payload.get("model"))
            chat = chat_request(payload)
            server.check_text_fits("".join(m["content"] for m in chat.messages), "messages")
            # Off the event loop: tokenizing a long prompt must not hold up /health or a stream.
            prompt_tokens = len(await asyncio.to_thread(engine.tokenizer.encode_chat, list(chat.messages)))
            job = server.job(chat.sampling, prompt_tokens, messages=chat.messages)
        except OffloadError as err:
            return error(err)
        return await run(request, job, chat.stream, chat.include_usage, chat=True)

    async def completions(request: Request) -> Response:
        try:
            payload = await server.body(request)
            server.check_model(payload.get("model"))
            completion = completion_request(payload)
            server.check_text_fits(completion.prompt, "prompt")
            prompt_ids = await asyncio.to_thread(engine.prompt_ids, completion.prompt, chat=False)
            job = server.job(completion.sampling, len(prompt_ids), prompt_ids=prompt_ids)
        except OffloadError as err:
            return error(err)
        return await run(request, job, completion.stream, completion.include_usage, chat=False)

    async def run(request: Request, job: Job, stream: bool, include_usage: bool, *, chat: bool) -> Response:
        try:
            server.worker.submit(job)
        except Busy as busy:
            refusal = RequestError(str(busy), status=503, code="server_busy")
            return JSONResponse(refusal.body(), 503, headers={"Retry-After": str(busy.retry_after)})
        answer = streaming.Answer(server.model_name, job, chat=chat, include_usage=include_usage)
        if stream:
            ending = anyio.Event()  # sse-starlette sets it on Ctrl-C or SIGTERM; the stream then ends itself
            return EventSourceResponse(
                answer.events(ending), sep="\n", shutdown_event=ending, shutdown_grace_period=2
            )
        body = await answer.whole(request)
        if body is None:
            return Response(status_code=499)  # the client left; nothing is sent
        if "error" in body:
            return JSONResponse(body, body["error"].pop("status"))
        return JSONResponse(body)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "method not allowed here" if status == 405 else f"no route {request.url.path}"
        return JSONResponse(RequestError(message, status=status).body(), status)

    async def internal(request: Request, exc: Exception) -> Response:
        return JSONResponse(RequestError(f"internal error: {type(exc).__name__}", status=500).body(), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.worker.stop()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found, Exception: internal},
        lifespan=lifespan,
    )
    app.state.server = server
    return _Auth(app, api_key) if api_key else app


def error(err: OffloadError) -> Response:
    """An OffloadError as the OpenAI error object; a RequestError keeps its status."""
    if not isinstance(err, RequestError):
        err = RequestError(str(err))
    return JSONResponse(err.body(), err.status)


class _Auth:
    """Every path but /health and the page needs ``Authorization: Bearer KEY``; the key is compared in
    constant time, the scheme in any case (RFC 9110: ``bearer KEY`` is the same).
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)):
                refusal = RequestError(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    status=401,
                    code="invalid_api_key",
                )
                response = JSONResponse(refusal.body(), 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
