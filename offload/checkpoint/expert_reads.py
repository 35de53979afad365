"""Where each expert's stored bytes lie on disk, for the host tier (``offload.experts.host_tier``).

The tier reads an expert straight into its packed slot, so it works only where the stored bytes *are* the
packed bytes the engine runs: a converted checkpoint (its codes and scales are packed as stored, in the
order ``ConvertedReader.expert`` gives them), or a float checkpoint run unquantized at its stored dtype.
Anything else needs a transform at load (quantizing, or a dtype cast), and is refused here in one line that
says what to run instead. Only the safetensors headers are read: no expert's bytes.
"""

from __future__ import annotations

import torch

from offload.checkpoint.reader import expert_prefix
from offload.checkpoint.weights import MATRICES, ConvertedReader, WeightReader
from offload.errors import CacheError, CheckpointError
from offload.experts.disk import TensorRead
from offload.experts.packing import ExpertLayout
from offload.quant.linear import backend_for, matrix_nbytes

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tier_reads(
    reader: WeightReader, where: str = "--host-memory"
) -> tuple[list[ExpertLayout], list[list[list[TensorRead]]]]:
    """Every layer's packed layout, and for every expert its stored tensors in that layout's order.

    Raises CheckpointError (naming ``where``, the setting that asked for the tier: "--host-memory 8" or a
    profile's "FILE: host.memory_gib = 8"; the model and what to run) when the stored bytes are not what the
    engine runs, or when an expert's tensors differ from its layer's first expert.
    """
    checkpoint = reader.checkpoint
    config = checkpoint.config
    directory = checkpoint.directory
    converted = isinstance(reader, ConvertedReader)
    layouts: list[ExpertLayout] = []
    reads: list[list[list[TensorRead]]] = []
    for layer in range(config.num_hidden_layers):
        spec = reader.scheme.expert_spec(layer)
        if not converted and spec.backend != "none":
            raise CheckpointError(
                f"{where}: the host tier reads experts from disk as they are stored, but {directory} holds "
                f"float experts that this run quantizes to {spec} at load; convert it once (offload convert "
                f"{directory} DST --experts {spec}) and run -m DST"
            )
        keys = backend_for(spec).keys(spec)
        layer_reads = []
        for expert in range(config.num_local_experts):
            prefix = expert_prefix(layer, expert)
            stored: dict[str, torch.Tensor] = {}  # meta tensors: the stored dtypes and shapes, no bytes
            expert_reads = []
            for matrix in MATRICES:
                matrix_bytes = 0
                for key in keys:
                    name = f"{prefix}.{matrix}.{key}"
                    path, offset, nbytes, dtype, shape = checkpoint.locate(name)
                    if spec.backend == "none" and dtype != reader.dtype:
                        raise CheckpointError(
                            f"{where}: the host tier reads experts from disk as they are stored, and "
                            f"{directory} stores {name} as {DTYPE_NAMES.get(dtype, dtype)}, but this run computes in "
                            f"{DTYPE_NAMES.get(reader.dtype, reader.dtype)}; give --dtype "
                            f"{DTYPE_NAMES.get(dtype, dtype)}, or convert it (offload convert {directory} DST)"
                        )
                    stored[f"{matrix}.{key}"] = torch.empty(shape, dtype=dtype, device="meta")
                    expert_reads.append(TensorRead(path, offset, nbytes, name, dtype))
                    matrix_bytes += nbytes
                if spec.backend != "none":
                    _check_size(reader, f"{prefix}.{matrix}", spec, matrix_bytes)
            if expert == 0:
                layouts.append(ExpertLayout.of(stored, input_major=False))  # the bytes as the file holds them
            try:
                layouts[layer].check(stored)
            except CacheError as error:
                raise CheckpointError(f"{directory}: {prefix}: {error}") from None
            layer_reads.append(expert_reads)
        reads.append(layer_reads)
    return layouts, reads


def _check_size(reader: WeightReader, module: str, spec: object, stored: int) -> None:
    """The converted reader's own check, from the header: a block edited to another spec is refused."""
    config = reader.checkpoint.config
    matrix = module.rpartition(".")[2]
    ffn, hidden = config.intermediate_size, config.hidden_size
    shape = (hidden, ffn) if matrix == "w2" else (ffn, hidden)
    wanted = matrix_nbytes(spec, shape)  # type: ignore[arg-type]  (a QuantSpec)
    if stored != wanted:
        raise CheckpointError(
            f"{reader.checkpoint.directory}: {module} stores {stored} bytes, but {spec} needs {wanted} for shape "
            f"{list(shape)}; the quantization block in config.json does not match the tensors"
        )
