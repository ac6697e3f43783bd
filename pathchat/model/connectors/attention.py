"""Query transformer: k queries that self-attend and cross-attend to all tiles, pre-norm residual.

Cross-attention memory is O(k * n), never n x n. Earlier layers use PyTorch SDPA with a boolean
tile mask; the last layer computes its weights explicitly (in head chunks, to bound memory)
because they are the per-tile relevance shown as evidence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Largest explicit attention-weight chunk, in elements (64 MiB of float32).
_WEIGHTS_CHUNK_ELEMENTS = 1 << 24


def cross_attention_weights(q: Tensor, k: Tensor, v: Tensor, tile_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Masked attention that also returns the weights averaged over heads.

    Without autograd the softmax is written out in place: on CPU it is about twice as fast as
    `Tensor.softmax` over 10^4-long rows, and it allocates nothing beyond the logits.

    Args:
        q: `[b, h, k, dh]`; k, v: `[b, h, n, dh]`; tile_mask: `[b, n]` bool (True = attend), or a
            per-query `[b, k, n]`, or None when no tile is padding.

    Returns:
        `(out [b, h, k, dh], weights [b, k, n])`, weights in float32 (float64 for float64 inputs),
        exactly 0 on padding.
    """
    b, h, nq, dh = q.shape
    n = k.shape[2]
    heads_per_chunk = max(1, min(h, _WEIGHTS_CHUNK_ELEMENTS // max(1, b * nq * n)))
    q = q * dh**-0.5
    outs = []
    weights: Tensor | None = None
    for start in range(0, h, heads_per_chunk):
        sl = slice(start, start + heads_per_chunk)
        attn = torch.matmul(q[:, sl], k[:, sl].transpose(-1, -2))  # [b, hc, k, n]
        if attn.dtype in (torch.float16, torch.bfloat16):  # softmax over 10^4+ tiles in float32
            attn = attn.float()
        if tile_mask is not None:
            keep = tile_mask[:, None, None, :] if tile_mask.dim() == 2 else tile_mask[:, None]
            attn.masked_fill_(~keep, float("-inf"))
        if attn.requires_grad:  # autograd needs exp's output intact
            attn = (attn - attn.amax(dim=-1, keepdim=True)).exp()
            attn = attn / attn.sum(dim=-1, keepdim=True)
        else:
            attn.sub_(attn.amax(dim=-1, keepdim=True)).exp_()
            attn.div_(attn.sum(dim=-1, keepdim=True))
        outs.append(torch.matmul(attn.to(v.dtype), v[:, sl]))
        head_sum = attn.sum(dim=1)
        weights = head_sum if weights is None else weights.add_(head_sum)
    assert weights is not None
    return torch.cat(outs, dim=1), weights.div_(h)


class QueryBlock(nn.Module):
    """One block: query self-attention, masked cross-attention to tiles, feed-forward.

    Cross-attention groups query heads over `num_kv_heads` key/value heads (GQA): the tile keys and
    values, computed for every tile, are the connector's largest cost. Each group's queries are
    stacked along the query axis, so one matmul serves the group and nothing is expanded.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, ffn_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.norm_self = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        """`[b, m, heads * dh]` -> `[b, heads, m, dh]`."""
        b, m, _ = x.shape
        return x.view(b, m, heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: Tensor, memory_kv: Tensor, tile_mask: Tensor | None,
                need_weights: bool, query_gate: Tensor | None = None,
                self_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """One block.

        Args:
            queries: `[b, k, d]`.
            memory_kv: `[b, n, 2 * num_kv_heads * dh]` this block's keys and values of the tiles.
            tile_mask: `[b, n]` bool, a per-query `[b, k, n]`, or None when no tile is padding.
            need_weights: also return the cross-attention weights `[b, k, n]` averaged over heads.
            query_gate: `[b, k]`, multiplies each query's cross-attention output (0 = take nothing).
            self_mask: `[k, k]` bool, which queries each query may attend to (None: all).
        """
        b, nq, d = queries.shape
        h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = (self._heads(t, h) for t in self.self_qkv(self.norm_self(queries)).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask).transpose(1, 2).reshape(b, nq, d)
        queries = queries + self.self_out(out)

        # [b, k, hkv, g, dh] -> [b, hkv, g * k, dh]: a group's queries share one key/value head.
        q = self.cross_q(self.norm_cross(queries)).view(b, nq, hkv, h // hkv, dh)
        q = q.permute(0, 2, 3, 1, 4).reshape(b, hkv, (h // hkv) * nq, dh)
        k, v = (self._heads(t, hkv) for t in memory_kv.chunk(2, dim=-1))
        weights = None
        # A per-query mask follows the queries' grouped layout: (group, query) along one axis.
        mask = tile_mask if tile_mask is None or tile_mask.dim() == 2 else tile_mask.repeat(1, h // hkv, 1)
        if need_weights:
            out, weights = cross_attention_weights(q, k, v, mask)
            weights = weights.view(b, h // hkv, nq, -1).mean(dim=1)
        else:
            attn_mask = None if mask is None else (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.view(b, hkv, h // hkv, nq, dh).permute(0, 3, 1, 2, 4).reshape(b, nq, d)
        out = self.cross_out(out)
        queries = queries + (out if query_gate is None else out * query_gate[..., None].to(out.dtype))
        queries = queries + self.ffn(self.norm_ffn(queries))
        return queries, weights


class QueryTransformer(nn.Module):
    """`num_layers` query blocks over one normed tile memory; returns the last layer's weights."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, ffn_ratio: float, num_kv_heads: int | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"hidden_dim ({dim}) must be divisible by num_heads ({num_heads}), "
                             f"and num_heads by num_kv_heads ({num_kv_heads})")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.norm_memory = nn.LayerNorm(dim)
        # Every block's tile keys and values in one GEMM over the tiles, the connector's main cost.
        # No bias: a key bias does not change a softmax over tiles, and a value bias only adds a
        # constant that `cross_out`'s bias already covers; skipping it saves a pass over the tiles.
        kv_dim = 2 * num_kv_heads * (dim // num_heads)
        self.memory_kv = nn.Linear(dim, kv_dim * num_layers, bias=False)
        self.blocks = nn.ModuleList(QueryBlock(dim, num_heads, num_kv_heads, ffn_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor, tile_mask: Tensor,
                query_gate: Tensor | None = None, self_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """queries `[b, k, d]`, memory `[b, n, d]`, tile_mask `[b, n]` (or per query `[b, k, n]`; every
        row needs a True), query_gate `[b, k]` and self_mask `[k, k]` (see `QueryBlock`) ->
        (`[b, k, d]`, token_relevance `[b, k, n]`)."""
        memory_kv = self.memory_kv(self.norm_memory(memory)).chunk(len(self.blocks), dim=-1)
        mask = None if bool(tile_mask.all()) else tile_mask  # unmasked kernels are faster
        weights: Tensor | None = None
        for i, block in enumerate(self.blocks):
            queries, weights = block(queries, memory_kv[i], mask, need_weights=i == len(self.blocks) - 1,
                                     query_gate=query_gate, self_mask=self_mask)
        assert weights is not None
        return self.norm_out(queries), weights
