"""ModelConfig reads both config.json dialects and names the key on every error."""

import json
from pathlib import Path

import pytest

from offload.config import ModelConfig
from offload.errors import ConfigError

HUB_CONFIG = Path(__file__).parent / "fixtures" / "mixtral-8x7b-instruct-v0.1" / "config.json"


def test_hub_dialect_reads_mixtral_8x7b() -> None:
    config = ModelConfig.from_file(HUB_CONFIG)
    assert config.hidden_size == 4096
    assert config.head_dim == 128
    assert config.rope_theta == 1e6
    assert config.torch_dtype == "bfloat16"
    assert config.kv_groups == 4
    assert config.sliding_window is None


def test_transformers5_dialect_reads_rope_parameters_and_dtype() -> None:
    raw = json.loads(HUB_CONFIG.read_text())
    del raw["rope_theta"], raw["torch_dtype"]
    raw |= {
        "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
        "dtype": "float32",
        "head_dim": None,
    }
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 5000.0
    assert config.torch_dtype == "float32"
    assert config.head_dim == 128


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"vocab_size": "big"}, "vocab_size"),
        ({"hidden_size": 4095}, "num_attention_heads"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_local_experts": 0}, "num_local_experts"),
    ],
)
def test_bad_config_names_the_key(change: dict, named: str) -> None:
    raw = json.loads(HUB_CONFIG.read_text()) | change
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_dict(raw, source="x/config.json")


def test_missing_and_malformed_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
