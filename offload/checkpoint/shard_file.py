"""A safetensors shard written one module at a time, so ``offload convert`` never holds a whole layer's output.

safetensors puts the header (every tensor's name, dtype, shape and byte range) before the data, and a module's
stored tensors are only known once it is quantized. So the data goes first into ``NAME.data`` beside the shard,
module by module, each module's tensors dropped once written; ``close`` writes the header, copies the data after
it and removes ``NAME.data``. On disk this is safetensors' own layout: the header's length as a little-endian
u64, the JSON header padded with spaces to a multiple of 8 bytes, then the tensors' bytes in header order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

# safetensors' names for the dtypes a converted checkpoint stores (reader.STORED_DTYPES).
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}
COPY_CHUNK = 1 << 24  # bytes per read while the data is copied behind the header


class ShardFile:
    """``add`` each module's tensors, then ``close`` to write ``path``; nothing is left at ``path`` on failure."""

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path = path
        self.names: list[str] = []
        self._data_path = path.with_name(path.name + ".data")
        self._data = self._data_path.open("wb")
        self._header: dict[str, object] = {"__metadata__": metadata}
        self._offset = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        """Append ``tensors`` (CPU tensors of the dtypes above) to the shard's data."""
        for name, tensor in tensors.items():
            data = tensor.contiguous().reshape(-1).view(torch.uint8)
            end = self._offset + data.numel()
            self._header[name] = {
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [self._offset, end],
            }
            self._data.write(memoryview(data.numpy()))
            self._offset = end
            self.names.append(name)

    def close(self) -> None:
        """Write the shard (header, then the data) and fsync it; the data file is removed."""
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)
        with self.path.open("wb") as shard, self._data_path.open("rb") as data:
            shard.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(data, shard, COPY_CHUNK)
            shard.flush()
            os.fsync(shard.fileno())
        self._data_path.unlink()
