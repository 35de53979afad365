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
        # Per layer, one (B, S, 2 * G * K) buffer: position s holds its G key heads, then its G value heads, as
        # the fused q, k, v projection lays out one token's k and v, so a decode step stores both in one copy.
        self.rows: list[Tensor] = []
        self.keys: list[Tensor] = []  # (B, G, S, K) views of rows
        self.values: list[Tensor] = []
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions, keeping what is cached (capped at the context window)."""
        capacity = min(capacity, self.config.max_position_embeddings)
        if capacity <= self.capacity:
            return
        # Grow geometrically so a long chat reallocates O(log n) times, not every turn.
        capacity = min(max(capacity, 2 * self.capacity), self.config.max_position_embeddings)
        heads, head_dim = self.config.num_key_value_heads, self.config.head_dim
        shape = (self.batch, capacity, 2 * heads * head_dim)
        rows = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(self.config.num_hidden_layers)
        ]
        for old, new in zip(self.rows, rows, strict=False):
            new[:, : self.length] = old[:, : self.length]
        self.rows, self.capacity = rows, capacity
        kv = [row.view(self.batch, capacity, 2, heads, head_dim).permute(2, 0, 3, 1, 4) for row in rows]
        self.keys, self.values = [both[0] for both in kv], [both[1] for both in kv]

    def update(self, layer: int, keys: Tensor, values: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write (B, G, T, K) at positions [start, start+T); return every position up to start+T."""
        end = start + keys.shape[2]
        assert end <= self.capacity, "reserve() the cache before running past its capacity"
        # narrow() rather than slicing syntax: one call each, on the decode path of every layer.
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys.narrow(2, start, end - start).copy_(keys)
        cached_values.narrow(2, start, end - start).copy_(values)
        return cached_keys.narrow(2, 0, end), cached_values.narrow(2, 0, end)

    def append(self, layer: int, row: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """Store one token's keys and values, (B, 2 * G * K) laid out as a cache row, at ``position``; return
        every position up to it, (B, G, position + 1, K) each."""
        assert position < self.capacity, "reserve() the cache before running past its capacity"
        self.rows[layer].select(1, position).copy_(row)
        end = position + 1
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (the buffers stay allocated)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.rows)
