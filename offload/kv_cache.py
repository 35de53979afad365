"""A preallocated key/value cache: one buffer per layer, grown by doubling when a chat outgrows it."""

from __future__ import annotations

import torch
from torch import Tensor

from offload.config import ModelConfig


class KVCache:
    """Keys and values for positions [0, length) of one sequence batch, per layer.

    Shapes: B batch, G key/value heads, S capacity, K head dim.
    """

    def __init__(
        self, config: ModelConfig, capacity: int, batch: int = 1, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.config = config
        self.batch, self.dtype, self.device = batch, dtype, torch.device(device)
        self.length = 0  # positions filled
        self.capacity = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions, keeping what is cached (capped at the context window)."""
        capacity = min(capacity, self.config.max_position_embeddings)
        if capacity <= self.capacity:
            return
        # Grow geometrically so a long chat reallocates O(log n) times, not every turn.
        capacity = min(max(capacity, 2 * self.capacity), self.config.max_position_embeddings)
        shape = (self.batch, self.config.num_key_value_heads, capacity, self.config.head_dim)
        layers = self.config.num_hidden_layers
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        new_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        if self.keys:
            for old, new in zip(self.keys + self.values, new_keys + new_values, strict=True):
                new[:, :, : self.length] = old[:, :, : self.length]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def update(self, layer: int, keys: Tensor, values: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write (B, G, T, K) at positions [start, start+T); return every position up to start+T."""
        end = start + keys.shape[2]
        assert end <= self.capacity, "reserve() the cache before running past its capacity"
        # narrow() rather than slicing syntax: one call each, on the decode path of every layer.
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys.narrow(2, start, end - start).copy_(keys)
        cached_values.narrow(2, start, end - start).copy_(values)
        return cached_keys.narrow(2, 0, end), cached_values.narrow(2, 0, end)

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (the buffers stay allocated)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
