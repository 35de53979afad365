"""``offload convert``: a float checkpoint in, a converted one out (safetensors shards plus a ``quantization`` block).

Every module is quantized by ``WeightReader``, exactly as load-time quantization does, so loading the result
gives bit-identical weights. Conversion streams: shard 1 holds the embedding, the final norm and lm_head, then
there is one shard per layer. The reader reads each tensor into memory of its own (no memory map keeps pages
resident), and a module's stored tensors go into its shard's data file as soon as it is quantized
(``shard_file``). Peak RSS is therefore one expert's float weights and the quantizer's temporaries (or the
embedding and lm_head, one at a time), whatever the model size: a layer's output is never held whole.

The output appears atomically: everything is written and fsynced into a partial directory, config.json last,
and put in place at the very end. Convert never removes a file it did not write (see ``convert_output``).
A write that fails (a read-only place, a full disk) is a one-line CheckpointError and leaves no partial output.

Test hook: ``OFFLOAD_TEST_SLOW_CONVERT=SECONDS`` sleeps that long after each shard, so a test can kill a
conversion midway.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from offload.checkpoint.convert_output import (
    COPIED_FILES,
    SHARD_NAME,
    Destination,
    discard,
    fsync,
    inspect_destination,
    publish,
    start,
)
from offload.checkpoint.convert_report import ConvertReport, ReportBuilder
from offload.checkpoint.hub import resolve_model_dir
from offload.checkpoint.reader import (
    INDEX_FILE,
    Checkpoint,
    expected_tensors,
    expert_prefix,
)
from offload.checkpoint.shard_file import ShardFile
from offload.checkpoint.weights import ATTENTION, MATRICES, WeightReader, parse_dtype
from offload.config import ModelConfig
from offload.errors import CheckpointError, OffloadError, QuantError
from offload.quant.linear import backend_for, matrix_nbytes
from offload.quant.scheme import QuantScheme
from offload.quant.spec import QuantSpec

SLOW_ENV = "OFFLOAD_TEST_SLOW_CONVERT"


@dataclass(frozen=True)
class ConvertProgress:
    """Where a conversion stands, after ``module`` was written into its shard."""

    module: str  # what was just converted, e.g. "model.layers.3.block_sparse_moe.experts.5"
    tensors_done: int  # source tensors read so far
    tensors_total: int  # source tensors in the checkpoint
    bytes_done: int  # bytes stored so far
    bytes_total: int  # bytes the converted checkpoint will hold (exact, known up front)
    shards_done: int  # shards written so far; it grows in a call of its own after each shard
    shards_total: int  # 1 for the embedding, norm and lm_head, then one per layer


Progress = Callable[[ConvertProgress], None]


@dataclass(frozen=True)
class _Unit:
    """One module to convert: a never-quantized tensor, a linear, or one expert."""

    kind: str  # "dense" | "linear" | "expert"
    role: str  # the report row: attention, experts, gate, embed, lm_head or norms
    name: str  # dense: the tensor name; linear: the module; expert: the expert's prefix
    spec: QuantSpec
    source_tensors: int  # tensors read from the float checkpoint
    layer: int = -1
    expert: int = -1


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    scheme: QuantScheme,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Quantize the float checkpoint ``src`` as ``scheme`` says and write it to the new directory ``dst``.

    ``dst`` must be new or an empty directory unless ``force``, which replaces an earlier convert's output there
    once the new checkpoint is complete; files convert did not write are never removed.
    ``progress`` is called after every module. Raises OffloadError subclasses for user errors, before
    anything is written where possible (a spec that does not fit a matrix, a damaged source).
    """
    started = time.perf_counter()
    source = resolve_model_dir(src)
    destination = Path(dst).expanduser().absolute()
    checkpoint = Checkpoint(source)
    config = checkpoint.config
    if config.quantization is not None:
        raise CheckpointError(
            f"{source}: already converted (its config.json has a quantization block); "
            "convert from the float checkpoint instead"
        )
    target = _check_destination(source, destination, force)
    _check_scheme(scheme, config)
    dtype = parse_dtype(None, config)  # what ``none`` stores: the checkpoint's own dtype
    # Tensors are read into memory of their own, so one reader serves every module; nothing it read
    # outlives the module that read it.
    reader = WeightReader(checkpoint, scheme, dtype)
    reader.check()
    shards = _plan(config, scheme)
    # Also checks every spec against every matrix shape, so a bad group fails before anything is written.
    shapes = expected_tensors(config)
    bytes_total = sum(_unit_nbytes(unit, shapes, dtype) for shard in shards for unit in shard)
    tensors_total = sum(unit.source_tensors for shard in shards for unit in shard)

    block = scheme.as_block(config.num_hidden_layers)
    report = ConvertReport(str(source), str(destination), block, shards=len(shards))
    builder = ReportBuilder()
    try:
        partial = start(target)
    except OSError as err:
        raise CheckpointError(
            f"{destination}: cannot write the converted checkpoint ({_reason(err)})"
        ) from None
    try:
        weight_map: dict[str, str] = {}
        tensors_done = bytes_done = 0

        def step(module: str, shards_done: int) -> None:
            if progress is not None:
                done = (tensors_done, tensors_total, bytes_done, bytes_total, shards_done, len(shards))
                progress(ConvertProgress(module, *done))

        for index, units in enumerate(shards, start=1):
            filename = SHARD_NAME.format(index=index, count=len(shards))
            shard = ShardFile(partial / filename, {"format": "pt"})
            for unit in units:
                stored = _convert_unit(reader, unit, builder)
                shard.add(stored)  # written now and dropped: a layer's output is never held whole
                tensors_done += unit.source_tensors
                bytes_done += sum(t.numel() * t.element_size() for t in stored.values())
                del stored
                step(unit.name, index - 1)
            shard.close()
            step(unit.name, index)
            weight_map |= dict.fromkeys(shard.names, filename)
            _test_delay()
        _write_json(partial / INDEX_FILE, {"metadata": {"total_size": bytes_done}, "weight_map": weight_map})
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, partial / name)
                fsync(partial / name)
        raw_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        # config.json is written last: a directory without it never loads as a checkpoint.
        _write_json(partial / "config.json", {**raw_config, "quantization": block})
        fsync(partial)
        publish(partial, target)
    except OSError as err:
        discard(partial)
        raise CheckpointError(
            f"{destination}: cannot write the converted checkpoint ({_reason(err)})"
        ) from None
    except BaseException:
        discard(partial)
        raise
    report.seconds = time.perf_counter() - started
    return builder.build(report)


def _plan(config: ModelConfig, scheme: QuantScheme) -> list[list[_Unit]]:
    """The shards in writing order: embedding, final norm and lm_head first, then one per layer."""
    none = QuantSpec.parse("none")
    first = [
        _Unit("dense", "embed", "model.embed_tokens.weight", scheme.embed, 1),
        _Unit("dense", "norms", "model.norm.weight", none, 1),
    ]
    if not config.tie_word_embeddings:
        first.append(_Unit("linear", "lm_head", "lm_head", scheme.lm_head, 1))
    shards = [first]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        units = [
            _Unit("dense", "norms", f"{prefix}.input_layernorm.weight", none, 1),
            _Unit("dense", "norms", f"{prefix}.post_attention_layernorm.weight", none, 1),
        ]
        units += [
            _Unit("linear", "attention", f"{prefix}.self_attn.{name}", scheme.attention, 1)
            for name in ATTENTION
        ]
        units.append(_Unit("linear", "gate", f"{prefix}.block_sparse_moe.gate", scheme.gate, 1))
        spec = scheme.expert_spec(layer)
        units += [
            _Unit("expert", "experts", expert_prefix(layer, expert), spec, len(MATRICES), layer, expert)
            for expert in range(config.num_local_experts)
        ]
        shards.append(units)
    return shards


def _unit_nbytes(unit: _Unit, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Exact bytes ``unit`` stores, by arithmetic; raises QuantError naming the matrix its spec does not fit."""
    if unit.kind == "dense":
        return math.prod(shapes[unit.name]) * dtype.itemsize
    names = (
        [f"{unit.name}.{m}.weight" for m in MATRICES] if unit.kind == "expert" else [f"{unit.name}.weight"]
    )
    for name in names:
        backend_for(unit.spec).check(unit.spec, shapes[name], name)
    return sum(matrix_nbytes(unit.spec, shapes[name], dtype) for name in names)


def _convert_unit(reader: WeightReader, unit: _Unit, builder: ReportBuilder) -> dict[str, Tensor]:
    """Read and quantize one unit; returns its tensors under their names in the converted checkpoint."""
    if unit.kind == "dense":
        tensor = reader.dense(unit.name)
        builder.add(unit.role, unit.spec, {"weight": tensor}, matrices=1, weights=tensor.numel())
        return {unit.name: tensor}
    if unit.kind == "linear":
        stored = reader.linear(unit.name, unit.spec)
        weight = reader.checkpoint.get(f"{unit.name}.weight")
        builder.add(unit.role, unit.spec, stored, matrices=1, weights=weight.numel())
        builder.sample(unit.role, unit.spec, weight, stored)
        return {f"{unit.name}.{key}": tensor for key, tensor in stored.items()}
    stored = reader.expert(unit.layer, unit.expert)
    hidden, ffn = reader.checkpoint.config.hidden_size, reader.checkpoint.config.intermediate_size
    builder.add(unit.role, unit.spec, stored, matrices=len(MATRICES), weights=len(MATRICES) * hidden * ffn)
    if unit.expert == 0:  # one expert per layer is a fair sample at a fraction of the cost
        for matrix in MATRICES:
            prefix = f"{matrix}."
            part = {key[len(prefix) :]: t for key, t in stored.items() if key.startswith(prefix)}
            weight = reader.checkpoint.get(f"{unit.name}.{matrix}.weight")
            builder.sample(unit.role, unit.spec, weight, part)
    return {f"{unit.name}.{key}": tensor for key, tensor in stored.items()}


def _check_scheme(scheme: QuantScheme, config: ModelConfig) -> None:
    layers = config.num_hidden_layers
    if scheme.experts and len(scheme.experts) != layers:
        raise QuantError(
            f"the scheme has expert specs for {len(scheme.experts)} layers but the model has {layers}"
        )
    if scheme.embed.backend != "none":
        raise QuantError(f"only 'none' is supported for the embedding, got {scheme.embed}")


def _check_destination(source: Path, destination: Path, force: bool) -> Destination:
    """DST must be new or empty (or ``force``), neither directory may lie inside the other, and nothing
    convert did not write may be in the way."""
    real_source, real_destination = source.resolve(), destination.resolve()
    if real_destination == real_source or real_destination.is_relative_to(real_source):
        raise CheckpointError(f"{destination}: the output must not be the source directory or lie inside it")
    if real_source.is_relative_to(real_destination):
        raise CheckpointError(f"{destination}: the output must not contain the source directory {source}")
    target = inspect_destination(destination)
    if target.needs_force and not force:
        raise CheckpointError(
            f"{destination} exists and is not empty; pass --force to {target.question()[:-1]}"
        )
    return target


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    fsync(path)


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _test_delay() -> None:
    text = os.environ.get(SLOW_ENV)
    if not text:
        return
    try:
        time.sleep(float(text))
    except ValueError:
        raise OffloadError(f"{SLOW_ENV}={text!r} must be a number of seconds") from None
