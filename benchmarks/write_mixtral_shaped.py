"""Write a Mixtral-8x7B-shaped checkpoint with random weights, as ``offload convert`` would have written it.

    python benchmarks/write_mixtral_shaped.py /tmp/real-mixtral              # the real size, about 25 GB
    python benchmarks/write_mixtral_shaped.py /tmp/tiny --layers 2 --hidden 64 --ffn 128 --heads 4 --kv-heads 2
    python benchmarks/write_mixtral_shaped.py /tmp/bf16-2l --layers 2 --float  # a float source for `offload convert`

For speed and memory figures at the real size (issue 17) without quantizing 47 B weights: codes are random bytes
(every byte is a valid packed code), scales are positive and finite, chosen so each matrix keeps its input's
scale, and zeros sit mid-range; dense tensors are normal with std 1/sqrt(fan_in) and norms are ones. The output
is a converted checkpoint: config.json with the ``quantization`` block ``QuantScheme.as_block`` makes, shards named
and laid out as convert lays them out (the embedding, the final norm and lm_head, then one shard per layer, or
packed up to ``--shard-gb``), the index, and Mixtral's own tokenizer.model (vocabulary 32000, from mistral-common),
or the demo's tokenizer.json padded to the vocabulary. ``--float`` writes the hub's bf16 float form instead.

Each shard is written tensor by tensor straight into the file (the safetensors header is known up front), so the
writer holds one tensor at a time, never a shard. Every file is written to a temporary name, fsynced and renamed;
config.json comes last, so a directory without it never loads. A failed run removes what it wrote.
Random routing is near uniform, unlike a trained model's: cache hit rates on this model are a floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from offload.checkpoint.convert_output import SHARD_NAME
from offload.checkpoint.hub import DEMO_MODEL
from offload.checkpoint.reader import INDEX_FILE, expected_tensors
from offload.checkpoint.weights import MATRICES, role_spec
from offload.config import ModelConfig
from offload.errors import CheckpointError, OffloadError, QuantError
from offload.quant.linear import matrix_nbytes
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec

# The real Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1's config.json).
MIXTRAL = {
    "layers": 32,
    "hidden": 4096,
    "ffn": 14336,
    "experts_count": 8,
    "top_k": 2,
    "heads": 32,
    "kv_heads": 8,
    "vocab": 32000,
}
# hqq:4:64 is the expert spec with CPU kernels (offload/quant/host_kernels.py): on this machine any other spec is
# dequantized to bf16 at load, 94 GB. The GPU profiles ship hqq:3:64 experts; pass --experts hqq:3:64 for those.
DEFAULT_EXPERTS = "hqq:4:64"
DEFAULT_ATTENTION = "hqq:4:64"  # what the GPU profiles ship
MIXTRAL_VOCAB = 32000
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}
SAFETENSORS_DTYPES[torch.int32] = "I32"
SPARE_BYTES = 1 << 30  # free space left over after the write, for the filesystem and everything else
CHUNK = 1 << 24  # random values drawn per step: bounds the writer's memory whatever the tensor's size


@dataclass(frozen=True)
class Entry:
    """One stored tensor: its name, dtype and shape, and how its values are drawn."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # "ones" | "normal" | "codes" | "scale" | "zero"
    fan_in: int = 1  # normal: std 1/sqrt(fan_in); scale: the matrix's row length
    bits: int = 0  # codes, scale, zero: the spec's bits

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """config.json in the form transformers 5 writes for Mixtral, at the given dims."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.ffn,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": args.heads,
        "num_experts_per_tok": args.top_k,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "num_local_experts": args.experts_count,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": args.vocab,
    }


def stored_matrix(module: str, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> list[Entry]:
    """The tensors ``offload convert`` stores for one (out, in) matrix under ``spec``, without quantizing.

    hqq packs the (groups, group) code matrix into ``groups * bits / 8`` uint8 rows (2, 4 and 8 bits) or, at 3 bits,
    ten codes per int32 in ``ceil(groups / 10)`` rows; scale and zero are fp16, one per group of a row.
    """
    out_features, in_features = shape
    if spec.backend == "none":
        entries = [Entry(f"{module}.weight", dtype, shape, "normal", in_features)]
    elif spec.backend == "hqq":
        group = spec.group_size
        groups = out_features * in_features // group
        rows = math.ceil(groups / 10) if spec.bits == 3 else groups * spec.bits // 8
        codes = torch.int32 if spec.bits == 3 else torch.uint8
        meta = (out_features, in_features // group)
        entries = [
            Entry(f"{module}.W_q", codes, (rows, group), "codes", in_features, spec.bits),
            Entry(f"{module}.scale", torch.float16, meta, "scale", in_features, spec.bits),
            Entry(f"{module}.zero", torch.float16, meta, "zero", in_features, spec.bits),
        ]
    else:
        raise QuantError(f"{spec}: this writer makes hqq or none matrices; write bnb with `offload convert`")
    # matrix_nbytes also checks that the spec fits the shape (a one-line QuantError).
    wanted = matrix_nbytes(spec, shape, dtype)
    if sum(entry.nbytes for entry in entries) != wanted:
        raise AssertionError(f"{module}: the layout here disagrees with matrix_nbytes ({wanted} bytes)")
    return entries


def shard_units(config: ModelConfig, scheme: QuantScheme | None, dtype: torch.dtype) -> list[list[Entry]]:
    """Every stored tensor, as convert writes them: modules (an expert is one module) in convert's order."""
    shapes = expected_tensors(config)

    def module(name: str) -> list[Entry]:
        shape = shapes[name]
        stem = name.removesuffix(".weight")
        if len(shape) == 1:
            return [Entry(name, dtype, shape, "ones")]
        spec = role_spec(stem, scheme) if scheme is not None else None
        if name == "model.embed_tokens.weight" or spec is None:
            return [Entry(name, dtype, shape, "normal", shape[-1])]
        return stored_matrix(stem, spec, shape, dtype)

    units = [module("model.embed_tokens.weight"), module("model.norm.weight")]
    if not config.tie_word_embeddings:
        units.append(module("lm_head.weight"))
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        names = [f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"]
        names += [f"{prefix}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names.append(f"{prefix}.block_sparse_moe.gate.weight")
        units += [module(name) for name in names]
        for expert in range(config.num_local_experts):
            experts = f"{prefix}.block_sparse_moe.experts.{expert}"
            units.append([entry for m in MATRICES for entry in module(f"{experts}.{m}.weight")])
    return units


def plan_shards(units: list[list[Entry]], config: ModelConfig, shard_bytes: int | None) -> list[list[Entry]]:
    """convert's shards (the embedding, norm and lm_head, then one per layer), or modules packed up to
    ``shard_bytes`` (a module larger than that gets a shard of its own)."""
    if shard_bytes is None:
        per_layer = 7 + config.num_local_experts  # two norms, four projections, the router, the experts
        first = len(units) - config.num_hidden_layers * per_layer
        shards = [units[:first]] + [
            units[first + layer * per_layer : first + (layer + 1) * per_layer]
            for layer in range(config.num_hidden_layers)
        ]
        return [[entry for unit in shard for entry in unit] for shard in shards]
    packed: list[list[Entry]] = [[]]
    for unit in units:
        size = sum(entry.nbytes for entry in packed[-1])
        if packed[-1] and size + sum(entry.nbytes for entry in unit) > shard_bytes:
            packed.append([])
        packed[-1] += unit
    return packed


def values(entry: Entry, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """The tensor's values in row-major chunks of at most CHUNK elements, in its dtype."""
    total = math.prod(entry.shape)
    if entry.kind == "scale":
        # Keeps a matrix's output at its input's scale: the codes' std is that of a uniform 0..2^bits-1.
        code_std = math.sqrt((4**entry.bits - 1) / 12)
        base = 1 / (math.sqrt(entry.fan_in) * code_std)
    for start in range(0, total, CHUNK):
        count = min(CHUNK, total - start)
        if entry.kind == "ones":
            yield torch.ones(count, dtype=entry.dtype)
        elif entry.kind == "normal":
            draw = rng.standard_normal(count, dtype=np.float32) / math.sqrt(entry.fan_in)
            yield torch.from_numpy(draw).to(entry.dtype)
        elif entry.kind == "codes":
            raw = torch.frombuffer(bytearray(rng.bytes(count * entry.dtype.itemsize)), dtype=entry.dtype)
            # Every byte is a valid pair of 4-bit (or four 2-bit, one 8-bit) codes; an int32 holds ten 3-bit codes.
            yield raw & 0x3FFFFFFF if entry.dtype == torch.int32 else raw
        elif entry.kind == "scale":
            jitter = rng.uniform(0.75, 1.25, count).astype(np.float32)
            yield torch.from_numpy(jitter * base).to(entry.dtype)
        else:  # zero: mid-range, an integer as hqq's round_zero makes it at 4 bits
            yield torch.full((count,), float(2 ** (entry.bits - 1)), dtype=entry.dtype)


def write_shard(path: Path, entries: list[Entry], rng: np.random.Generator) -> int:
    """Write one safetensors file tensor by tensor; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        header[entry.name] = {
            "dtype": dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned

    def body(file: BinaryIO) -> None:
        file.write(len(text).to_bytes(8, "little") + text)
        for entry in entries:
            for chunk in values(entry, rng):
                file.write(memoryview(chunk.contiguous().view(torch.uint8).numpy()))

    write_atomically(path, body)
    return 8 + len(text) + offset


def write_atomically(path: Path, body: Any) -> None:
    """``body(file)`` writes into a temporary beside ``path``, fsynced and renamed over it; removed on failure."""
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            body(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def tokenizer_file(vocab: int) -> tuple[str, bytes]:
    """Mixtral's own tokenizer.model for vocabulary 32000; otherwise the demo's tokenizer.json padded with
    never-produced pieces up to ``vocab`` (decode refuses ids past the tokenizer's vocabulary)."""
    if vocab == MIXTRAL_VOCAB:
        try:
            import mistral_common
        except ImportError:
            pass
        else:
            model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
            if model.is_file():
                return "tokenizer.model", model.read_bytes()
    raw = json.loads((DEMO_MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = raw["model"]["vocab"]
    if vocab < len(pieces):
        raise CheckpointError(
            f"--vocab {vocab}: the demo tokenizer has {len(pieces)} tokens; use at least that many, or 32000"
        )
    pieces |= {f"<extra_{i}>": i for i in range(len(pieces), vocab)}
    return "tokenizer.json", json.dumps(raw, ensure_ascii=False).encode()


def check_directory(directory: Path, needed: int) -> None:
    """The directory must be new or empty, and its filesystem must hold ``needed`` bytes plus a spare GiB."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory}: exists and is not an empty directory; name a new or empty one")
    place = directory
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed + SPARE_BYTES:
        raise CheckpointError(
            f"{directory}: the checkpoint needs {needed / 1e9:.1f} GB (plus 1 GiB spare), "
            f"but its filesystem has {free / 1e9:.1f} GB free"
        )


def write_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Write the checkpoint ``args`` describe; returns a summary."""
    started = time.perf_counter()
    directory = Path(args.directory).expanduser().absolute()
    raw = model_config(args)
    config = ModelConfig.from_dict(raw, "the dims given")
    scheme = None
    if not args.float:
        scheme = QuantScheme.build(
            args.layers, attention=args.attention, experts=args.experts, gate=args.gate, lm_head=args.lm_head
        )
        raw["quantization"] = scheme.as_block(args.layers)
    shard_bytes = None if args.shard_gb is None else int(args.shard_gb * 1e9)
    shards = plan_shards(shard_units(config, scheme, torch.bfloat16), config, shard_bytes)
    total = sum(entry.nbytes for shard in shards for entry in shard)
    tokenizer_name, tokenizer_bytes = tokenizer_file(args.vocab)
    if args.size_only:
        return {"directory": str(directory), "bytes": total, "shards": len(shards), "written": False}
    check_directory(directory, total + len(tokenizer_bytes))

    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rng = np.random.default_rng(args.seed)
    try:
        weight_map: dict[str, str] = {}
        for index, entries in enumerate(shards, start=1):
            name = SHARD_NAME.format(index=index, count=len(shards))
            shard_started = time.perf_counter()
            written.append(directory / name)
            size = write_shard(directory / name, entries, rng)
            weight_map |= dict.fromkeys((entry.name for entry in entries), name)
            seconds = time.perf_counter() - shard_started
            print(f"{name}: {size / 1e9:.2f} GB in {seconds:.1f} s", file=sys.stderr, flush=True)
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        # config.json last: only once it is there does the directory load.
        for name, data in (
            (INDEX_FILE, (json.dumps(index_json, indent=2) + "\n").encode()),
            (tokenizer_name, tokenizer_bytes),
            ("config.json", (json.dumps(raw, indent=2) + "\n").encode()),
        ):
            written.append(directory / name)
            write_atomically(directory / name, lambda file, data=data: file.write(data))
    except BaseException as err:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a read-only place: one line, and nothing left behind
            raise CheckpointError(
                f"{directory}: cannot write the checkpoint ({err.strerror or err})"
            ) from None
        raise
    seconds = time.perf_counter() - started
    return {"directory": str(directory), "bytes": total, "shards": len(shards), "seconds": round(seconds, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write; must be new or empty")
    dims = parser.add_argument_group("dims (default: Mixtral-8x7B)")
    dims.add_argument("--layers", type=int, default=MIXTRAL["layers"])
    dims.add_argument("--hidden", type=int, default=MIXTRAL["hidden"])
    dims.add_argument("--ffn", type=int, default=MIXTRAL["ffn"], help="each expert's width")
    dims.add_argument("--experts-count", type=int, default=MIXTRAL["experts_count"], help="experts per layer")
    dims.add_argument("--top-k", type=int, default=MIXTRAL["top_k"], help="experts per token")
    dims.add_argument("--heads", type=int, default=MIXTRAL["heads"])
    dims.add_argument("--kv-heads", type=int, default=MIXTRAL["kv_heads"])
    dims.add_argument("--vocab", type=int, default=MIXTRAL["vocab"])
    specs = parser.add_argument_group("specs (hqq:BITS:GROUP or none)")
    specs.add_argument(
        "--experts", default=DEFAULT_EXPERTS, help=f"every layer's experts (default {DEFAULT_EXPERTS})"
    )
    specs.add_argument("--attention", default=DEFAULT_ATTENTION, help=f"default {DEFAULT_ATTENTION}")
    specs.add_argument("--gate", default="none", help="the router (default none)")
    specs.add_argument("--lm-head", default="none", help="default none")
    parser.add_argument(
        "--float", action="store_true", help="write the hub's bf16 float form (a convert source)"
    )
    parser.add_argument("--shard-gb", type=float, help="pack modules into shards of at most this many GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-only", action="store_true", help="check and print the size; write nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = write_checkpoint(args)
    except OffloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
