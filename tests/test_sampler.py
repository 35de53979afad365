"""The sampler and the stop rules, as units, and what a damaged model's logits give."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.errors import OffloadError
from offload.generate import SamplingParams, stream_generate
from offload.loading import load_model
from tests.conftest import make_baby


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
