"""Quantization benchmarks: size of every expert spec, convert's peak RSS, decode speed per spec on CPU.

    nice -n 10 python benchmarks/quant_specs.py sizes
    nice -n 10 python benchmarks/quant_specs.py rss --experts bnb:nf4 --attention hqq:4:64
    nice -n 10 python benchmarks/quant_specs.py decode

Each prints a markdown table (and ``--json FILE`` keeps the raw numbers). Random models are written once
under ``--workdir`` by a streaming writer, one layer at a time, so making a 3 GB model does not take 3 GB of
RAM; ``--clean`` deletes them afterwards. Run from the repository root: convert runs as a user runs it,
``python -c "from cli.main import run; run()" convert ...``, in a child process whose peak RSS is read back.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

EXPERT_SPECS = ["none", "hqq:2:16", "hqq:3:64", "hqq:4:64", "hqq:8:64", "bnb:nf4", "bnb:fp4", "bnb:int8"]
MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_local_experts": 8}
# At least 3 GB in fp32: 8 layers x 8 experts of 1024 x 3584, vocab 32000 (about 3.2e9 bytes).
BIG = {
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "vocab_size": 32000,
}
MID = {**BIG, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 4}  # tens of ms per token


def write_random_checkpoint(directory: Path, shape: dict[str, int], seed: int = 0) -> Path:
    """A random fp32 Mixtral in the hub's layout, one shard per layer, written one layer at a time."""
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    hidden, ffn, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
    head_dim, kv = hidden // heads, shape["num_key_value_heads"] * (hidden // heads)
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, columns: int) -> torch.Tensor:
        # std 2 / sqrt(fan_in), as tests/baby.py: routing a little sharper than the default init.
        return torch.randn(rows, columns, generator=generator) * (2 / columns**0.5)

    def shard(index: int) -> dict[str, torch.Tensor]:
        if index == 0:
            return {
                "model.embed_tokens.weight": matrix(shape["vocab_size"], hidden),
                "model.norm.weight": torch.ones(hidden),
                "lm_head.weight": matrix(shape["vocab_size"], hidden),
            }
        prefix = f"model.layers.{index - 1}"
        tensors = {
            f"{prefix}.input_layernorm.weight": torch.ones(hidden),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{prefix}.block_sparse_moe.gate.weight": matrix(shape["num_local_experts"], hidden),
        }
        for name, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            tensors[f"{prefix}.self_attn.{name}.weight"] = matrix(rows, hidden)
        for expert in range(shape["num_local_experts"]):
            base = f"{prefix}.block_sparse_moe.experts.{expert}"
            tensors |= {f"{base}.w1.weight": matrix(ffn, hidden), f"{base}.w3.weight": matrix(ffn, hidden)}
            tensors[f"{base}.w2.weight"] = matrix(hidden, ffn)
        return tensors

    weight_map: dict[str, str] = {}
    count = shape["num_hidden_layers"] + 1
    for index in range(count):
        tensors = shard(index)  # one layer in RAM at a time
        filename = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, filename)
        del tensors
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json))
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **shape,
        "head_dim": head_dim,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))  # last: marks it complete
    return directory


def directory_bytes(directory: Path) -> int:
    """Bytes of every safetensors file in ``directory``."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_convert(source: Path, destination: Path, *flags: str) -> tuple[dict[str, Any], float, int]:
    """`offload convert --json` in a child process: (report, wall seconds, the child's peak RSS in bytes)."""
    command = [
        sys.executable,
        "-c",
        "from cli.main import run; run()",
        "convert",
        str(source),
        str(destination),
    ]
    started = time.perf_counter()
    done = subprocess.run([*command, *flags, "--force", "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"convert failed: {done.stderr.strip()}")
    # Linux reports ru_maxrss in KiB; this script's only child is the one just run.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return json.loads(done.stdout), seconds, peak


def sizes() -> list[dict[str, Any]]:
    """Bytes and bits per weight of one Mixtral 8x7B expert per spec, by arithmetic (bf16 for none)."""
    from offload.quant.codec import expert_nbytes
    from offload.quant.spec import QuantSpec

    hidden, ffn = MIXTRAL["hidden_size"], MIXTRAL["intermediate_size"]
    experts = MIXTRAL["num_hidden_layers"] * MIXTRAL["num_local_experts"]
    rows = []
    for text in EXPERT_SPECS:
        nbytes = expert_nbytes(QuantSpec.parse(text), hidden, ffn, torch.bfloat16)
        rows.append(
            {
                "spec": text,
                "expert_mib": nbytes / 2**20,
                "bits_per_weight": 8 * nbytes / (3 * hidden * ffn),
                "all_experts_gib": experts * nbytes / 2**30,
            }
        )
    return rows


def rss(workdir: Path, attention: str, experts: str) -> dict[str, Any]:
    """Convert the 3 GB model once in a child process and report its peak RSS."""
    source = write_random_checkpoint(workdir / "big-fp32", BIG)
    destination = workdir / "big-converted"
    report, seconds, peak = run_convert(source, destination, "--attention", attention, "--experts", experts)
    return {
        "source_bytes": directory_bytes(source),
        "output_bytes": directory_bytes(destination),
        "attention": attention,
        "experts": experts,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "layer_fp32_bytes": BIG["num_local_experts"] * 3 * BIG["hidden_size"] * BIG["intermediate_size"] * 4,
        "report": report,
    }


def decode(workdir: Path, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Per expert spec: convert the mid-size model, then median decode tok/s resident and offloaded (K=2).

    The runs go round-robin over every (spec, mode), so a change in the machine's load hits all of them alike.
    """
    from offload.generate import SamplingParams, stream_generate
    from offload.loading import OffloadOptions, load_model

    source = write_random_checkpoint(workdir / "mid-fp32", MID)
    prompt = torch.randint(3, MID["vocab_size"], (16,), generator=torch.Generator().manual_seed(1)).tolist()
    modes = {"resident": None, "offloaded": OffloadOptions(2, prefetch=0, link="local")}
    rows, models = [], {}
    for text in EXPERT_SPECS:
        destination = workdir / f"mid-{text.replace(':', '-')}"
        saved = workdir / f"{destination.name}.json"  # a converted model is reused by later runs
        if not saved.is_file():
            attention = "none" if text == "none" else "hqq:4:64"
            report, seconds, _ = run_convert(source, destination, "--attention", attention, "--experts", text)
            saved.write_text(json.dumps({"report": report, "seconds": seconds}))
        converted = json.loads(saved.read_text())
        experts_row = next(row for row in converted["report"]["roles"] if row["role"] == "experts")
        rows.append(
            {
                "spec": text,
                "attention": converted["report"]["quantization"]["attention"],
                "convert_seconds": converted["seconds"],
                "measured_bits_per_weight": experts_row["bits_per_weight"],
                "output_error": experts_row["output_error"],
                "size_bytes": directory_bytes(destination),
            }
        )
        for mode, offload in modes.items():
            models[text, mode] = load_model(destination, offload=offload)
        print(f"converted and loaded {text}", file=sys.stderr, flush=True)
    speeds: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            # No stop ids: a random model may well pick EOS, and every run must decode ``tokens``.
            sampling = SamplingParams(temperature=0)
            responses = list(
                stream_generate(model, prompt, max_new_tokens=tokens, sampling=sampling, stop_ids=())
            )
            speeds[key].append(responses[-1].timings.decode_tokens_per_second)
    for row in rows:
        for mode in modes:
            row[f"{mode}_tok_s"] = statistics.median(speeds[row["spec"], mode])
            row[f"{mode}_tok_s_runs"] = speeds[row["spec"], mode]
    return rows


def markdown(kind: str, result: Any) -> str:
    """The result as a markdown table."""
    if kind == "sizes":
        lines = [
            "| expert spec | MiB per expert | bits/weight | all 256 experts (GiB) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{r['spec']}` | {r['expert_mib']:.1f} | {r['bits_per_weight']:.3f} | {r['all_experts_gib']:.1f} |"
            for r in result
        ]
    elif kind == "rss":
        gb = 1e9
        lines = [
            "| source (fp32) | output | specs | convert wall time | peak RSS | one layer's experts in fp32 |",
            "|---|---|---|---|---|---|",
            f"| {result['source_bytes'] / gb:.2f} GB | {result['output_bytes'] / gb:.2f} GB | attention "
            f"`{result['attention']}`, experts `{result['experts']}` | {result['seconds']:.0f} s | "
            f"{result['peak_rss_bytes'] / 2**30:.2f} GiB | {result['layer_fp32_bytes'] / 2**20:.0f} MiB |",
        ]
    else:
        lines = [
            "| expert spec | attention | bits/weight (measured) | output error | size (MiB) | convert (s) "
            "| decode tok/s resident | decode tok/s offloaded K=2 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `{r['spec']}` | `{r['attention']}` | {r['measured_bits_per_weight']:.3f} | "
            f"{_number(r['output_error'])} | {r['size_bytes'] / 2**20:.0f} | {r['convert_seconds']:.0f} | "
            f"{r['resident_tok_s']:.1f} | {r['offloaded_tok_s']:.1f} |"
            for r in result
        ]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("sizes", "rss", "decode"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/offload-quant-bench"))
    parser.add_argument("--attention", default="hqq:4:64", help="rss: the attention spec")
    parser.add_argument("--experts", default="bnb:nf4", help="rss: the experts spec")
    parser.add_argument("--tokens", type=int, default=64, help="decode: new tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="decode: runs per spec and mode (median)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--clean", action="store_true", help="delete --workdir when done")
    args = parser.parse_args()
    if args.kind == "sizes":
        result: Any = sizes()
    elif args.kind == "rss":
        result = rss(args.workdir, args.attention, args.experts)
    else:
        result = decode(args.workdir, args.tokens, args.repeats)
    print(markdown(args.kind, result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
