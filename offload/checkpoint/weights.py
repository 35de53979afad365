"""Where quantized tensors come from: quantized now from a float checkpoint, or read as stored by convert.

Both readers give the same dict for a module: ``{key: tensor}`` with the backend's keys
(``{"weight": W}`` for ``none``). A converted checkpoint stores them as ``{module}.{key}``, so its
``none`` tensors keep the hub's names.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from offload.checkpoint.reader import Checkpoint, expected_tensors, expert_prefix
from offload.config import ModelConfig
from offload.errors import CheckpointError, OffloadError
from offload.quant.codec import codec_for
from offload.quant.linear import backend_for, matrix_nbytes, quantize_linear
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec

MATRICES = ("w1", "w2", "w3")  # an expert's gate, down and up projections, by the hub's names
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # a layer's attention projections
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """A dtype name (or None: the checkpoint's own dtype) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    name = name or config.torch_dtype
    if name not in DTYPES:
        raise OffloadError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


class WeightReader:
    """Reads a float checkpoint and quantizes each module as ``scheme`` says, one at a time."""

    def __init__(self, checkpoint: Checkpoint, scheme: QuantScheme, dtype: torch.dtype) -> None:
        self.checkpoint = checkpoint
        self.scheme = scheme
        self.dtype = dtype  # the compute dtype: what ``none`` weights are stored in

    def check(self) -> None:
        """Every tensor the model needs is present with its shape."""
        self.checkpoint.check(expected_tensors(self.checkpoint.config))

    def dense(self, name: str) -> Tensor:
        """A tensor that is never quantized (norms, the embedding), in the compute dtype."""
        return self.checkpoint.get(name).to(self.dtype)

    def linear(self, module: str, spec: QuantSpec) -> dict[str, Tensor]:
        """The stored form of ``{module}.weight`` under ``spec``."""
        return self._encode_matrix(self.checkpoint.get(f"{module}.weight"), spec, module)

    def expert(self, layer: int, expert: int) -> dict[str, Tensor]:
        """One expert's tensors (``w1.KEY``, ``w2.KEY``, ``w3.KEY``) under its layer's spec."""
        spec = self.scheme.expert_spec(layer)
        prefix = expert_prefix(layer, expert)
        weights = [self._prepare(self.checkpoint.get(f"{prefix}.{m}.weight"), spec) for m in MATRICES]
        return codec_for(spec).encode(*weights, where=f"layers.{layer}.experts.{expert}")

    def _prepare(self, weight: Tensor, spec: QuantSpec) -> Tensor:
        # Float weights are kept in the compute dtype; quantizers always see fp32, so a spec gives
        # the same codes whatever dtype the model later runs in.
        return weight.to(self.dtype) if spec.backend == "none" else weight.float()

    def _encode_matrix(self, weight: Tensor, spec: QuantSpec, module: str) -> dict[str, Tensor]:
        return quantize_linear(self._prepare(weight, spec), spec, name=module)


class ConvertedReader(WeightReader):
    """Reads a checkpoint written by ``offload convert``: nothing is quantized again.

    Checks names and shapes up front, and each module's stored bytes against its spec as it is read,
    so a quantization block that does not match the tensors is an error rather than garbage weights.
    """

    def check(self) -> None:
        config = self.checkpoint.config
        present = self.checkpoint.names()
        wanted = set(converted_names(config, self.scheme))
        missing = sorted(wanted - present)
        if missing:
            raise CheckpointError(
                f"{self.checkpoint.directory}: tensor {missing[0]} is missing ({len(missing)} missing in all); "
                "the converted checkpoint is incomplete"
            )
        unknown = sorted(present - wanted)
        if unknown:
            raise CheckpointError(f"{self.checkpoint.directory}: unexpected tensor {unknown[0]}")
        for name, shape in self._shapes.items():
            module = name.rpartition(".")[0]
            spec = role_spec(module, self.scheme)
            if (spec is None or spec.backend == "none") and self.checkpoint.shape(name) != shape:
                raise CheckpointError(
                    f"{self.checkpoint.directory}: tensor {name} has shape "
                    f"{list(self.checkpoint.shape(name))}, expected {list(shape)}"
                )

    def dense(self, name: str) -> Tensor:
        return self.checkpoint.get(name).to(self.dtype)

    def linear(self, module: str, spec: QuantSpec) -> dict[str, Tensor]:
        return self._stored(module, spec)

    def expert(self, layer: int, expert: int) -> dict[str, Tensor]:
        spec = self.scheme.expert_spec(layer)
        prefix = expert_prefix(layer, expert)
        return {f"{m}.{key}": t for m in MATRICES for key, t in self._stored(f"{prefix}.{m}", spec).items()}

    @functools.cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_tensors(self.checkpoint.config)

    def _stored(self, module: str, spec: QuantSpec) -> dict[str, Tensor]:
        tensors = {key: self.checkpoint.get(f"{module}.{key}") for key in backend_for(spec).keys(spec)}
        if spec.backend == "none":
            return {key: t.to(self.dtype) for key, t in tensors.items()}
        shape = self._shapes[f"{module}.weight"]
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        wanted = matrix_nbytes(spec, shape)
        if stored != wanted:
            # Catches a block edited to another bit width or group size; only the sizes are read here.
            raise CheckpointError(
                f"{self.checkpoint.directory}: {module} stores {stored} bytes, but {spec} needs {wanted} "
                f"for shape {list(shape)}; the quantization block in config.json does not match the tensors"
            )
        return tensors


def converted_names(config: object, scheme: QuantScheme) -> list[str]:
    """Every tensor name a converted checkpoint holds for ``scheme``."""
    names = []
    for name in expected_tensors(config):
        module, _, _ = name.rpartition(".")
        spec = role_spec(module, scheme)
        keys = backend_for(spec).keys(spec) if spec is not None else ("weight",)
        names += [f"{module}.{key}" for key in keys]
    return names


def role_spec(module: str, scheme: QuantScheme) -> QuantSpec | None:
    """The spec a module is stored under, or None for tensors that are never quantized."""
    parts = module.split(".")
    if ".self_attn." in f".{module}.":
        return scheme.attention
    if module.endswith("block_sparse_moe.gate"):
        return scheme.gate
    if ".experts." in module:
        return scheme.expert_spec(int(parts[2]))
    if module == "lm_head":
        return scheme.lm_head
    return None


def reader_for(checkpoint: Checkpoint, scheme: QuantScheme | None, dtype: torch.dtype) -> WeightReader:
    """A converted checkpoint's own scheme wins; a float one is quantized with ``scheme`` (default none)."""
    config = checkpoint.config
    if config.quantization is not None:
        stored = QuantScheme.from_block(
            config.quantization, config.num_hidden_layers, str(checkpoint.directory / "config.json")
        )
        return ConvertedReader(checkpoint, stored, dtype)
    return WeightReader(checkpoint, scheme or QuantScheme(), dtype)
