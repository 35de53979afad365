"""`offload serve` through the official openai client and raw HTTP, against a live server on the demo model."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'offload[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx")

from offload.checkpoint.hub import DEMO_MODEL as DEMO  # noqa: E402
from offload.tokenizer import Tokenizer  # noqa: E402
from tests.serve_helpers import LiveServer  # noqa: E402

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # 4 expert slots per layer of 8: the cache works, so the answers carry a hit rate.
    live = LiveServer(tmp_path_factory.mktemp("serve"), "--experts-per-layer", "4", "--queue", "2")
    yield live
    # Ctrl-C, as in a terminal: a clean stop, exit 0, no traceback (SIGTERM: test_serve_safety.py).
    assert live.stop(signal.SIGINT) == 0
    assert "Traceback" not in live.stderr() and live.stderr().rstrip().endswith("stopped")


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(server: LiveServer, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120, **kwargs)


def test_chat_answer_has_text_usage_and_the_engine_figures(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="demo", messages=HELLO, temperature=0, max_tokens=24)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    figures = answer.model_extra["offload"]
    assert figures["decode_tokens_per_second"] > 0 and figures["prompt_tokens_per_second"] > 0
    assert 0 <= figures["hit_rate"] <= 1 and figures["bytes_moved"] > 0
    assert figures["prefetch_precision"] is None or 0 <= figures["prefetch_precision"] <= 1


def test_streamed_answer_is_the_same_text_with_usage_last(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="demo", messages=HELLO, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=HELLO,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_stop_string_ends_the_reply_before_it(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="demo", messages=HELLO, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text.split()[2]  # a word from the middle of the greedy reply
    cut = client.chat.completions.create(
        model="demo", messages=HELLO, temperature=0, max_tokens=24, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model="demo", messages=HELLO, temperature=1.0, seed=seed, max_tokens=24
        )
        return answer.choices[0].message.content

    assert sample(7) == sample(7)


def test_logit_bias_and_penalties_change_the_answer(client: openai.OpenAI) -> None:
    def complete(max_tokens: int, **fields: object) -> str:
        answer = client.completions.create(
            model="demo", prompt="The cat", max_tokens=max_tokens, temperature=0, **fields
        )
        return answer.choices[0].text

    tokenizer = Tokenizer.from_dir(DEMO)
    prompt_ids = tokenizer.encode("The cat", add_bos=True)
    first = tokenizer.encode("The cat" + complete(1), add_bos=True)[len(prompt_ids)]  # the greedy first token
    text = complete(4)
    assert complete(4, presence_penalty=0, frequency_penalty=0, logit_bias={}) == text
    banned = complete(4, logit_bias={str(first): -100})
    assert tokenizer.encode("The cat" + banned, add_bos=True)[len(prompt_ids)] != first
    assert complete(24, frequency_penalty=2) != complete(24)  # its 24 greedy tokens repeat some
    with pytest.raises(openai.BadRequestError) as refused:
        complete(1, logit_bias={"99999999": 5})
    assert refused.value.param == "logit_bias" and "out of range" in str(refused.value)


def test_models_list_names_the_loaded_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["demo"]


def test_one_model_can_be_retrieved_by_its_id(client: openai.OpenAI) -> None:
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_model_not_served_here_is_404_model_not_found(server: LiveServer, path: str) -> None:
    body = {"messages": HELLO, "prompt": "Hello", "max_tokens": 2}
    response = httpx.post(server.url + path, json={**body, "model": "gpt-4o"}, timeout=120)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (
        error["message"].startswith("the model 'gpt-4o' does not exist here") and "'demo'" in error["message"]
    )
    assert {k: v for k, v in error.items() if k != "message"} == {
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    # The served id, or no model at all, is answered.
    for named in ({"model": "demo"}, {}):
        assert httpx.post(server.url + path, json={**body, **named}, timeout=120).status_code == 200


def test_completions_endpoint_continues_a_raw_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="demo", prompt="def main(", temperature=0, max_tokens=6)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 6
    streamed = client.completions.create(
        model="demo", prompt="def main(", temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    # The text continues the prompt's: its first word keeps its space, so prompt + text reads right.
    answer = client.completions.create(
        model="demo", prompt="The capital of France", temperature=0, max_tokens=4
    )
    assert answer.choices[0].text.startswith(" ")  # the demo's greedy "▁of": " of", not "of"


def test_continuing_the_conversation_reuses_the_kv_cache(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="demo", messages=HELLO, temperature=0, max_tokens=16)
    reply = {"role": "assistant", "content": first.choices[0].message.content}
    follow = [*HELLO, reply, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="demo", messages=follow, temperature=0, max_tokens=8)
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused == second.model_extra["offload"]["reused_prompt_tokens"]
    assert first.usage.prompt_tokens < reused < second.usage.prompt_tokens
    other = [{"role": "user", "content": "Something else"}]
    fresh = client.chat.completions.create(model="demo", messages=other, temperature=0, max_tokens=4)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0


def test_a_reply_cut_by_a_stop_string_is_still_continued_from_the_cache(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="demo", messages=HELLO, temperature=0, max_tokens=24)
    stop = full.choices[0].message.content.split()[2]
    cut = client.chat.completions.create(
        model="demo", messages=HELLO, temperature=0, max_tokens=24, stop=stop
    )
    reply = {"role": "assistant", "content": cut.choices[0].message.content}  # what the client got
    follow = [*HELLO, reply, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="demo", messages=follow, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= cut.usage.prompt_tokens


def test_sse_framing_is_data_lines_ending_with_done(server: LiveServer) -> None:
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]  # ":" lines are keep-alive pings
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "offload" in chunks[-1]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_with_include_usage_every_chunk_before_the_last_has_usage_null(server: LiveServer, path: str) -> None:
    body = {"messages": HELLO, "prompt": "Hello", "temperature": 0, "max_tokens": 8, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as response:
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(line) for line in data[:-1]]
    assert len(chunks) >= 3 and all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


BAD_BODIES = {
    "not json": (b"{messages: oops", "not valid JSON"),
    "NaN temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
    "an array": (b"[1, 2]", "JSON object"),
    "no messages": (b"{}", "messages"),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "wizard"),
    "role an array": (b'{"messages": [{"role": [], "content": "hi"}]}', "role"),
    "content a number": (b'{"messages": [{"role": "user", "content": 5}]}', "content"),
    "n = 2": (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n must be 1"),
    "negative max_tokens": (
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
        "max_tokens",
    ),
    "huge max_tokens": (
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e30}',
        "max_tokens",
    ),
    "string temperature": (
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
        "temperature",
    ),
    "temperature 5": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 5}', "temperature"),
    "stop a number": (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 3}', "stop"),
    "stream a string": (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    "stream_options, no stream": (
        b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}',
        "stream_options",
    ),
    "two users in a row": (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
        "alternate",
    ),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "Unicode"),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_requests_get_an_openai_error_object_with_400(server: LiveServer, name: str) -> None:
    body, words = BAD_BODIES[name]
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]


def test_a_prompt_over_the_context_says_both_sizes(server: LiveServer) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 5000}]}
    response = _chat(server, long)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "4096" in message and "the prompt is" in message
    tokens = int(message.split("the prompt is ")[1].split()[0])
    assert tokens > 4096
    # Text too long to fit however it tokenizes is refused before it is tokenized, with both sizes too.
    longer = _chat(server, {"messages": [{"role": "user", "content": "x" * 200_000}]})
    message = longer.json()["error"]["message"]
    assert longer.status_code == 400 and "200,0" in message and "4,096 tokens" in message
    fits = {"messages": HELLO, "max_tokens": 4095}
    response = _chat(server, fits)
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "4095" in message and "4096" in message


def _post_prompt(server: LiveServer, param: str, text: str) -> httpx.Response:
    """``text`` as the one user message (param "messages") or as the raw prompt (param "prompt")."""
    if param == "messages":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"prompt": text}
    return httpx.post(server.url + path, json=body, timeout=120)


@pytest.mark.parametrize("param", ["messages", "prompt"])
def test_text_over_the_byte_limit_is_a_context_length_error_like_too_many_tokens(
    server: LiveServer, param: str
) -> None:
    # 900,000 bytes: under the 1 MiB body cap, over the 16 bytes a token that 4,096 tokens can hold.
    by_bytes = _post_prompt(server, param, "x" * 900_000)
    by_tokens = _post_prompt(server, param, "word " * 5000)
    assert by_bytes.status_code == by_tokens.status_code == 400
    for response in (by_bytes, by_tokens):
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "context_length_exceeded")
        assert "\n" not in error["message"]
    message = by_bytes.json()["error"]["message"]
    assert message.startswith("the prompt is 900,000 bytes of text, more than the 65,536 bytes"), message


def test_a_raw_prompt_over_the_context_says_both_sizes(server: LiveServer) -> None:
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "word " * 5000}, timeout=120)
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "the prompt is" in message and "4096 tokens" in message


def test_a_body_over_the_cap_is_refused(server: LiveServer) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = _chat(server, huge)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_unknown_routes_and_methods_are_json_errors(server: LiveServer) -> None:
    missing = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(server.url + "/v1/chat/completions", timeout=30)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_the_page_is_one_self_contained_html_file(server: LiveServer) -> None:
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Nothing fetched from elsewhere: no absolute URL in a src, href or fetch.
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text
