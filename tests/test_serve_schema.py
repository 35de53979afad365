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
    "fields, presence, frequency, bias",
    [
        ({"presence_penalty": 0}, 0.0, 0.0, ()),
        ({"presence_penalty": None, "frequency_penalty": None, "logit_bias": None}, 0.0, 0.0, ()),
        ({"presence_penalty": 0.5, "frequency_penalty": -2}, 0.5, -2.0, ()),
        ({"logit_bias": {}}, 0.0, 0.0, ()),
        ({"logit_bias": {"42": 0, "7": 0.0}}, 0.0, 0.0, ()),  # zero biases change nothing: left out
        ({"logit_bias": {"42": 100, "7": -1.5, "9": 0}}, 0.0, 0.0, ((7, -1.5), (42, 100.0))),
    ],
)
def test_penalties_and_biases_reach_the_sampler(
    fields: dict, presence: float, frequency: float, bias: tuple
) -> None:
    for request in (chat_request({"messages": HI, **fields}), completion_request({"prompt": "hi", **fields})):
        sampling = request.sampling
        assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias) == (
            presence,
            frequency,
            bias,
        )


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
