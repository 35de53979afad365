"""Request bodies read into checked requests, or one RequestError naming the field: no server needed."""

from __future__ import annotations

import pytest

from offload.serve.schema import RequestError, chat_request, completion_request, parse_json

HI = [{"role": "user", "content": "hi"}]


def _refusal(**fields: object) -> RequestError:
    with pytest.raises(RequestError) as caught:
        chat_request({"messages": HI, **fields})
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0},
        {"frequency_penalty": 0.0},
        {"presence_penalty": None, "frequency_penalty": None, "logit_bias": None},
        {"logit_bias": {}},
        {"logit_bias": {"42": 0, "7": 0.0}},
    ],
)
def test_no_op_penalties_and_biases_are_accepted(fields: dict) -> None:
    assert chat_request({"messages": HI, **fields}).messages[-1]["content"] == "hi"
    assert completion_request({"prompt": "hi", **fields}).prompt == "hi"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -2}, "frequency_penalty"),
        ({"logit_bias": {"42": 100}}, "logit_bias"),
        ({"logit_bias": {"42": 0, "7": -1.5}}, "logit_bias"),
    ],
)
def test_penalties_and_biases_that_change_the_answer_are_refused_not_ignored(
    fields: dict, param: str
) -> None:
    refusal = _refusal(**fields)
    assert refusal.status == 400
    assert refusal.body()["error"] == {
        "message": str(refusal),
        "type": "invalid_request_error",
        "param": param,
        "code": "unsupported_parameter",
    }
    assert "not supported" in str(refusal)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
        ({"frequency_penalty": "high"}, "frequency_penalty", "must be a number"),
        ({"logit_bias": [1, 2]}, "logit_bias", "an object"),
        ({"logit_bias": {"cat": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"42": 101}}, "logit_bias", "from -100 to 100"),
        ({"logit_bias": {"42": True}}, "logit_bias", "from -100 to 100"),
    ],
)
def test_penalty_and_bias_values_out_of_range_say_the_range(fields: dict, param: str, words: str) -> None:
    refusal = _refusal(**fields)
    assert (refusal.status, refusal.param, refusal.code) == (400, param, None)
    assert words in str(refusal)


@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty", "logit_bias"])
def test_a_number_too_big_for_a_float_is_a_400_not_an_overflow(name: str) -> None:
    huge = b"9" * 400
    value = b'{"1": ' + huge + b"}" if name == "logit_bias" else huge
    body = b'{"messages": [{"role": "user", "content": "hi"}], "' + name.encode() + b'": ' + value + b"}"
    with pytest.raises(RequestError) as caught:
        chat_request(parse_json(body))
    assert caught.value.param == name and "999..." in str(caught.value)


@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_a_stream_are_refused(stream: bool | None) -> None:
    body = {"stream_options": {"include_usage": True}, "stream": stream}
    for read, head in ((chat_request, {"messages": HI}), (completion_request, {"prompt": "hi"})):
        with pytest.raises(RequestError) as caught:
            read({**head, **body})
        assert caught.value.param == "stream_options" and "only allowed when 'stream' is true" in str(
            caught.value
        )
    streamed = chat_request({"messages": HI, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.stream and streamed.include_usage
    assert not chat_request({"messages": HI, "stream": stream, "stream_options": None}).include_usage
