"""`offload serve` under load: concurrent clients, disconnects, a soak and a fuzz of request bodies.

OFFLOAD_SOAK_REQUESTS (default 30) and OFFLOAD_FUZZ_EXAMPLES (default 50) set the full-run sizes
(the issue's figures: 500 and 1000).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'offload[serve]')")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.serve_helpers import LiveServer  # noqa: E402

SOAK_REQUESTS = int(os.environ.get("OFFLOAD_SOAK_REQUESTS", "30"))
FUZZ_EXAMPLES = int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "50"))
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("serve-load"), "--queue", "2")
    yield live
    assert live.stop() == 0, live.stderr()


def _post(server: LiveServer, body: object, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=300)


def test_eight_clients_at_once_are_answered_or_refused_with_503(server: LiveServer) -> None:
    body = {"messages": HELLO, "temperature": 1.0, "seed": 3, "max_tokens": 48}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(server, body), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1 and "busy" in response.json()["error"]["message"]
        else:
            assert response.json()["choices"][0]["message"]["content"] is not None
    health = server.health()
    assert health["status"] == "ok" and not health["busy"] and health["queued"] == 0


# Greedy replies of the demo model that run long: a raw completion that loops until max_tokens, and a
# chat answer of about 450 tokens.
LONG = {
    "completion": ("/v1/completions", {"prompt": "def main(", "temperature": 0, "max_tokens": 4000}),
    "chat": (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Write the help text of the AST class."}],
            "temperature": 0,
            "max_tokens": 400,
        },
    ),
}


@pytest.mark.parametrize("kind", LONG)
def test_a_disconnect_mid_stream_frees_the_engine(server: LiveServer, kind: str) -> None:
    path, body = LONG[kind]
    before = server.health()["cancelled"]
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=300) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(8), strict=False) if line.startswith("data: ")]
        assert len(received) >= 3
    # The next request is answered once the cancelled one has let go of the engine.
    answer = _post(server, {"messages": HELLO, "temperature": 0, "max_tokens": 4})
    assert answer.status_code == 200
    health = server.health()
    assert health["cancelled"] == before + 1
    # Far short of max_tokens: the generation stopped at the disconnect (had it ended on its own, the
    # count of cancelled generations would not have moved).
    assert health["last_cancelled_tokens"] < body["max_tokens"] / 2


def test_a_client_gone_before_a_whole_answer_cancels_it(server: LiveServer) -> None:
    path, body = LONG["completion"]
    before = server.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 4,000 tokens are made
        httpx.post(server.url + path, json=body, timeout=1.0)
    answer = _post(server, {"messages": HELLO, "temperature": 0, "max_tokens": 4})
    assert answer.status_code == 200
    assert server.health()["cancelled"] == before + 1


def test_a_soak_of_sequential_chats_keeps_memory_flat(server: LiveServer) -> None:
    body = {"messages": HELLO, "temperature": 1.0, "max_tokens": 8}
    for _ in range(5):  # warm up: allocator pools, caches and the tokenizer reach their size
        assert _post(server, body).status_code == 200
    start = server.rss_bytes()
    for index in range(SOAK_REQUESTS):
        conversation = [{"role": "user", "content": f"Request {index}: hello"}]
        assert _post(server, {**body, "messages": conversation}).status_code == 200
    growth = server.rss_bytes() / start - 1
    print(f"soak: {SOAK_REQUESTS} requests, RSS {start / 2**20:.1f} MiB, growth {growth:+.2%}")
    assert growth < 0.05


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "", "USER"])
        | JSON_VALUES,
        "content": st.text(max_size=40) | JSON_VALUES,
    },
)
# Small token budgets (and bad ones): a valid body then answers fast.
MAX_TOKENS = st.integers(-3, 4) | st.sampled_from([0, 2**31, 2**64, 1.5, 1e300, "8", True])
BODY = st.fixed_dictionaries(
    {"max_tokens": MAX_TOKENS},
    optional={
        "messages": st.lists(MESSAGE, max_size=4) | JSON_VALUES,
        "prompt": st.text(max_size=30) | JSON_VALUES,
        "temperature": st.floats() | JSON_VALUES,
        "top_p": st.floats() | JSON_VALUES,
        "top_k": st.integers() | JSON_VALUES,
        "seed": st.integers() | JSON_VALUES,
        "stop": st.lists(st.text(max_size=5), max_size=20) | JSON_VALUES,
        "stream": st.booleans() | JSON_VALUES,
        "stream_options": JSON_VALUES,
        "n": st.integers(-1, 3) | JSON_VALUES,
        "max_completion_tokens": MAX_TOKENS,
        "tools": JSON_VALUES,
        "response_format": JSON_VALUES,
    },
)

# Bodies that are mostly right, so the fuzz reaches generation too: each field right five times in six.
TEXT = st.text(max_size=30)


def _mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(good, good, good, good, good, JSON_VALUES)


CONVERSATION = st.lists(TEXT, min_size=1, max_size=5).map(
    lambda texts: [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]
)
SAMPLING_FIELDS = {
    "temperature": _mostly(st.floats(0, 2)),
    "top_p": _mostly(st.floats(0.01, 1)),
    "top_k": _mostly(st.integers(0, 50)),
    "seed": _mostly(st.integers(0, 2**64 - 1)),
    "stop": _mostly(st.lists(st.text(min_size=1, max_size=3), max_size=3) | st.text(max_size=3)),
    "stream": _mostly(st.booleans()),
    "stream_options": _mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": _mostly(st.just(1)),
}
NEAR_CHAT = st.fixed_dictionaries(
    {"messages": _mostly(CONVERSATION), "max_tokens": st.integers(1, 4)}, optional=SAMPLING_FIELDS
)
NEAR_COMPLETION = st.fixed_dictionaries(
    {"prompt": _mostly(st.text(min_size=1, max_size=30)), "max_tokens": st.integers(1, 4)},
    optional=SAMPLING_FIELDS,
)


CASES = (
    st.tuples(st.just("/v1/chat/completions"), NEAR_CHAT)
    | st.tuples(st.just("/v1/completions"), NEAR_COMPLETION)
    | st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        BODY | JSON_VALUES | st.binary(max_size=64).map(lambda b: {"raw": b}),
    )
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=CASES)
def test_fuzzed_bodies_never_get_a_5xx(server: LiveServer, case: tuple[str, object]) -> None:
    path, body = case
    if isinstance(body, dict) and isinstance(body.get("raw"), bytes):
        content = body["raw"]
    else:
        content = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity too: invalid JSON to refuse
    response = httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}, timeout=300
    )
    event(f"{path} answered {response.status_code}")  # the spread, in --hypothesis-show-statistics
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"]["message"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
