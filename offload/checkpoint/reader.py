"""Reading Hugging Face Mixtral checkpoints: safetensors only, lazily, tensor by tensor.

A checkpoint is a directory with config.json and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Each tensor is read with plain file reads into memory of its own, so
neither a second copy of the model nor a mapping of the files stays in RAM.

Model files come from the internet, so nothing in them is trusted:

- only safetensors and JSON are read (never a pickle, never code);
- a file that offload reads may be a symbolic link only if the link stays inside the model directory
  or its hub snapshot's ``blobs/`` folder (the rule lives in ``offload.checkpoint.hub``);
- a safetensors header is checked against the file's size before it is parsed, and tensors must have
  a dtype that a Mixtral checkpoint (or ``offload convert``) stores;
- every tensor read goes through ``Checkpoint.get``, which refuses NaN and inf.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from offload.checkpoint.hub import allowed_roots, check_inside, check_links
from offload.config import ModelConfig, read_json
from offload.errors import CheckpointError, first_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Float weights in 32 or 16 bits, and the integer codes that `offload convert` writes. Anything else
# (fp8, complex, bool) is not a checkpoint this engine can run, and some of it breaks the NaN check.
STORED_DTYPES = ("F32", "F16", "BF16", "U8", "I8", "I16", "I32", "I64")
TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
# safetensors' own limit: a header is JSON describing the tensors, tens of kilobytes for a real shard.
MAX_HEADER_BYTES = 100_000_000


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The hub's tensor names and shapes for ``config``: the one table all loading is checked against."""
    hidden, heads, kv_heads, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.block_sparse_moe.gate.weight": (config.num_local_experts, hidden),
        }
        for expert in range(config.num_local_experts):
            shapes |= {name: shape for name, shape in expert_tensor_shapes(config, layer, expert).items()}
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def expert_tensor_shapes(config: ModelConfig, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """w1 is the gate projection, w3 the up projection, w2 the down projection (the hub's names)."""
    prefix = expert_prefix(layer, expert)
    ffn, hidden = config.intermediate_size, config.hidden_size
    return {
        f"{prefix}.w1.weight": (ffn, hidden),
        f"{prefix}.w2.weight": (hidden, ffn),
        f"{prefix}.w3.weight": (ffn, hidden),
    }


def expert_prefix(layer: int, expert: int) -> str:
    """Name prefix of one expert's tensors."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}"


class Checkpoint:
    """A model directory opened for lazy reading. Use ``get(name)`` to read one tensor."""

    def __init__(self, directory: str | Path, config: ModelConfig | None = None) -> None:
        """Open ``directory``; ``config`` is its config.json when the caller has parsed it already."""
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such model directory")
        check_links(self.directory)
        self.config = config or ModelConfig.from_file(self.directory / "config.json")
        self._handles: dict[str, object] = {}
        self._data_starts: dict[str, int] = {}  # file -> where its data section begins
        self._offsets: dict[str, tuple[int, int]] = {}  # tensor -> its bytes within the data section
        self.files = self._shard_map()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for filename in sorted(set(self.files.values())):
            handle = self._open(filename)
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if name in self._shapes:
                    raise CheckpointError(f"{self.directory / filename}: tensor {name} appears in two shards")
                tensor_slice = handle.get_slice(name)
                self._shapes[name] = tuple(tensor_slice.get_shape())
                self._dtypes[name] = tensor_slice.get_dtype()
                if self._dtypes[name] not in STORED_DTYPES:
                    raise CheckpointError(
                        f"{self.directory / filename}: tensor {name} is stored as {self._dtypes[name]}; "
                        f"offload reads {', '.join(STORED_DTYPES)}"
                    )

    def _shard_map(self) -> dict[str, str]:
        """Tensor name -> file name. Filled lazily from the index or the single file."""
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            index = read_json(index_path, CheckpointError)
            if not isinstance(index, dict) or "weight_map" not in index:
                raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)")
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard files")
            for filename in weight_map.values():
                if not isinstance(filename, str):  # checked first: a list or a dict cannot go in a set
                    raise CheckpointError(
                        f"{index_path}: shard {_shown(filename)} is not a .safetensors file name"
                    )
            for filename in set(weight_map.values()):
                self._check_shard_name(filename, index_path)
            return dict(weight_map)
        if (self.directory / SINGLE_FILE).is_file():
            return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}  # noqa: SIM118
        if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
            raise CheckpointError(
                f"{self.directory}: only PyTorch pickle weights found; offload reads safetensors only "
                "(convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _check_shard_name(self, filename: object, index_path: Path) -> None:
        if not isinstance(filename, str) or not filename.endswith(".safetensors"):
            raise CheckpointError(f"{index_path}: shard {_shown(filename)} is not a .safetensors file name")
        if os.path.isabs(filename) or ".." in Path(filename).parts or "\0" in filename:
            raise CheckpointError(
                f"{index_path}: shard {_shown(filename)} points outside the model directory"
            )
        path = self.directory / filename
        if not path.is_file():
            raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
        check_inside(path, allowed_roots(self.directory))

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            _check_header(path)
            try:
                self._handles[filename] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error type for every kind of damage
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({first_line(err)})"
                ) from None
            self._read_offsets(filename, path)
        return self._handles[filename]

    def _read_offsets(self, filename: str, path: Path) -> None:
        """Note where each tensor's bytes lie; safe_open has already validated the header."""
        with path.open("rb") as file:
            header_bytes = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_bytes))
        self._data_starts[filename] = 8 + header_bytes
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                self._offsets[name] = (int(begin), int(end))

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name``, read from the header only."""
        return self._shapes[name]

    def locate(self, name: str) -> tuple[Path, int, int, torch.dtype, tuple[int, ...]]:
        """Where ``name``'s bytes lie: (file, offset from the file's start, bytes, dtype, shape); for readers
        that read straight into buffers of their own (``offload.experts.disk``)."""
        filename = self.files.get(name)
        if filename is None:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing")
        self._open(filename)
        begin, end = self._offsets[name]
        dtype = TORCH_DTYPES[self._dtypes[name]]
        return (
            self.directory / filename,
            self._data_starts[filename] + begin,
            end - begin,
            dtype,
            self._shapes[name],
        )

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory of its own.

        Plain reads, not safetensors' memory map: a mapped page counts in the process's RSS until the
        whole mapping closes, so a loader reading every tensor through it peaks at twice the model.
        """
        filename = self.files.get(name)
        if filename is None:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing")
        self._open(filename)
        path = self.directory / filename
        begin, end = self._offsets[name]
        tensor = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with path.open("rb") as file:
                file.seek(self._data_starts[filename] + begin)
                got = file.readinto(memoryview(tensor.numpy()))
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({err.strerror or err})") from None
        if got != end - begin:
            raise CheckpointError(f"{path}: tensor {name} is cut short (the file is truncated)")
        tensor = tensor.view(TORCH_DTYPES[self._dtypes[name]]).reshape(self._shapes[name])
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise CheckpointError(f"{self.directory / filename}: tensor {name} holds NaN or inf values")
        return tensor

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor is present with its shape; nothing unknown is there."""
        present = self.names()
        for name, shape in expected.items():
            if name not in present:
                raise CheckpointError(f"{self.directory}: tensor {name} is missing")
            if self._shapes[name] != shape:
                raise CheckpointError(
                    f"{self.directory}: tensor {name} has shape {list(self._shapes[name])}, expected {list(shape)}"
                )
        unknown = sorted(present - set(expected))
        if unknown:
            raise CheckpointError(
                f"{self.directory}: unexpected tensor {unknown[0]} ({len(unknown)} unknown in all)"
            )


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(tensor).all()`` in slices: on a whole embedding, isfinite's temporaries (an abs copy and
    two masks) would add more than the tensor itself to the loader's peak memory."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _check_header(path: Path) -> None:
    """Check the 8-byte header length against the file before safetensors parses anything.

    safetensors checks this too; doing it here gives the user the numbers (a truncated download shows
    as a header longer than the file) and never relies on the library to refuse an absurd size.
    """
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(8)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    header_bytes = int.from_bytes(head, "little")
    if header_bytes > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: not a readable safetensors file (its header claims {header_bytes} bytes; the file has "
            f"{size}, and a header may have at most {MAX_HEADER_BYTES}); the file is damaged or truncated"
        )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
