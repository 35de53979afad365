"""Reading an OpenAI-style request body into a checked request, or one RequestError saying what is wrong.

Plain Python on purpose: every message names the field and what it allows, in the words the OpenAI
API uses, and this module imports nothing from the serve extra (its tests run without a server).
Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``user``, ``metadata`` ...);
fields that would change the answer in a way this server cannot honour (``n > 1``, tools, logprobs)
are refused with ``code: "unsupported_parameter"``. ``logit_bias``, ``presence_penalty`` and
``frequency_penalty`` are range-checked and handed to the sampler (``offload.generate.SamplingParams``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from offload.errors import OffloadError
from offload.settings.limits import MAX_LOGIT_BIAS, MAX_OPENAI_PENALTY, MAX_SEED

MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0 to 2
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # a logit_bias key: a token id written as a string
UNSUPPORTED = "unsupported_parameter"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(OffloadError):
    """A request the server refuses: an OpenAI error object with ``status`` (400 unless said)."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse: {"error": {message, type, param, code}}."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """What the request asks of the sampler and the stop rules; None leaves the profile's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]  # role system/user/assistant, content text; system first if any
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a usage chunk before [DONE]


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else is a RequestError."""
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as err:
        # ValueError covers bad UTF-8 and bad JSON; its text names the line and column.
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {kind_of(payload)}")
    return payload


def chat_request(payload: dict[str, Any]) -> ChatRequest:
    """Check a /v1/chat/completions body."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of messages", param="messages")
    checked = tuple(_message(index, message) for index, message in enumerate(messages))
    if checked[-1]["role"] != "user":
        raise RequestError("the last message must have role 'user'", param="messages")
    stream, include_usage = _stream(payload)
    return ChatRequest(checked, _sampling(payload, chat=True), stream, include_usage)


def completion_request(payload: dict[str, Any]) -> CompletionRequest:
    """Check a /v1/completions body: one prompt, as a string or an array of one string."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string (or an array of one)", param="prompt")
    stream, include_usage = _stream(payload)
    return CompletionRequest(_text(prompt, "prompt"), _sampling(payload, chat=False), stream, include_usage)


def _message(index: int, message: Any) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{param} must be an object with 'role' and 'content'", param=param)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a list or an object is no role (and unhashable)
        allowed = ", ".join(ROLES)
        raise RequestError(f"{param}.role is {shown(role)}; allowed roles: {allowed}", param=f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):
        # The array form: text parts only (this model reads no images or audio).
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{param}.content parts must be {{'type': 'text', 'text': ...}}; only text is supported",
                    param=f"{param}.content",
                )
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(
            f"{param}.content must be a string, got {kind_of(content)}", param=f"{param}.content"
        )
    if message.get("tool_calls"):
        raise RequestError("tool calls are not supported", param=f"{param}.tool_calls")
    return {"role": ROLES[role], "content": _text(content, f"{param}.content")}


def _sampling(payload: dict[str, Any], *, chat: bool) -> Sampling:
    n = _integer(payload, "n", 1, 1 << 31)
    if n not in (None, 1):
        raise RequestError(
            f"n must be 1: this server generates one choice per request, got {n}", param="n", code=UNSUPPORTED
        )
    for name in ("tools", "functions", "logprobs", "top_logprobs", "best_of", "echo", "suffix"):
        value = payload.get(name)
        if value and not (name == "best_of" and value == 1):  # absent, empty, false, 0 or best_of 1 are fine
            raise RequestError(f"'{name}' is not supported by this server", param=name, code=UNSUPPORTED)
    response_format = payload.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("only response_format {'type': 'text'} is supported", param="response_format")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        max_tokens = _integer(payload, name, 1, 1 << 31)
        if max_tokens is not None:
            break
    temperature = _number(payload, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(payload, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be above 0 and at most 1, got 0", param="top_p")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_integer(payload, "top_k", 0, 1 << 31),
        seed=_integer(payload, "seed", 0, MAX_SEED),
        stop=_stop(payload.get("stop")),
        presence_penalty=_number(payload, "presence_penalty", -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY) or 0.0,
        frequency_penalty=_number(payload, "frequency_penalty", -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)
        or 0.0,
        logit_bias=_logit_bias(payload.get("logit_bias")),
    )


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token ids as strings, to -100..100) as sorted (id, bias) pairs, zeros left out."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise RequestError(
            f"'logit_bias' must be an object mapping token ids to numbers, got {kind_of(bias)}",
            param="logit_bias",
        )
    pairs = []
    for token, value in bias.items():
        if not TOKEN_ID.fullmatch(token):
            raise RequestError(
                f"'logit_bias' keys must be token ids written as strings, got {shown(token)}",
                param="logit_bias",
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise RequestError(
                f"'logit_bias' values must be numbers from -100 to 100, got {shown(value)} for token {token}",
                param="logit_bias",
            )
        if value:
            pairs.append((int(token), float(value)))
    return tuple(sorted(pairs))


def _stream(payload: dict[str, Any]) -> tuple[bool, bool]:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {kind_of(stream)}", param="stream")
    options = payload.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:  # as OpenAI: options for a stream that is not there are a mistake worth saying
        raise RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(
            "'stream_options' must be an object like {'include_usage': true}", param="stream_options"
        )
    return bool(stream), bool(options.get("include_usage", False))


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(_text(s, "stop") for s in stops if s)


def _integer(payload: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    # JSON's 16.0 is an integer in OpenAI's schema; true and false are not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {kind_of(value)}", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be from {low} to {high}, got {value}", param=name)
    return value


def _number(payload: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {kind_of(value)}", param=name)
    # The range first: an integer too big for a float (9 written 400 times) compares fine but cannot
    # be converted, and NaN and inf fail the comparison anyway.
    if not low <= value <= high:
        raise RequestError(
            f"'{name}' must be a number from {low:g} to {high:g}, got {shown(value)}", param=name
        )
    return float(value)


def _text(text: str, param: str) -> str:
    # JSON can spell a lone surrogate ("\ud800"), which no tokenizer encodes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            f"'{param}' is not valid Unicode text (character {err.start})", param=param
        ) from None
    return text


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have; refuse them as the bad JSON they are.
    raise RequestError(f"the request body is not valid JSON: {name} is not a JSON value")


def kind_of(value: Any) -> str:
    """What a JSON value is, in words: "an object", "a string" ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def shown(value: Any) -> str:
    """A JSON value as a message quotes it, cut to 40 characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
