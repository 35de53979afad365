"""Fuzzing config.json, its quantization block, and profiles (``tests/fuzz_support.py`` says how)."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.config import ModelConfig
from offload.loading import load_model
from offload.quant.scheme import BLOCK_FORMAT, QuantScheme
from offload.settings.profile import BUNDLED_DIR, Profile
from tests.fuzz_support import (
    SPECS,
    TINY,
    fuzz,
    json_scalars,
    json_values,
    mangled,
    one_in,
    refused_or_accepted,
    replace_file,
    tiny_model,
)

# --- config.json and its quantization block ----------------------------------------------------------

CONFIG_KEYS = [*TINY, "rope_theta", "rms_norm_eps", "head_dim", "sliding_window", "tie_word_embeddings"]
CONFIG_KEYS += ["bos_token_id", "eos_token_id", "torch_dtype", "dtype", "model_type", "rope_parameters"]
CONFIG_KEYS += ["quantization"]


@st.composite
def quant_blocks(draw: st.DrawFn, num_layers: int | None = None) -> Any:
    """A quantization block, valid or not in every way; ``num_layers`` makes the expert list mostly fit."""
    if one_in(draw, 10):
        return draw(json_values)
    bad = st.sampled_from(SPECS) | st.text(max_size=10) | json_scalars

    def spec(good: list[str]) -> Any:
        return draw(bad) if one_in(draw, 12) else draw(st.sampled_from(good))

    sizes = [0, 1, 2, 5] if num_layers is None or one_in(draw, 6) else [num_layers]
    bad_format = st.sampled_from(["offload-quant/2", 1, None])
    block: dict[str, Any] = {"format": draw(bad_format) if one_in(draw, 8) else BLOCK_FORMAT}
    for role in ("attention", "gate", "embed", "lm_head"):
        if not one_in(draw, 12):
            block[role] = spec(["none"] if role == "embed" else SPECS[:8])
    block["experts"] = [spec(SPECS[:8]) for _ in range(draw(st.sampled_from(sizes)))]
    if one_in(draw, 6):
        block[draw(st.text(max_size=8))] = draw(json_values)
    return block


@st.composite
def damaged_config(draw: st.DrawFn, valid: bytes) -> bytes:
    if one_in(draw, 4):
        return draw(mangled(valid, b'{"a":[', b'{"vocab_size": N}'))
    raw = json.loads(valid)
    values = (
        st.sampled_from([0, -1, 1, 2, 8, 16, 2**31, 2**62, 10**30, 0.0, -1.0, 1e-300, 1e308, 5e-324])
        | st.sampled_from(["mixtral", "bfloat16", "float64", "true", None, True, False])
        | json_values
    )
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10))
        if one_in(draw, 5):
            raw.pop(key, None)
        elif key == "quantization":
            layers = raw.get("num_hidden_layers")
            fits = type(layers) is int and 0 < layers < 8  # an earlier change may have broken it
            raw[key] = draw(quant_blocks(layers if fits else None))
        elif key == "rope_parameters":
            raw[key] = draw(st.fixed_dictionaries({"rope_theta": values}) | values)
        else:
            raw[key] = draw(values)
    return json.dumps(raw).encode()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tiny_model(tmp_path_factory.mktemp("fuzz-config") / "model")
    shutil.copy(directory / "config.json", directory.parent / "valid-config.json")
    return directory


@fuzz
@given(data=st.data())
def test_damaged_config_json_is_refused_cleanly(config_dir: Path, data: st.DataObject) -> None:
    valid = (config_dir.parent / "valid-config.json").read_bytes()
    replace_file(config_dir / "config.json", data.draw(damaged_config(valid)))
    config = refused_or_accepted(lambda: ModelConfig.from_file(config_dir / "config.json"))
    if config is not None:
        # Whatever the config says, loading against the real weights ends cleanly too.
        refused_or_accepted(lambda: load_model(config_dir, device="cpu"))


@fuzz
@given(data=st.data(), num_layers=st.integers(1, 4))
def test_damaged_quantization_block_is_refused_cleanly(data: st.DataObject, num_layers: int) -> None:
    block = data.draw(quant_blocks(num_layers))
    scheme = refused_or_accepted(lambda: QuantScheme.from_block(block, num_layers))
    if scheme is not None:
        assert QuantScheme.from_block(scheme.as_block(num_layers), num_layers) == scheme


# --- profiles ------------------------------------------------------------------------------------------

PROFILE_KEYS = {
    "device": ["kind", "memory_gib", "link_gbps"],
    "cache": ["experts_per_layer"],
    "prefetch": ["enabled", "experts"],
    "quant": ["attention", "experts", "gate", "embed", "lm_head", "experts_overrides"],
    "generation": ["max_new_tokens", "temperature", "top_p", "top_k", "context"],
}
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, 1, 2, -1, 2**63 - 1, 10**30, "auto", "all", "cpu", "cuda", "²", "-1", "0", "99"])
    | st.floats()  # nan and inf included: TOML has both
    | st.text(max_size=12)
    | st.sampled_from(SPECS)
    | st.datetimes()
    | st.dates()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


GOOD_PROFILE_VALUES: dict[str, list[Any]] = {
    "memory_gib": [4.0, 12, 0.5],
    "link_gbps": [12.0, 1],
    "experts_per_layer": [1, 2, "auto", "all", [1], [2, 2]],
    "policy": ["lrfu", "lru"],
    "enabled": [True, False],
    "experts": [0, 1, 2],
    "experts_overrides": [{}, {"0": "hqq:3:64"}, {"-1": "none"}],
    "max_new_tokens": [1, 64],
    "temperature": [0, 0.7],
    "top_p": [0.9, 1.0],
    "top_k": [0, 40],
    "context": [16, 64, 4096],
}


@st.composite
def profile_tables(draw: st.DrawFn) -> dict[str, Any]:
    """Profile tables, mostly with good values; any key may hold something else entirely."""
    raw: dict[str, Any] = {}
    if draw(st.booleans()):
        raw["name"] = draw(st.just("fuzzed") | toml_values)
    for section, keys in PROFILE_KEYS.items():
        if one_in(draw, 4):
            continue
        if one_in(draw, 20):
            raw[section] = draw(toml_values)
            continue
        table = {}
        for key in draw(st.lists(st.sampled_from(keys), unique=True)):
            good = st.sampled_from(GOOD_PROFILE_VALUES.get(key, SPECS[:8]))
            table[key] = draw(good | good | good | toml_values)
        if section == "device" and not one_in(draw, 4):
            table["kind"] = draw(st.sampled_from(["cpu", "cuda"]))
        if section == "quant" and "experts_overrides" in table and one_in(draw, 4):
            keys = st.sampled_from(["0", "-1", "1", "²", "٣", "9" * 30, "x", ""]) | st.text(max_size=4)
            table["experts_overrides"] = draw(
                st.dictionaries(keys, st.sampled_from(SPECS) | toml_values, max_size=3)
            )
        raw[section] = table
    if one_in(draw, 10):
        raw[draw(st.text(max_size=6))] = draw(toml_values)
    return raw


@fuzz
@given(raw=profile_tables())
def test_damaged_profile_tables_are_refused_cleanly(raw: dict[str, Any]) -> None:
    config = ModelConfig.from_dict(TINY)
    profile = refused_or_accepted(lambda: Profile.from_dict(raw, source="fuzz.toml"))
    if profile is not None:
        refused_or_accepted(lambda: profile.for_model(config))
        again = Profile.from_dict(tomllib.loads(profile.to_toml()), source="fuzz.toml")
        assert again == profile, "to_toml must read back to the same profile"


@fuzz
@given(data=st.data())
def test_damaged_profile_file_is_refused_cleanly(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    valid = (BUNDLED_DIR / "rtx3060-12gb.toml").read_bytes()
    path = tmp_path_factory.getbasetemp() / "fuzz-profile.toml"
    path.write_bytes(data.draw(mangled(valid, b"a = [", b"[generation]\nmax_new_tokens = N\n")))
    profile = refused_or_accepted(lambda: Profile.from_file(path))
    if profile is not None:
        refused_or_accepted(lambda: profile.for_model(ModelConfig.from_dict(TINY)))


def test_profile_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    from offload.errors import ProfileError

    for path in (Path("/dev/zero"), tmp_path):  # /dev/zero would be read forever
        with pytest.raises(ProfileError, match="not a regular file"):
            Profile.from_file(path)
