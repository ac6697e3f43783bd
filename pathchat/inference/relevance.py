"""Evidence: how much each tile supports an answer, from the answer's attention to the slide tokens.

The connector knows, per slide token, how much each tile fed it (`token_relevance` `[k, n]`); the
language model knows how much the answer's tokens attended to each slide token. Their product is a
per-tile map per answer: the heatmap of the UI and the top tiles of a report.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pathchat.model.modeling import PathChatForConditionalGeneration

__all__ = ["answer_relevance"]


@torch.no_grad()
def answer_relevance(
    model: PathChatForConditionalGeneration,
    input_ids: Tensor,
    answer_mask: Tensor,
    tile_features: Tensor,
    tile_coords: Tensor | None = None,
    tile_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    slide_size_um: Tensor | None = None,
) -> Tensor:
    """Per answer, how much each tile supports it: `[b, n]`, >= 0, summing to 1 over valid tiles.

    One eager forward with attentions over the whole sequence (prompt + answer). For each
    answer, w[j] is the attention paid to slide token j, averaged over layers, heads and the
    query positions that produced the answer's tokens (position p-1 for answer token p);
    the map is `w @ token_relevance` (`[k] @ [k, n]`), zeroed on padding tiles and normalised.
    A connector without `token_relevance` falls back to its `tile_relevance`.

    Args:
        input_ids: `[b, L]` prompt (k placeholders each) followed by the answer tokens.
        answer_mask: `[b, L]` bool, True at answer tokens (at least one per row).
        tile_features, tile_coords, tile_mask: the slides, as for `forward`.
        attention_mask: `[b, L]` (None: all ones); left padding is handled with position ids.
        slide_size_um: `[b, 2]` slide sizes in µm, as for `forward`.
    """
    device = next(model.parameters()).device
    input_ids, answer_mask = input_ids.to(device), answer_mask.to(device).bool()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if not bool(answer_mask.any(dim=1).all()):
        raise ValueError("answer_mask: every row needs at least one answer token")
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    lm = model.language_model
    previous = lm.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    tile_features=tile_features.to(device),
                    tile_coords=None if tile_coords is None else tile_coords.to(device),
                    tile_mask=None if tile_mask is None else tile_mask.to(device),
                    slide_size_um=None if slide_size_um is None else slide_size_um.to(device),
                    use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    if not out.attentions:
        raise RuntimeError("the language model returned no attentions (needs eager attention)")
    attn = torch.stack([a.float() for a in out.attentions]).mean(dim=(0, 2))  # [b, L(q), L(k)]
    queries = torch.zeros_like(answer_mask)
    queries[:, :-1] = answer_mask[:, 1:]  # the position that predicted each answer token
    placeholder: Tensor = input_ids.eq(int(model.config.slide_placeholder_id or -1))
    b, n = tile_features.shape[0], tile_features.shape[1]
    valid = (torch.ones(b, n, dtype=torch.bool, device=device) if tile_mask is None
             else tile_mask.to(device).bool())
    result = torch.zeros(b, n, device=device)
    for i in range(b):
        to_slide = attn[i][queries[i]][:, placeholder[i]].mean(dim=0)  # [k], slide-token order
        if out.token_relevance is not None:
            rel = to_slide @ out.token_relevance[i].float()
        else:
            assert out.tile_relevance is not None
            rel = out.tile_relevance[i].float() * to_slide.sum()
        rel = rel.clamp(min=0) * valid[i]
        total = rel.sum()
        result[i] = rel / total if total > 0 else valid[i].float() / valid[i].sum().clamp(min=1)
    return result
