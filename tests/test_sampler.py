"""The sampler and the stop rules, as units, and what a damaged model's logits give.

Distributions are computed by hand from logits chosen so that the softmax is exact: log(p).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from offload.errors import OffloadError
from offload.generate import Sampler, SamplingParams, stream_generate
from offload.loading import load_model
from tests.conftest import make_baby

PROBS = [0.4, 0.3, 0.2, 0.1]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def distribution(logits: torch.Tensor, seen: tuple[int, ...] = (), **params: float) -> list[float]:
    weights = Sampler(SamplingParams(**params), torch.device("cpu"), seen=seen).weights(logits)
    return (weights / weights.sum()).tolist()


def greedy(logits: torch.Tensor, seen: tuple[int, ...] = (), **params: float) -> int:
    return int(Sampler(SamplingParams(temperature=0, **params), torch.device("cpu"), seen=seen)(logits))


def test_temperature_zero_is_the_best_token() -> None:
    assert greedy(torch.tensor([0.1, 3.0, -1.0, 2.9])) == 1


def test_temperature_one_keeps_the_model_distribution() -> None:
    assert distribution(LOGITS, temperature=1) == pytest.approx(PROBS)


def test_temperature_two_takes_the_square_root_of_each_probability() -> None:
    roots = [math.sqrt(p) for p in PROBS]
    assert distribution(LOGITS, temperature=2) == pytest.approx([r / sum(roots) for r in roots])


def test_top_k_keeps_the_k_likeliest() -> None:
    assert distribution(LOGITS, temperature=1, top_k=2) == pytest.approx([4 / 7, 3 / 7, 0, 0])


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.6, [4 / 7, 3 / 7, 0, 0]),  # 0.4 < 0.6, so the second stays; 0.7 reaches it, so the third goes
        (0.4, [1, 0, 0, 0]),  # the first alone reaches 0.4
        (0.95, [0.4, 0.3, 0.2, 0.1]),  # 0.9 < 0.95: everything stays
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: list[float]) -> None:
    assert distribution(LOGITS, temperature=1, top_p=top_p) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.6, [4 / 7, 3 / 7, 0, 0]),  # threshold 0.24: 0.2 and 0.1 go
        (0.3, [4 / 9, 3 / 9, 2 / 9, 0]),  # threshold 0.12: only 0.1 goes
        (1.0, [1, 0, 0, 0]),  # only the likeliest token
    ],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_likeliest(min_p: float, expected: list[float]) -> None:
    assert distribution(LOGITS, temperature=1, min_p=min_p) == pytest.approx(expected)


def test_min_p_applies_after_temperature() -> None:
    # At temperature 2 the probabilities are proportional to sqrt(p): 0.1 is above 0.5 * max then.
    roots = [math.sqrt(p) for p in PROBS]
    assert distribution(LOGITS, temperature=2, min_p=0.5) == pytest.approx([r / sum(roots) for r in roots])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 1.5])
    # Seen ids 0 and 1 with penalty 2: logits become [1.0, -2.0, 0.5, 1.5].
    penalized = torch.softmax(torch.tensor([1.0, -2.0, 0.5, 1.5]), dim=-1).tolist()
    assert distribution(logits, seen=(0, 1), temperature=1, repetition_penalty=2) == pytest.approx(penalized)
    assert greedy(logits) == 0
    assert greedy(logits, seen=(0, 1), repetition_penalty=2) == 3
    assert greedy(logits, seen=(0, 1), repetition_penalty=1) == 0


def test_the_penalty_remembers_the_generated_tokens() -> None:
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=4), torch.device("cpu"))
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert int(sampler(logits)) == 0
    sampler.observe([0])
    assert int(sampler(logits)) == 1  # 2.0 / 4 = 0.5 < 1.0


def test_openai_penalties_count_the_reply_not_the_prompt() -> None:
    # OpenAI's rule: a logit loses presence once its id has appeared in the reply, and frequency per time.
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3)
    sampler = Sampler(params, torch.device("cpu"), seen=[0, 0, 0])  # the prompt's ids are not counted
    logits = torch.tensor([2.0, 1.5, 0.0])
    assert int(sampler(logits)) == 0
    sampler.observe([0])  # 2.0 - 0.5 - 0.3 = 1.2 < 1.5
    assert int(sampler(logits)) == 1
    sampler.observe([1, 1])  # 1.5 - 0.5 - 0.6 = 0.4 < 1.2
    assert int(sampler(logits)) == 0
    weights = Sampler(SamplingParams(temperature=1, frequency_penalty=2), torch.device("cpu"))
    weights.observe([0, 0])
    expected = torch.softmax(LOGITS - torch.tensor([4.0, 0, 0, 0]), -1)
    assert (weights.weights(LOGITS) / weights.weights(LOGITS).sum()).tolist() == pytest.approx(
        expected.tolist()
    )


def test_a_negative_presence_penalty_favours_repeats() -> None:
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=-2), torch.device("cpu"))
    logits = torch.tensor([2.0, 1.0])
    sampler.observe([1])
    assert int(sampler(logits)) == 1  # 1.0 + 2 > 2.0


def test_logit_bias_bans_or_forces_a_token() -> None:
    assert greedy(LOGITS, logit_bias=((0, -100.0),)) == 1
    assert greedy(LOGITS, logit_bias=((3, 100.0),)) == 3
    assert distribution(LOGITS, temperature=1, logit_bias=((0, -100.0),))[0] < 1e-40
    with pytest.raises(OffloadError, match="logit_bias token id 9 is out of range: the vocabulary has 4"):
        greedy(LOGITS, logit_bias=((9, 1.0),))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", 1000.0),
        ("repetition_penalty", float("nan")),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", float("nan")),
        ("logit_bias", ((1, 101.0),)),
        ("logit_bias", ((-1, 1.0),)),
    ],
)
def test_out_of_range_controls_are_refused(field: str, value: float) -> None:
    with pytest.raises(OffloadError, match=field):
        SamplingParams(**{field: value})


class ScriptedModel:
    """Stands in for MixtralModel: its logits make greedy decoding produce ``script`` in order."""

    def __init__(self, script: list[int], vocab: int = 16) -> None:
        self.script, self.vocab = iter(script), vocab
        self.config = SimpleNamespace(max_position_embeddings=512, eos_token_id=2)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __call__(self, inputs: torch.Tensor, cache: object, last_only: bool) -> torch.Tensor:
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, next(self.script)] = 1.0
        return logits


PIECES = {3: "Hel", 4: "lo ", 5: "wor", 6: "ld", 7: "EN", 8: "D", 9: "!", 10: "d", 11: "xyz"}


class PieceTokenizer:
    """Each id is one fixed piece of text (enough for the stop rules, which work on text)."""

    def stream_decoder(self, context: tuple[int, ...] = ()) -> SimpleNamespace:
        return SimpleNamespace(push=lambda token: PIECES[token], flush=lambda: "")


def run(script: list[int], stop_strings: tuple[str, ...], max_new_tokens: int = 16) -> list:
    return list(
        stream_generate(
            ScriptedModel(script),
            [1],
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=0),
            stop_strings=stop_strings,
            tokenizer=PieceTokenizer(),
            cache=SimpleNamespace(length=0),
        )
    )


def test_a_stop_string_split_across_tokens_ends_the_reply_and_is_not_emitted() -> None:
    responses = run([3, 4, 7, 8, 9, 9], ("END",))
    assert "".join(r.text for r in responses) == "Hello "
    assert [r.token for r in responses] == [3, 4, 7, 8]
    assert responses[-1].finish_reason == "stop" and responses[-1].stop == "END"
    assert all("E" not in r.text for r in responses)  # "EN" was held back, never shown


def test_a_held_back_prefix_that_does_not_become_a_stop_string_is_emitted() -> None:
    responses = run([7, 10, 9, 2], ("END",))
    assert "".join(r.text for r in responses) == "ENd!"
    assert responses[-1].finish_reason == "stop" and responses[-1].stop is None  # the EOS


def test_the_earliest_of_several_stop_strings_wins() -> None:
    responses = run([3, 11, 9], ("z", "y"))  # both arrive in one token: "y" comes first in the text
    assert "".join(r.text for r in responses) == "Helx"
    assert responses[-1].stop == "y"


def test_a_stop_prefix_held_at_the_token_limit_is_emitted() -> None:
    responses = run([3, 4, 7], ("END",), max_new_tokens=3)
    assert "".join(r.text for r in responses) == "Hello EN"
    assert responses[-1].finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_an_error_greedy_or_sampled(tmp_path: Path, temperature: float) -> None:
    from safetensors.torch import load_file, save_file

    # A final norm this large is finite in the file but overflows float16: the logits become NaN.
    directory = make_baby(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] *= 1e5
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(directory, dtype="float16")
    sampling = SamplingParams(temperature=temperature, seed=0)
    with pytest.raises(OffloadError, match=r"NaN or inf logits.*--dtype float32"):
        list(stream_generate(model, [1, 2, 3], max_new_tokens=4, sampling=sampling))
