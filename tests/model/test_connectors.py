"""Connector registry: shapes, masks, order and position invariances, relevance, configs, sampler, grads."""

from __future__ import annotations

import json

import pytest
import torch

from pathchat.model.connectors import (
    CONNECTORS,
    ConnectorConfig,
    MLPConfig,
    PoolConfig,
    ResamplerConfig,
    ScaleInvariantConfig,
    build_connector,
    sample_tile_indices,
)

D_ENC, D_LLM = 32, 48
NAMES = sorted(CONNECTORS)


def small_config(name: str) -> ConnectorConfig:
    """Small but complete configs so every test runs in well under a second."""
    return {
        "scale_invariant": ScaleInvariantConfig(grid_size=4, num_latents=8, hidden_dim=32, num_heads=4, num_kv_heads=2,
                                                num_frequencies=8),
        "mlp": MLPConfig(max_tiles=24, seed=3),
        "pool": PoolConfig(grid_size=4),
        "resampler": ResamplerConfig(num_latents=16, hidden_dim=32, num_heads=4, num_kv_heads=4),
    }[name]


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_connector(small_config(name), D_ENC, D_LLM).eval()


def slide(n: int, seed: int = 0, mpp: float = 0.5, tile_px: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `[1, n, D_ENC]` and µm coords `[1, n, 2]` of n distinct tiles on a 40 x 40 tile grid."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(1600, generator=g)[:n]
    l0_xy = torch.stack([cells % 40, cells // 40], dim=1) * tile_px
    return torch.randn(1, n, D_ENC, generator=g), (l0_xy * mpp).float()[None]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("b", "n"), [(1, 1), (2, 7), (3, 300)])
def test_shapes_and_relevance(name, b, n):
    conn = make(name)
    feats = torch.randn(b, n, D_ENC)
    coords = torch.rand(b, n, 2) * 20_000
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1:, n // 2 + 1:] = False  # later slides are shorter
    with torch.no_grad():
        out = conn(feats, coords, mask)
    k = conn.num_tokens
    assert k == small_config(name).num_tokens  # type: ignore[attr-defined]
    assert out.tokens.shape == (b, k, D_LLM)
    assert out.relevance.shape == (b, n)
    assert out.token_relevance is not None and out.token_relevance.shape == (b, k, n)
    assert torch.isfinite(out.tokens).all()
    assert (out.relevance >= 0).all()
    torch.testing.assert_close(out.relevance.sum(1), torch.ones(b))
    torch.testing.assert_close(out.token_relevance.sum(-1), torch.ones(b, k))
    assert (out.relevance[~mask] == 0).all()
    assert (out.token_relevance.permute(0, 2, 1)[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 5, 23, 24, 25, 1000])
def test_any_tile_count_gives_k_tokens(name, n):
    conn = make(name)
    feats, coords = slide(n)
    with torch.no_grad():
        out = conn(feats, coords, None)
    assert out.tokens.shape == (1, conn.num_tokens, D_LLM)


@pytest.mark.parametrize("name", NAMES)
def test_padding_leaves_tokens_identical(name):
    conn = make(name)
    feats, coords = slide(40, seed=1)
    with torch.no_grad():
        alone = conn(feats, coords, None)
        # Append 17 padding tiles holding garbage, far away, and batch with a longer slide.
        pad_feats = torch.cat([feats, 100 * torch.randn(1, 17, D_ENC)], dim=1)
        pad_coords = torch.cat([coords, torch.full((1, 17, 2), 9e6)], dim=1)
        other_feats, other_coords = slide(57, seed=2)
        batch_feats = torch.cat([pad_feats, other_feats])
        batch_coords = torch.cat([pad_coords, other_coords])
        mask = torch.ones(2, 57, dtype=torch.bool)
        mask[0, 40:] = False
        padded = conn(batch_feats, batch_coords, mask)
        other = conn(other_feats, other_coords, None)
    torch.testing.assert_close(padded.tokens[0], alone.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.tokens[1], other.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.relevance[0, :40], alone.relevance[0], atol=1e-6, rtol=0)
    assert (padded.relevance[0, 40:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_tile_order_does_not_change_tokens(name):
    conn = make(name)
    feats, coords = slide(300, seed=4)  # 300 > mlp's 24: the sampler's choice must not follow input order
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = conn(feats, coords, None)
        shuffled = conn(feats[:, perm], coords[:, perm], None)
    torch.testing.assert_close(shuffled.tokens, out.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled.relevance, out.relevance[:, perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_same_tissue_at_two_resolutions_and_translated(name):
    conn = make(name)
    feats, coords_05 = slide(200, seed=6, mpp=0.5, tile_px=256)
    l0_at_025 = coords_05 / 0.5 * 2  # same tissue at 0.25 µm/px: level-0 pixel coords double
    coords_025 = l0_at_025 * 0.25
    assert torch.equal(coords_025, coords_05)
    with torch.no_grad():
        a = conn(feats, coords_05, None)
        b = conn(feats, coords_025, None)
        moved = conn(feats, coords_05 + 10_000.0, None)  # +10 mm
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(moved.tokens, a.tokens, atol=1e-4, rtol=0)
    torch.testing.assert_close(moved.relevance, a.relevance, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_geometry(name):
    conn = make(name)
    feats = torch.randn(2, 9, D_ENC)
    same = torch.full((2, 9, 2), 1234.5)  # all coordinates equal: zero-size bounding box
    with torch.no_grad():
        for coords in (same, None):
            out = conn(feats, coords, None)
            assert torch.isfinite(out.tokens).all()
            torch.testing.assert_close(out.relevance.sum(1), torch.ones(2))


def test_scale_invariant_uses_positions_and_scale():
    conn = make("scale_invariant")
    feats, coords = slide(50, seed=7)
    with torch.no_grad():
        base = conn(feats, coords, None).tokens
        mirrored = conn(feats, coords.flip(-1), None).tokens  # swap x and y: a different layout
        coarse = conn(feats, coords, None, torch.ones(1, 50, dtype=torch.long)).tokens
        explicit = conn(feats, coords, None, torch.zeros(1, 50, dtype=torch.long)).tokens
    assert (mirrored - base).abs().max() > 1e-3
    assert (coarse - base).abs().max() > 1e-3
    assert torch.equal(explicit, base)
    with pytest.raises(ValueError, match="tile_scale"):
        conn(feats, coords, None, torch.full((1, 50), 2, dtype=torch.long))


def test_scale_invariant_default_handles_50k_tiles():
    torch.manual_seed(0)
    conn = build_connector(ScaleInvariantConfig(), 512, 576).eval()
    n = 50_000
    with torch.inference_mode():
        out = conn(torch.randn(1, n, 512), torch.rand(1, n, 2) * 40_000, None)
    assert out.tokens.shape == (1, 128, 576)
    assert torch.isfinite(out.tokens).all()
    assert abs(float(out.relevance.sum()) - 1) < 1e-4


def test_empty_slide_is_an_error():
    conn = make("scale_invariant")
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0] = True
    with pytest.raises(ValueError, match="at least one valid tile"):
        conn(torch.randn(2, 4, D_ENC), None, mask)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    cls = CONNECTORS[name][0]
    config = small_config(name)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["type"] == name
    again = ConnectorConfig.from_dict(d)
    assert type(again) is cls and again == config
    assert cls.from_dict(d) == config
    assert cls().type == name
    conn = build_connector(d, D_ENC, D_LLM)
    assert isinstance(conn, CONNECTORS[name][1])


def test_default_connector_and_config_errors():
    assert ConnectorConfig.from_dict({"type": "scale_invariant"}) == ScaleInvariantConfig()
    assert ScaleInvariantConfig().num_tokens == 128
    with pytest.raises(ValueError, match="unknown connector type 'qformer'.*'mlp'.*'pool'.*'resampler'.*'scale_invariant'"):
        ConnectorConfig.from_dict({"type": "qformer"})
    with pytest.raises(ValueError, match="unknown fields.*'hidden'"):
        ConnectorConfig.from_dict({"type": "pool", "hidden": 3})
    with pytest.raises(ValueError, match="not a PoolConfig"):
        PoolConfig.from_dict({"type": "mlp"})
    with pytest.raises(ValueError, match="divisible"):
        ScaleInvariantConfig(hidden_dim=30, num_heads=4)


@pytest.mark.parametrize("name", NAMES)
def test_feature_noise_only_while_training(name):
    noisy_config = ConnectorConfig.from_dict({**small_config(name).to_dict(), "feature_noise": 0.5})
    assert noisy_config.feature_noise == 0.5 and small_config(name).feature_noise == 0.0
    torch.manual_seed(0)
    noisy = build_connector(noisy_config, D_ENC, D_LLM)
    clean = make(name)
    clean.load_state_dict(noisy.state_dict())  # the noise adds no weight: checkpoints stay interchangeable
    feats, coords = slide(40, seed=2)
    # Eval mode: exactly the noise-free connector.
    torch.testing.assert_close(noisy.eval()(feats, coords, None).tokens, clean(feats, coords, None).tokens,
                               rtol=0, atol=0)
    # Training: another draw every call, the same draw for the same torch seed.
    noisy.train()
    clean.train()
    torch.manual_seed(5)
    a = noisy(feats, coords, None).tokens
    b = noisy(feats, coords, None).tokens
    torch.manual_seed(5)
    a_again = noisy(feats, coords, None).tokens
    reference = clean(feats, coords, None).tokens
    assert not torch.allclose(a, b) and not torch.allclose(a, reference)
    torch.testing.assert_close(a, a_again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature_noise must be >= 0, got -0.1"):
        ConnectorConfig.from_dict({"type": name, "feature_noise": -0.1})


def test_sampler_is_deterministic_with_known_values():
    assert sample_tile_indices(10, 4, seed=0).tolist() == [0, 2, 4, 6]
    assert sample_tile_indices(10, 4, seed=1).tolist() == [0, 2, 6, 9]
    assert sample_tile_indices(1000, 5, seed=7).tolist() == [16, 698, 784, 840, 956]
    assert sample_tile_indices(5, 8, seed=0).tolist() == [0, 1, 2, 3, 4]
    big = sample_tile_indices(50_000, 128, seed=0)
    assert torch.equal(big, sample_tile_indices(50_000, 128, seed=0))
    assert big.dtype == torch.long and len(big) == 128 and len(set(big.tolist())) == 128
    assert torch.equal(big, big.sort().values)
    assert not torch.equal(big, sample_tile_indices(50_000, 128, seed=1))
    assert not torch.equal(big, sample_tile_indices(50_001, 128, seed=0))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    conn = make(name).train()
    feats, coords = slide(200, seed=8)
    # Second slide: 10 tiles, so mlp pads and grids have empty cells; some tiles at the coarse scale.
    feats = torch.cat([feats, torch.randn(1, 200, D_ENC)])
    coords = torch.cat([coords, torch.rand(1, 200, 2) * 5_000])
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, 10:] = False
    scale = (torch.arange(200) % 3 == 0).long().expand(2, -1)
    out = conn(feats, coords, mask, scale)
    out.tokens.square().mean().backward()
    missing = [p_name for p_name, p in conn.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_explicit_cross_attention_matches_sdpa_and_gradchecks():
    from pathchat.model.connectors.attention import cross_attention_weights

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 8, dtype=torch.float64, generator=g, requires_grad=True) for s in (5, 30, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out, weights = cross_attention_weights(q, k, v, mask)
    with torch.no_grad():  # the in-place path
        out_ng, weights_ng = cross_attention_weights(q, k, v, mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_ng, ref)
    torch.testing.assert_close(weights_ng, weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert (weights[1, :, 20:] == 0).all()
    small = [t[:, :2, :3, :4].detach().requires_grad_() for t in (q, k, v)]
    small[1] = k[:, :2, :, :4].detach().requires_grad_()
    small[2] = v[:, :2, :, :4].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda q_, k_, v_: cross_attention_weights(q_, k_, v_, mask), small,
                                    fast_mode=True)


def test_grouped_kv_heads_match_repeated_kv_reference():
    from pathchat.model.connectors.attention import QueryBlock

    torch.manual_seed(0)
    block = QueryBlock(dim=16, num_heads=4, num_kv_heads=2, ffn_ratio=2.0).double()
    queries = torch.randn(2, 3, 16, dtype=torch.float64)
    memory_kv = torch.randn(2, 9, 2 * 2 * 4, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out_fast, _ = block(queries, memory_kv, mask, need_weights=False)
    out_explicit, weights = block(queries, memory_kv, mask, need_weights=True)
    # Reference: plain multi-head attention with each key/value head repeated for its 2 query heads.
    x = queries + block.self_out(torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, 3, 4, 4).transpose(1, 2) for t in block.self_qkv(block.norm_self(queries)).chunk(3, -1))
    ).transpose(1, 2).reshape(2, 3, 16))
    q = block.cross_q(block.norm_cross(x)).view(2, 3, 4, 4).transpose(1, 2)
    k, v = (t.view(2, 9, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1) for t in memory_kv.chunk(2, -1))
    logits = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(-1)
    x = x + block.cross_out((attn @ v).transpose(1, 2).reshape(2, 3, 16))
    ref = x + block.ffn(block.norm_ffn(x))
    torch.testing.assert_close(out_fast, ref)
    torch.testing.assert_close(out_explicit, ref)
    assert weights is not None
    torch.testing.assert_close(weights, attn.mean(1))


def _piece_at(x0_um: float, y0_um: float, tile_um: float = 256.0) -> torch.Tensor:
    """`[1, 9, 2]` top-left corners of a 3 x 3-tile piece of tissue whose corner is at (x0, y0)."""
    ij = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="xy"), dim=-1).reshape(1, 9, 2)
    return ij.float() * tile_um + torch.tensor([x0_um, y0_um])


@pytest.mark.parametrize("name", ["scale_invariant", "pool"])
def test_slide_frame_sees_where_tissue_lies_on_the_glass(name):
    import dataclasses

    tissue_frame = make(name)
    torch.manual_seed(0)
    slide_frame = build_connector(dataclasses.replace(small_config(name), position_frame="slide"), D_ENC, D_LLM).eval()
    feats = torch.randn(1, 9, D_ENC, generator=torch.Generator().manual_seed(8))
    size = torch.tensor([[4096.0, 4096.0]])  # a 4.096 mm square slide
    upper_left, lower_right = _piece_at(256, 256), _piece_at(3072, 3072)
    with torch.no_grad():
        ul = slide_frame(feats, upper_left, None, slide_size_um=size)
        lr = slide_frame(feats, lower_right, None, slide_size_um=size)
        # The tissue frame only sees the piece itself: the same tokens wherever it lies.
        torch.testing.assert_close(tissue_frame(feats, upper_left, None, slide_size_um=size).tokens,
                                   tissue_frame(feats, lower_right, None, slide_size_um=size).tokens,
                                   atol=1e-4, rtol=0)
        unknown = slide_frame(feats, upper_left, None, slide_size_um=torch.full((1, 2), float("nan")))
        no_size = slide_frame(feats, upper_left, None)
    assert (ul.tokens - lr.tokens).abs().max() > 1e-2
    assert torch.equal(unknown.tokens, no_size.tokens)  # a NaN row = size unknown
    assert (no_size.tokens - ul.tokens).abs().max() > 1e-3  # the fallback extent is the tiles' own
    if name == "pool":
        # 4 x 4 cells of 1,024 µm: the upper-left piece fills cell 0 alone, the lower-right cell 15.
        empty = slide_frame.empty_token
        occupied = [i for i in range(16) if not torch.equal(ul.tokens[0, i], empty)]
        assert occupied == [0]
        assert [i for i in range(16) if not torch.equal(lr.tokens[0, i], empty)] == [15]
        torch.testing.assert_close(ul.tokens[0, 0], lr.tokens[0, 15])
    with pytest.raises(ValueError, match=r"slide_size_um must be \[1, 2\]"):
        slide_frame(feats, upper_left, None, slide_size_um=torch.ones(2))


@pytest.mark.parametrize("name", ["mlp", "resampler"])
def test_connectors_without_a_frame_ignore_slide_size(name):
    conn = make(name)
    feats, coords = slide(40, seed=9)
    with torch.no_grad():
        assert torch.equal(conn(feats, coords, None, slide_size_um=torch.tensor([[1e4, 2e4]])).tokens,
                           conn(feats, coords, None).tokens)


def test_position_frames_and_their_errors():
    from pathchat.model.connectors.positions import frame_coords_um, grid_cells, stack_slide_sizes

    coords = torch.tensor([[[1000.0, 3000.0], [1500.0, 3000.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    rel, extent = frame_coords_um(coords, mask, "tissue")
    assert rel.tolist() == [[[0.0, 0.0], [500.0, 0.0], [0.0, 0.0]]] and extent.tolist() == [[500.0, 0.0]]
    glass, size = frame_coords_um(coords, mask, "slide", torch.tensor([[4000.0, 4000.0]]))
    assert glass.tolist() == [[[1000.0, 3000.0], [1500.0, 3000.0], [0.0, 0.0]]] and size.tolist() == [[4000.0, 4000.0]]
    assert grid_cells(glass, size, 2)[mask].tolist() == [2, 2]  # lower left of the slide
    _, seen = frame_coords_um(coords, mask, "slide", None)
    assert seen.tolist() == [[1500.0, 3000.0]]
    sizes = stack_slide_sizes([torch.tensor([10.0, 20.0]), None])
    assert sizes is not None and sizes[0].tolist() == [10.0, 20.0] and sizes[1].isnan().all()
    assert stack_slide_sizes([None, None]) is None
    with pytest.raises(ValueError, match="unknown position frame 'glass'"):
        frame_coords_um(coords, mask, "glass")
    for cls in (ScaleInvariantConfig, PoolConfig):
        with pytest.raises(ValueError, match=r"position_frame must be one of \['tissue', 'slide'\]"):
            cls(position_frame="glass")


def test_local_grid_tokens_see_only_their_own_cell():
    torch.manual_seed(0)
    config = ScaleInvariantConfig(grid_size=2, num_latents=4, hidden_dim=32, num_heads=4, num_kv_heads=2,
                                  num_frequencies=8, position_frame="slide", local_grid=True)
    conn = build_connector(config, D_ENC, D_LLM).eval()
    size = torch.tensor([[4096.0, 4096.0]])
    coords = torch.cat([_piece_at(256, 256), _piece_at(3072, 256)], dim=1)  # upper left, upper right
    feats = torch.randn(1, 18, D_ENC, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = conn(feats, coords, None, slide_size_um=size)
        # padding tiles change nothing, with per-query masks too
        padded = conn(torch.cat([feats, torch.randn(1, 5, D_ENC)], 1), torch.cat([coords, torch.rand(1, 5, 2) * 4096], 1),
                      torch.cat([torch.ones(1, 18, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)], 1),
                      slide_size_um=size)
    rel = out.token_relevance[0]  # [k, n]: rows 0-3 are the cells, 4-7 the latents
    assert rel[0, :9].sum() == pytest.approx(1.0, abs=1e-5) and rel[0, 9:].abs().max() == 0
    assert rel[1, 9:].sum() == pytest.approx(1.0, abs=1e-5) and rel[1, :9].abs().max() == 0
    assert (rel[4:] > 0).all()  # latents read every tile
    torch.testing.assert_close(padded.tokens, out.tokens, atol=1e-5, rtol=0)
    # the gated, per-query-masked cross-attention trains without NaN (empty cells included)
    conn.train()
    conn(feats, coords, None, slide_size_um=size).tokens.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conn.parameters() if p.grad is not None)


def test_grid_tokens_without_self_attention_hold_only_their_own_cell():
    torch.manual_seed(0)
    size = torch.tensor([[4096.0, 4096.0]])
    coords = torch.cat([_piece_at(256, 256), _piece_at(3072, 256)], dim=1)  # upper left, upper right
    feats = torch.randn(1, 18, D_ENC, generator=torch.Generator().manual_seed(3))
    other = feats.clone()
    other[:, 9:] = torch.randn(1, 9, D_ENC, generator=torch.Generator().manual_seed(4))  # new upper-right tiles
    moved = {}
    for mixing in (True, False):
        config = ScaleInvariantConfig(grid_size=2, num_latents=2, hidden_dim=32, num_heads=4, num_kv_heads=2,
                                      num_frequencies=8, position_frame="slide", local_grid=True,
                                      grid_self_attention=mixing)
        conn = build_connector(config, D_ENC, D_LLM).eval()
        with torch.no_grad():
            a = conn(feats, coords, None, slide_size_um=size).tokens[0]
            b = conn(other, coords, None, slide_size_um=size).tokens[0]
        moved[mixing] = (a - b).abs().amax(dim=-1)  # per token
    # isolated: the upper-left and both empty cells' tokens ignore the upper-right tiles; the
    # upper-right token and the latents (which see everything) follow them
    assert moved[False][[0, 2, 3]].max() < 1e-5
    assert moved[False][1] > 1e-2 and moved[False][4:].min() > 1e-2
    assert moved[True][[0, 2, 3]].min() > 1e-3  # mixed through the query self-attention


def test_grid_total_count_gives_isolated_grid_tokens_the_slides_tile_count():
    size = torch.tensor([[4096.0, 4096.0]])
    gen = torch.Generator().manual_seed(3)
    upper_left = (_piece_at(256, 256), torch.randn(1, 9, D_ENC, generator=gen))
    # other tissue: 9 tiles upper right, the same 9 tiles in the lower right, or 18 tiles upper right
    others = {"9 upper right": _piece_at(3072, 256), "9 lower right": _piece_at(3072, 3072),
              "18 upper right": torch.cat([_piece_at(2304, 256), _piece_at(3072, 256)], dim=1)}
    other_feats = torch.randn(1, 18, D_ENC, generator=gen)
    for total_count in (False, True):
        torch.manual_seed(0)
        config = ScaleInvariantConfig(grid_size=2, num_latents=0, hidden_dim=32, num_heads=4, num_kv_heads=2,
                                      num_frequencies=8, position_frame="slide", local_grid=True,
                                      grid_self_attention=False, per_token_output=True,
                                      grid_total_count=total_count)
        conn = build_connector(config, D_ENC, D_LLM).eval()
        assert conn.count_out.in_features == (2 if total_count else 1)
        first = {}
        with torch.no_grad():
            for name, coords in others.items():
                feats = torch.cat([upper_left[1], other_feats[:, : coords.shape[1]]], dim=1)
                first[name] = conn(feats, torch.cat([upper_left[0], coords], dim=1), None,
                                   slide_size_um=size).tokens[0, 0]  # the upper-left token
        # where the other tissue lies never reaches the upper-left token; how much of it there is does
        # only with the total count
        torch.testing.assert_close(first["9 upper right"], first["9 lower right"], atol=1e-5, rtol=0)
        moved = (first["9 upper right"] - first["18 upper right"]).abs().max()
        assert (moved > 1e-2) if total_count else (moved < 1e-5)


def test_per_token_output_projects_each_token_with_its_own_matrix():
    torch.manual_seed(0)
    config = ScaleInvariantConfig(grid_size=2, num_latents=0, hidden_dim=32, num_heads=4, num_kv_heads=2,
                                  num_frequencies=8, position_frame="slide", local_grid=True,
                                  grid_self_attention=False, per_token_output=True)
    conn = build_connector(config, D_ENC, D_LLM).eval()
    assert conn.token_out.shape == (4, 32, D_LLM) and not hasattr(conn, "out_proj")
    size = torch.tensor([[4096.0, 4096.0]])
    coords = torch.cat([_piece_at(256, 256), _piece_at(3072, 256)], dim=1)
    feats = torch.randn(1, 18, D_ENC, generator=torch.Generator().manual_seed(3))
    hidden = {}
    conn.transformer.norm_out.register_forward_hook(lambda m, a, out: hidden.update(q=out))
    with torch.no_grad():
        tokens = conn(feats, coords, None, slide_size_um=size).tokens[0]
        counts = torch.log1p(torch.tensor([9.0, 9.0, 0.0, 0.0]))[:, None]
        h = hidden["q"][0] + conn.token_embedding + conn.count_out(counts)
    for i in range(4):  # token i through matrix i, not through another token's
        torch.testing.assert_close(tokens[i], h[i] @ conn.token_out[i] + conn.token_out_bias[i])
        assert not torch.allclose(tokens[i], h[i] @ conn.token_out[(i + 1) % 4] + conn.token_out_bias[(i + 1) % 4])
    conn.train()
    conn(feats, coords, None, slide_size_um=size).tokens.sum().backward()
    assert conn.token_out.grad is not None and conn.token_out.grad.abs().sum(dim=(1, 2)).min() > 0
