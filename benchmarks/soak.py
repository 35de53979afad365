"""Soak: many scripted chat turns on a small offloaded model; memory and caches must stay bounded.

    python benchmarks/soak.py --turns 1000            # the full run recorded in docs/RELIABILITY.md
    python benchmarks/soak.py --turns 50 --json out.json

The model is a random Mixtral in the hub's format (written here with safetensors, no transformers)
with Mixtral's real tokenizer, offloaded with K=2 of 8 experts per layer, so the expert cache loads
and evicts on every turn. Replies are short and the context is 512 tokens, so it fills every dozen
turns and ``ChatSession`` drops the oldest turns. Every 100 turns the chat is saved and loaded back.

What it checks, after a warm-up that lets the allocators and the KV cache reach their working size:
RSS grows by less than 5%, the KV cache never grows past the context and stops growing, and each
layer's expert cache holds at most K experts in the same K slots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from offload.checkpoint.reader import expected_tensors
from offload.config import ModelConfig

SENTENCES = (
    "What does json.dumps do with a tuple?",
    "Explain the difference between a list and a deque in two lines.",
    "How do I read a file line by line?",
    "Why is my loop slow when I append to a string?",
    "Give an example of a context manager.",
    "What is the default encoding of open()?",
)


def sentencepiece_model() -> Path:
    """Mixtral-8x7B v0.1's tokenizer.model, as mistral-common ships it."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_random_mixtral(
    directory: Path,
    *,
    seed: int = 0,
    tokenizer: Path | None = None,
    **sizes: Any,
) -> Path:
    """A random Mixtral checkpoint in the hub's format (one model.safetensors), with ``tokenizer`` copied in.

    ``sizes`` override the config.json keys below; weights are scaled so activations stay in range.
    """
    raw = {
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **sizes,
    }
    directory.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(raw)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if len(shape) == 1:  # norms
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 2 / shape[-1] ** 0.5
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, directory / tokenizer.name.removesuffix(".v1"))
    return directory


def rss_bytes() -> int:
    """This process's resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class SoakResult:
    turns: int
    seconds: float
    warmup_turns: int
    rss_after_warmup_mib: float
    rss_final_mib: float
    rss_growth: float  # (final - after warm-up) / after warm-up
    rss_max_mib: float
    kv_capacity_max: int  # positions the KV cache could hold, at most, over the run
    kv_bytes_after_warmup: int
    kv_bytes_final: int
    context: int  # the model's window: the KV cache may never hold more
    experts_per_layer: int  # K
    resident_max: int  # the most experts any layer's cache held at once
    cache_bytes_initial: int
    cache_bytes_final: int
    dropped_turns: int  # turns ChatSession forgot to make room
    reply_tokens: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_soak(
    turns: int = 1000,
    *,
    model_dir: Path | None = None,
    experts_per_layer: int = 2,
    max_new_tokens: int = 8,
    context: int = 512,
    max_rss_growth: float = 0.05,
    progress: bool = False,
) -> SoakResult:
    """Run ``turns`` chat turns and check that memory and caches stay bounded (see the module docstring).

    ``context`` is the window of the random model written when ``model_dir`` is None.
    """
    from offload.chat import ChatSession
    from offload.engine import Engine
    from offload.generate import SamplingParams
    from offload.settings.flags import LoadFlags

    with tempfile.TemporaryDirectory(prefix="offload-soak-") as scratch:
        directory = model_dir or write_random_mixtral(
            Path(scratch) / "model", tokenizer=sentencepiece_model(), max_position_embeddings=context
        )
        flags = LoadFlags(
            profile="cpu",
            device="cpu",
            dtype="float32",
            experts_per_layer=experts_per_layer,
            prefetch=2,
            link="local",
        )
        engine = Engine.load(directory, flags)
        cache = engine.model.expert_source.cache
        session = ChatSession(
            engine,
            system="Answer briefly.",
            sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=0),
            max_new_tokens=max_new_tokens,
        )
        saved = Path(scratch) / "chat.json"
        context = engine.model.config.max_position_embeddings
        warmup = 0  # set once the context has filled: the KV cache is then at its largest
        cache_bytes_initial = cache.nbytes
        rss_after_warmup = kv_bytes_after_warmup = 0
        kv_capacity_max = resident_max = reply_tokens = 0
        rss_max = rss_bytes()
        problems: list[str] = []
        started = time.perf_counter()
        for turn in range(turns):
            text = f"Turn {turn}. {SENTENCES[turn % len(SENTENCES)]}"
            reply_tokens += sum(r.token is not None for r in session.send(text))
            if turn % 100 == 99:
                session.save(saved)
                session.load(saved)
            kv_capacity_max = max(kv_capacity_max, session.cache.capacity)
            resident_max = max(
                resident_max, *(len(cache.resident(layer)) for layer in range(cache.num_layers))
            )
            rss_max = max(rss_max, rss_bytes())
            if not warmup and session.dropped_turns and turn + 1 >= turns // 10:
                # A few turns past the first full context, so the allocators have reached their working size.
                warmup = turn + 6
            if turn + 1 == warmup:
                rss_after_warmup, kv_bytes_after_warmup = rss_bytes(), session.cache.nbytes
            if progress and turn % 100 == 99:
                print(f"turn {turn + 1}: RSS {rss_bytes() / 2**20:.1f} MiB", file=sys.stderr)
        seconds = time.perf_counter() - started
        rss_final = rss_bytes()

    if not rss_after_warmup:
        raise ValueError(f"{turns} turns are too few: the context must fill and leave turns to measure")
    growth = (rss_final - rss_after_warmup) / rss_after_warmup
    if growth >= max_rss_growth:
        problems.append(f"RSS grew by {growth:.1%} after the warm-up (allowed: {max_rss_growth:.0%})")
    if kv_capacity_max > context:
        problems.append(f"the KV cache grew to {kv_capacity_max} positions, past the context of {context}")
    if session.cache.nbytes != kv_bytes_after_warmup:
        problems.append(
            f"the KV cache grew after the warm-up: {kv_bytes_after_warmup} -> {session.cache.nbytes} B"
        )
    if resident_max > experts_per_layer:
        problems.append(
            f"a layer's expert cache held {resident_max} experts, more than K={experts_per_layer}"
        )
    if cache.nbytes != cache_bytes_initial:
        problems.append(f"the expert cache's slots changed: {cache_bytes_initial} -> {cache.nbytes} B")
    if session.dropped_turns == 0:
        problems.append("the context never filled: the soak did not exercise dropping old turns")
    return SoakResult(
        turns=turns,
        seconds=seconds,
        warmup_turns=warmup,
        rss_after_warmup_mib=rss_after_warmup / 2**20,
        rss_final_mib=rss_final / 2**20,
        rss_growth=growth,
        rss_max_mib=rss_max / 2**20,
        kv_capacity_max=kv_capacity_max,
        kv_bytes_after_warmup=kv_bytes_after_warmup,
        kv_bytes_final=session.cache.nbytes,
        context=context,
        experts_per_layer=experts_per_layer,
        resident_max=resident_max,
        cache_bytes_initial=cache_bytes_initial,
        cache_bytes_final=cache.nbytes,
        dropped_turns=session.dropped_turns,
        reply_tokens=reply_tokens,
        problems=problems,
    )


def main() -> int:
    """Command line: run the soak, print the figures, exit 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000, help="chat turns to run (default 1000)")
    parser.add_argument(
        "--experts-per-layer", type=int, default=2, help="K device slots per layer (default 2)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="reply length cap (default 8)")
    parser.add_argument("--context", type=int, default=512, help="the model's context window (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny matrices)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run_soak(
        args.turns,
        experts_per_layer=args.experts_per_layer,
        max_new_tokens=args.max_new_tokens,
        context=args.context,
        progress=True,
    )
    figures = {**asdict(result), "ok": result.ok}
    for key, value in figures.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
