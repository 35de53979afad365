"""The Mixtral decoder: RMSNorm, RoPE, grouped-query attention, and the MoE block.

Shapes: B batch, T tokens, D hidden, H query heads, G key/value heads, K head dim, E experts, k active.
Module names follow the hub's tensor names, so weights load unrenamed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offload import f32_kernel
from offload.config import ModelConfig
from offload.experts.source import ExpertSource, route
from offload.kv_cache import KVCache
from offload.quant.dense import DenseLinear
from offload.quant.linear import stacked_linear


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype, exactly as the reference does; in fp32 one
        # fused call does both (a decode step is dominated by per-call overhead on a CPU).
        if x.dtype == torch.float32:
            if x.numel() == x.shape[-1] and x.device.type == "cpu":
                return self._one_row(x)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def _one_row(self, x: Tensor) -> Tensor:
        """One float32 row on a CPU (a decode step's nine norms): the mean square by one dot product, the
        scale on the host, two products. ``F.rms_norm`` runs about eight kernels here, and each costs a decode
        step several microseconds once the weights have streamed through the caches (measured in the demo's
        decode: 0.55 -> 0.40 ms a token for the nine). The same values to float32 rounding.
        """
        row = x.reshape(-1)
        scale = 1.0 / math.sqrt(float(torch.dot(row, row)) / row.numel() + self.eps)
        return torch.mul(x, self.weight).mul_(scale)


class RopeTables:
    """cos and sign-folded sin for positions [0, capacity), computed in fp32 once, then cast.

    The sin table carries rotate-half's minus sign on its first half, so that applying RoPE is a
    roll, two products and a sum (the same values as ``x*cos + rotate_half(x)*sin``).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def get(self, start: int, tokens: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(T, K) cos and signed sin for positions [start, start + tokens)."""
        end = start + tokens
        cos, sin = self._tables.get((dtype, device), (None, None))
        if cos is None or cos.shape[0] < end:
            # Grow geometrically so a long generation recomputes O(log n) times.
            capacity = max(end, 2 * (0 if cos is None else cos.shape[0]), 256)
            cos, sin = rope_tables(torch.arange(capacity, device=device), self.head_dim, self.theta, dtype)
            half = self.head_dim // 2
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self._tables[(dtype, device)] = cos, sin
        return cos[start:end], sin[start:end]


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin for ``positions`` (T,) -> each (T, K), computed in fp32 then cast."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, K) by RopeTables' (T, K) tables, pairing the two halves of each head.

    ``x * cos + roll(x) * sin`` with the second product and the sum as one kernel (addcmul, which may fuse
    them: the reference's values to a rounding); the decode step computes the same in place.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        # q, k and v as one matrix (``fuse_projections``); a plain attribute, so its weights, which the three
        # projections share, are not counted twice among the model's buffers.
        self.fused_qkv: tuple[nn.Module] | None = None

    def fuse_projections(self) -> None:
        """Compute q, k and v with one matrix call from now on, where the loaded projections allow it
        (``offload.quant.linear.stacked_linear``); q_proj, k_proj and v_proj are rebuilt over its memory."""
        stacked = stacked_linear([self.q_proj, self.k_proj, self.v_proj])
        if stacked is not None:
            fused, (self.q_proj, self.k_proj, self.v_proj) = stacked
            self.fused_qkv = (fused,)

    def forward(
        self, x: Tensor, layer: int, cache: KVCache | None, positions: Positions, residual: Tensor
    ) -> Tensor:
        """``residual`` + attention over normalised ``x`` (B, T, D)."""
        batch, tokens, _ = x.shape
        if tokens == 1 and cache is not None and self.fused_qkv is not None:
            return self._one_token(x, layer, cache, positions, residual)
        q, k, v = self._rotated_qkv(x, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions.start)  # (B, G, S, K): every position so far
        # enable_gqa shares each key/value head among its query heads without copying the cache.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=positions.mask, enable_gqa=True
        )  # (B, H, T, K)
        # At one token (B, H, 1, K) and (B, 1, H, K) are the same memory: no transpose.
        out = out.reshape(batch, 1, -1) if tokens == 1 else out.transpose(1, 2).reshape(batch, tokens, -1)
        return _plus_projection(residual, out, self.o_proj)

    def _one_token(
        self, x: Tensor, layer: int, cache: KVCache, positions: Positions, residual: Tensor
    ) -> Tensor:
        """A decode step's attention: the general path's operations on the same values (the same bits), with
        RoPE in place on the fused projection's output and its keys and values stored in the cache in one copy
        (a decode step on a CPU pays several microseconds for each kernel and allocation)."""
        batch = x.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = self.fused_qkv[0].forward(x).view(batch, heads + 2 * kv_heads, head_dim)  # a fresh tensor
        qk = qkv[:, : heads + kv_heads]
        rolled = qk.roll(head_dim // 2, dims=-1)
        qk.mul_(positions.cos).addcmul_(rolled, positions.sin)  # apply_rope's kernels, in place
        keys, values = cache.append(layer, qkv.view(batch, -1)[:, heads * head_dim :], positions.start)
        query = qkv[:, :heads].unsqueeze(2)
        out = f32_kernel.attention(query, keys, values) if positions.mask is None else None
        if out is None:  # SDPA where our float32 kernel does not run
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=positions.mask, enable_gqa=True
            )  # (B, H, 1, K), the memory of (B, 1, H * K)
        return _plus_projection(residual, out.view(batch, 1, -1), self.o_proj)

    def _rotated_qkv(self, x: Tensor, positions: Positions) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> q (B, H, T, K), k and v (B, G, T, K), with RoPE applied to q and k."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        if self.fused_qkv is not None:
            qkv = self.fused_qkv[0].forward(x)  # (B, T, (H + 2G) * K)
            qkv = _split_heads(qkv, heads + 2 * kv_heads, head_dim)  # (B, H + 2G, T, K)
            # One rotation for the query and key heads together: the same elementwise values as two.
            qk = positions.rotate(qkv[:, : heads + kv_heads])
            return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        q = _split_heads(self.q_proj.forward(x), heads, head_dim)
        k = _split_heads(self.k_proj.forward(x), kv_heads, head_dim)
        v = _split_heads(self.v_proj.forward(x), kv_heads, head_dim)
        return positions.rotate(q), positions.rotate(k), v


def _plus_projection(residual: Tensor, x: Tensor, projection: nn.Module) -> Tensor:
    """``residual + projection(x)`` for (B, T, D) tensors; a dense projection adds the residual in its matrix call
    (addmm: one kernel, not two, per layer of a decode step; the sum may round once where two calls round twice)."""
    if type(projection) is DenseLinear:
        weight = projection.weight
        one_row = x.numel() == weight.shape[1] and x.is_contiguous() and residual.is_contiguous()
        if projection.one_token is not None and one_row:
            return projection.one_token(x, weight, residual)
        out = torch.addmm(residual.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1]), weight.t())
        return out.view(residual.shape)
    return residual + projection.forward(x)


def _split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, T, heads * K) -> (B, heads, T, K); at one token a view, as (B, 1, heads, K) is the same memory."""
    batch, tokens, _ = x.shape
    if tokens == 1:
        return x.view(batch, heads, 1, head_dim)
    return x.view(batch, tokens, heads, head_dim).transpose(1, 2)


class Positions:
    """What every layer needs about the positions of one forward call, computed once per call."""

    def __init__(
        self,
        config: ModelConfig,
        rope: RopeTables,
        start: int,
        tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.start = start
        self.cos, self.sin = rope.get(start, tokens, dtype, device)
        keys = start + tokens
        window = config.sliding_window
        # A single new token that sees every cached key needs no mask at all.
        needs_mask = tokens > 1 or (window is not None and keys > window)
        self.mask = attention_mask(start, tokens, keys, window, device) if needs_mask else None

    def rotate(self, x: Tensor) -> Tensor:
        """RoPE on (B, heads, T, K) query or key heads at these positions."""
        return apply_rope(x, self.cos, self.sin)


def attention_mask(
    start: int, tokens: int, keys: int, sliding_window: int | None, device: torch.device
) -> Tensor:
    """(T, S) booleans: query at position start+i sees key j when j <= start+i (and within the window)."""
    query_pos = torch.arange(start, start + tokens, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible


class MoEBlock(nn.Module):
    """Routes each token to k experts and sums their outputs; the experts come from an ExpertSource."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.source: ExpertSource | None = None  # set by the loader

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual`` + the experts' weighted outputs for normalised ``x`` (B, T, D)."""
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])  # (T, D)
        weights, ids = route(self.gate(hidden), self.top_k)  # (T, k) each
        guesses = self.source.speculate(self.layer, hidden)
        # The layer's one host synchronisation: which experts were chosen (and guessed for the next layer).
        if guesses is None:
            chosen, guessed = [expert for token in ids.tolist() for expert in token], []
        else:
            flat_ids = ids.flatten()
            on_host = torch.cat([flat_ids, guesses]).tolist()
            chosen, guessed = on_host[: flat_ids.numel()], on_host[flat_ids.numel() :]
        mix = self._one_token if hidden.shape[0] == 1 else self._tokens
        return mix(hidden, weights, chosen, guessed, residual.reshape(hidden.shape)).view(shape)

    def _tokens(
        self, hidden: Tensor, weights: Tensor, chosen: list[int], guessed: list[int], residual: Tensor
    ) -> Tensor:
        """(T, D) -> (T, D): every chosen expert on the tokens routed to it, weighted, summed per token, plus
        ``residual`` (T, D).

        Each (token, slot) is written once, then scaled and summed in slot order, so the order experts
        arrive in (resident first, misses later) never changes the result.
        """
        ids_host = torch.tensor(chosen).view(weights.shape)
        out = hidden.new_zeros(hidden.shape[0], self.top_k, hidden.shape[1])  # (T, k, D)
        routes: dict[int, tuple[Tensor, Tensor]] = {}

        def routed(expert_id: int) -> tuple[Tensor, Tensor]:
            """The (tokens, slots) routed to ``expert_id``, on the device."""
            if expert_id not in routes:
                tokens, slots = (ids_host == expert_id).nonzero(as_tuple=True)
                routes[expert_id] = tokens.to(hidden.device), slots.to(hidden.device)
            return routes[expert_id]

        def inputs(expert_id: int) -> Tensor:
            return hidden[routed(expert_id)[0]]

        for expert_id, expert in self.source.experts_for(self.layer, sorted(set(chosen)), guessed, inputs):
            tokens, slots = routed(expert_id)
            out[tokens, slots] = expert(hidden[tokens])
        return _weighted_sum(out, weights, residual)

    def _one_token(
        self, hidden: Tensor, weights: Tensor, chosen: list[int], guessed: list[int], residual: Tensor
    ) -> Tensor:
        """The decode step's block without the (token, slot) bookkeeping: the same operations on the
        same values as the general path (the slots' outputs, scaled and summed in order), so it gives
        the same bits.
        """
        parts: list[Tensor | None] = [None] * self.top_k
        inputs = lambda _: hidden  # noqa: E731  (every expert sees the one token)
        for expert_id, expert in self.source.experts_for(self.layer, sorted(set(chosen)), guessed, inputs):
            parts[chosen.index(expert_id)] = expert(hidden)
        return _weighted_sum(torch.stack(parts, dim=1), weights, residual)


def _weighted_sum(outputs: Tensor, weights: Tensor, residual: Tensor) -> Tensor:
    """(T, k, D) expert outputs, (T, k) router weights, (T, D) residual -> (T, D): the residual plus each token's
    weighted outputs, as one batched product (one kernel where products, sum and residual add took three).
    """
    scale = weights.unsqueeze(1)  # (T, 1, k)
    if scale.dtype != outputs.dtype:  # a no-op .to() is still a dispatched call on the decode path
        scale = scale.to(outputs.dtype)
    tokens, _, hidden = outputs.shape
    return torch.baddbmm(residual.view(tokens, 1, hidden), scale, outputs).view(tokens, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoEBlock(config, layer)

    def forward(self, x: Tensor, cache: KVCache | None, positions: Positions) -> Tensor:
        # Inner modules are called through forward(): nn.Module.__call__ costs several microseconds
        # a call, a tenth of a small model's decode step on a CPU. Hooks go on the gates and the model.
        x = self.self_attn.forward(self.input_layernorm.forward(x), self.layer, cache, positions, residual=x)
        return self.block_sparse_moe.forward(self.post_attention_layernorm.forward(x), residual=x)


class MixtralBody(nn.Module):
    """Named ``model`` inside MixtralModel, matching the hub's ``model.`` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # An explicit weight skips nn.Embedding's normal_ init: on the meta device (where the loader
        # builds the model) that init imports torch._dynamo, over a second of every start-up.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MixtralModel(nn.Module):
    """The whole model. ``model(ids)`` gives every position's logits; with a cache it continues a sequence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rope = RopeTables(config.head_dim, config.rope_theta)
        self.model = MixtralBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.expert_source: ExpertSource | None = None  # every block's, set by offload.loading.attach_source

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """(B, T) token ids -> (B, T, V) logits, or (B, 1, V) with ``last_only``.

        With a cache, the ids continue the cached sequence and their keys and values are appended.
        """
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.reserve(start + input_ids.shape[1])
        x = self.model.embed_tokens.forward(input_ids)
        positions = Positions(self.config, self.rope, start, input_ids.shape[1], x.dtype, x.device)
        for layer in self.model.layers:
            x = layer.forward(x, cache, positions)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        if last_only and x.shape[1] > 1:
            x = x[:, -1:]
        return self.lm_head.forward(self.model.norm.forward(x))

    def fuse_projections(self) -> None:
        """Once the weights are loaded: each layer's q, k and v in one matrix where they allow it."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()

    def dense_weights(self) -> list[tuple[nn.Module, str, Tensor]]:
        """(module, name, tensor) for every parameter and buffer outside the experts, the fused q, k and v
        matrices included, in the order a forward pass reads them."""
        modules: list[nn.Module] = []
        for module in self.modules():
            modules.append(module)
            if isinstance(module, Attention) and module.fused_qkv is not None:
                modules.append(module.fused_qkv[0])
        return [
            (module, name, tensor)
            for module in modules
            for name, tensor in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
        ]

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
