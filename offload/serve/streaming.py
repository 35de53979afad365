"""One answer in the OpenAI formats: chunks for a stream (ending with [DONE]) or one whole object.

Chat chunks are ``chat.completion.chunk`` objects (a first chunk with the role, one per piece of
text, a last one with ``finish_reason``); completions are ``text_completion`` objects. The last
chunk, and the whole answer, carry the engine's figures under ``offload``; ``usage`` is in the whole
answer always, and in a stream as its own chunk (empty ``choices``) when ``include_usage`` is set
(every chunk before it then has ``"usage": null``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request

from offload.serve.worker import Failure, Finish, Job, Piece


class Answer:
    """The answer to one job, read from the job's events."""

    def __init__(self, model: str, job: Job, *, chat: bool, include_usage: bool) -> None:
        self.model, self.job, self.chat, self.include_usage = model, job, chat, include_usage
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def events(self, ending: anyio.Event) -> AsyncIterator[str]:
        """The SSE data lines of a stream; ``ending`` is set when the server shuts down."""
        job = self.job
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, None)
            while True:
                event = await _next(job, ending)
                if event is None:  # shutting down: end the stream with an error the client can read
                    job.cancel.set()
                    yield json.dumps(_error(503, "the server is shutting down"))
                    yield "[DONE]"
                    return
                if isinstance(event, Piece):
                    if event.text:
                        yield self._chunk({"content": event.text} if self.chat else event.text, None)
                    continue
                if isinstance(event, Failure):
                    yield json.dumps(_error(event.status, event.message))
                    yield "[DONE]"
                    return
                yield self._chunk({} if self.chat else "", event.finish_reason, offload=event.figures)
                if self.include_usage:
                    yield json.dumps({**self._head(), "choices": [], "usage": _usage(event)})
                yield "[DONE]"
                return
        finally:
            # A client gone (or any other end) stops the generation within one token; after a finish
            # this changes nothing.
            job.cancel.set()

    async def whole(self, request: Request) -> dict[str, Any] | None:
        """The whole answer, or None when the client disconnected first (the job is then cancelled)."""
        job = self.job
        gone = asyncio.ensure_future(_disconnected(request))
        pieces: list[str] = []
        try:
            while True:
                waiting = asyncio.ensure_future(job.events.get())
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    return None
                event = waiting.result()
                if isinstance(event, Piece):
                    pieces.append(event.text)
                    continue
                if isinstance(event, Failure):
                    body = _error(event.status, event.message)
                    body["error"]["status"] = event.status
                    return body
                return self._whole("".join(pieces), event)
        finally:
            gone.cancel()
            job.cancel.set()

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: Any, finish_reason: str | None, **extra: Any) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        # With include_usage, OpenAI's chunks carry "usage": null until the last one, which has the figures.
        usage = {"usage": None} if self.include_usage else {}
        return json.dumps({**self._head(), "choices": [choice], **usage, **extra})

    def _whole(self, text: str, finish: Finish) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish.finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.finish_reason}
            kind = "text_completion"
        return {
            **self._head(),
            "object": kind,
            "choices": [choice],
            "usage": _usage(finish),
            "offload": finish.figures,
        }


async def _next(job: Job, ending: anyio.Event) -> Piece | Finish | Failure | None:
    """The job's next event, or None once the server is shutting down."""
    if ending.is_set():
        return None
    waiting = asyncio.ensure_future(job.events.get())
    stopping = asyncio.ensure_future(ending.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


async def _disconnected(request: Request) -> None:
    # Once the body is read, the next ASGI message is the disconnect (or nothing, until the answer).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(finish: Finish) -> dict[str, Any]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        # OpenAI's own field for prompt tokens read from a cache: here, the KV cache kept from the last turn.
        "prompt_tokens_details": {"cached_tokens": finish.figures["reused_prompt_tokens"]},
    }


def _error(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
