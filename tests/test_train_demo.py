"""The demo-model trainer (scripts/train_demo.py) and the model it shipped in offload/demo/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "offload" / "demo"
SHIPPED_FILES = {"config.json", "model.safetensors", "tokenizer.json"}
MAX_DEMO_BYTES = 30_000_000
TEXT = "What does json.dumps do?\n    Indented, with ünïcode ☃ and <s> spelled out."


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, read from its header."""
    with safe_open(str(path), "pt") as file:
        return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny model trained on a 40-item corpus by the real script."""
    work = tmp_path_factory.mktemp("train-demo")
    out = work / "tiny"
    command = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--config", "tiny", "--steps", "3"]
    command += ["--limit", "40", "--out", str(out), "--corpus-cache", str(work / "corpus.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_trainer_writes_exactly_the_hub_files(tiny_model: Path) -> None:
    assert {p.name for p in tiny_model.iterdir()} == SHIPPED_FILES
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is False
    shapes = tensor_shapes(tiny_model / "model.safetensors")
    # The hub's per-expert names, not transformers' in-memory fused tensors.
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in shapes
    assert not any("gate_up_proj" in name for name in shapes)
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as file:
        assert file.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_trained_model_loads_and_matches_transformers(tiny_model: Path) -> None:
    from transformers import MixtralForCausalLM

    from offload.tokenizer import Tokenizer

    chat = Tokenizer.from_file(tiny_model / "tokenizer.json")
    ids = chat.encode_chat([{"role": "user", "content": "What does json.dumps do?"}]) + chat.encode_reply(
        "It"
    )
    oracle, info = MixtralForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    with torch.no_grad():
        expected = oracle.eval()(torch.tensor([ids])).logits
    assert expected.shape == (1, len(ids), oracle.config.vocab_size)

    from offload.loading import load_model

    model = load_model(tiny_model, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_trained_tokenizer_is_sentencepiece_shaped(tiny_model: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from offload.tokenizer import Tokenizer

    raw = HFTokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert [raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    chat = Tokenizer.from_file(tiny_model / "tokenizer.json")
    ids = chat.encode(TEXT)
    assert 0 not in ids  # byte fallback: no <unk>, whatever the characters
    assert chat.decode(ids) == TEXT
    assert (chat.bos_id, chat.eos_id) == (1, 2)


def test_corpus_and_tokenizer_are_deterministic() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_demo_corpus
    import train_demo

    first, second = (build_demo_corpus.build_corpus(seed=0, limit=30) for _ in range(2))
    assert first == second
    assert first["train"]["pairs"] and first["train"]["docs"]
    texts = [d["text"] for d in first["train"]["docs"]]
    assert train_demo.train_tokenizer(texts, 400).to_str() == train_demo.train_tokenizer(texts, 400).to_str()


def test_shipped_demo_is_complete_and_small() -> None:
    assert {p.name for p in DEMO.iterdir()} == SHIPPED_FILES
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= MAX_DEMO_BYTES


def test_shipped_demo_matches_what_transformers_writes(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    raw = json.loads((DEMO / "config.json").read_text())
    config = MixtralConfig.from_pretrained(DEMO)
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA, as in Mixtral
    assert raw["dtype"] == "bfloat16" and raw["tie_word_embeddings"] is False
    # A random model of the same config, saved by transformers, is the reference key set and shapes.
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert tensor_shapes(DEMO / "model.safetensors") == tensor_shapes(tmp_path / "model.safetensors")


def test_shipped_demo_loads_with_our_loader_like_transformers() -> None:
    from transformers import MixtralForCausalLM

    from offload.loading import load_model
    from offload.tokenizer import Tokenizer

    ids = Tokenizer.from_file(DEMO / "tokenizer.json").encode_chat(
        [{"role": "user", "content": "Explain re."}]
    )
    with torch.no_grad():
        expected = (
            MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()(torch.tensor([ids])).logits
        )
        logits = load_model(DEMO, device="cpu", dtype=torch.float32)(torch.tensor([ids]))
    assert (logits - expected).abs().max().item() < 1e-4


def test_shipped_tokenizer_fits_the_model() -> None:
    from offload.tokenizer import Tokenizer

    config = json.loads((DEMO / "config.json").read_text())
    chat = Tokenizer.from_file(DEMO / "tokenizer.json")
    assert chat.vocab_size == config["vocab_size"]
    assert (chat.bos_id, chat.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    assert chat.decode(chat.encode(TEXT)) == TEXT
