"""Tile positions in physical units: micrometres in a chosen frame, a Fourier encoding and a coarse grid.

Two frames. "tissue" (the default) takes positions relative to each slide's own tile bounding box, so
a translated slide gives the same tokens. "slide" keeps them on the glass (origin at the slide's
top-left corner, extent = the scanned area), so "upper left of the slide" means what the viewer
shows. Both are in micrometres, so the same tissue scanned at any resolution looks the same. Phases
are computed in float64: at 50 mm and a 32 µm wavelength float32 loses ~1e-3 rad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_coords_um(tile_coords_um: Tensor | None, tile_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates relative to each slide's valid-tile bounding-box origin.

    Args:
        tile_coords_um: `[b, n, 2]` top-left (x, y) in µm, or None (all tiles at the origin).
        tile_mask: `[b, n]` bool, True for real tiles.

    Returns:
        `(rel [b, n, 2] float64, extent [b, 2] float64)`: padding rows are 0; `extent` is the
        bounding-box size over valid tiles (0 for a single tile or equal coordinates).
    """
    b, n = tile_mask.shape
    if tile_coords_um is None:
        zeros = torch.zeros(b, n, 2, dtype=torch.float64, device=tile_mask.device)
        return zeros, zeros[:, 0]
    coords = tile_coords_um.to(torch.float64)
    valid = tile_mask[..., None]
    origin = coords.masked_fill(~valid, math.inf).amin(dim=1, keepdim=True)  # [b, 1, 2]
    rel = (coords - origin).masked_fill(~valid, 0.0)
    return rel, rel.amax(dim=1)


POSITION_FRAMES: tuple[str, ...] = ("tissue", "slide")


def check_position_frame(frame: str) -> None:
    """Raise ValueError naming the known frames when `frame` is not one of them."""
    if frame not in POSITION_FRAMES:
        raise ValueError(f"position_frame must be one of {list(POSITION_FRAMES)}, got {frame!r}")


def stack_slide_sizes(sizes: list[Tensor | None]) -> Tensor | None:
    """`[b, 2]` slide sizes in µm, NaN rows where a slide's size is unknown; None when none is known."""
    if all(s is None for s in sizes):
        return None
    return torch.stack([torch.full((2,), math.nan) if s is None else s.reshape(2).float().cpu() for s in sizes])


def frame_coords_um(tile_coords_um: Tensor | None, tile_mask: Tensor, frame: str,
                    slide_size_um: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tile positions and the extent a grid spans, in the connector's position frame.

    Args:
        tile_coords_um: `[b, n, 2]` top-left (x, y) in µm from the slide's corner, or None.
        tile_mask: `[b, n]` bool, True for real tiles.
        frame: "tissue" (`relative_coords_um`) or "slide" (coordinates as given, extent = the
            slide's size).
        slide_size_um: `[b, 2]` (width, height) of the scanned area in µm (level-0 size x mpp);
            only the "slide" frame reads it. Without it (None, or a NaN row for a slide whose size
            is unknown) the extent falls back to the farthest tile corner seen, which is the
            slide's size only when tissue reaches its edge.

    Returns:
        `(coords [b, n, 2] float64, extent [b, 2] float64)`, padding rows 0.
    """
    if frame not in POSITION_FRAMES:
        raise ValueError(f"unknown position frame {frame!r}; known: {list(POSITION_FRAMES)}")
    if frame == "tissue" or tile_coords_um is None:
        return relative_coords_um(tile_coords_um, tile_mask)  # without coordinates both frames are all zeros
    b = tile_mask.shape[0]
    coords = tile_coords_um.to(torch.float64).masked_fill(~tile_mask[..., None], 0.0)
    seen = coords.amax(dim=1)
    if slide_size_um is None:
        return coords, seen
    if tuple(slide_size_um.shape) != (b, 2):
        raise ValueError(f"slide_size_um must be [{b}, 2], got {tuple(slide_size_um.shape)}")
    size = slide_size_um.to(device=coords.device, dtype=torch.float64)
    return coords, torch.where(size.isnan(), seen, size)


class FourierPositions(nn.Module):
    """Sinusoidal features of µm positions at fixed physical wavelengths, plus the tile's scale.

    Wavelengths are geometric from `min_wavelength_um` to `max_wavelength_um`; because they are
    physical, the encoding does not depend on the scanner's pixel size. The magnification index
    enters the same linear map as a one-hot, which makes its columns a learned scale embedding
    without another pass over the tiles.
    """

    def __init__(self, num_frequencies: int, min_wavelength_um: float, max_wavelength_um: float, dim: int,
                 num_scales: int = 1):
        super().__init__()
        self.wavelength_range_um = (float(min_wavelength_um), float(max_wavelength_um))
        self.num_frequencies = num_frequencies
        self.num_scales = num_scales
        self.proj = nn.Linear(4 * num_frequencies + num_scales, dim)

    @property
    def angular(self) -> Tensor:
        """`[f]` float64 radians per µm, computed from the config on each call.

        Not a buffer: `from_pretrained` builds the model on the meta device and a non-persistent
        buffer came back as uninitialised memory (garbage frequencies, sometimes NaN answers).
        """
        lo, hi = self.wavelength_range_um
        wavelengths = torch.logspace(math.log10(lo), math.log10(hi), self.num_frequencies, dtype=torch.float64)
        return 2 * math.pi / wavelengths

    def forward(self, rel_um: Tensor, tile_scale: Tensor | None = None) -> Tensor:
        """`rel_um [b, n, 2]` float64, `tile_scale [b, n]` long (None = 0) -> `[b, n, dim]`.

        Phases are reduced modulo 2 pi in float64, so float32 sin/cos stay exact to ~1e-7.
        """
        phases = (rel_um[..., None] * self.angular.to(rel_um.device)).remainder_(2 * math.pi).float()
        parts = [phases.sin().flatten(-2), phases.cos().flatten(-2)]  # [b, n, 2f] each
        if tile_scale is None:
            tile_scale = torch.zeros(rel_um.shape[:2], dtype=torch.long, device=rel_um.device)
        parts.append(nn.functional.one_hot(tile_scale, self.num_scales).float())
        return self.proj(torch.cat(parts, dim=-1).to(self.proj.weight.dtype))


def grid_cells(rel_um: Tensor, extent_um: Tensor, grid_size: int) -> Tensor:
    """Cell index (row-major, `0 .. g*g-1`) of each tile on a g x g grid over the bounding box.

    The grid stretches to the box's aspect ratio so every cell can hold tissue; an axis with zero
    extent (one tile, equal coordinates) puts every tile in cell 0 along it.

    Args:
        rel_um: `[b, n, 2]` slide-relative µm (from `relative_coords_um`).
        extent_um: `[b, 2]` bounding-box size in µm.
        grid_size: g.

    Returns:
        `[b, n]` long.
    """
    scaled = rel_um / extent_um[:, None, :].clamp_min(1e-9) * grid_size
    ij = scaled.floor().clamp(0, grid_size - 1).long()  # [b, n, 2] = (col, row)
    return ij[..., 1] * grid_size + ij[..., 0]


def masked_grid_mean(values: Tensor, cells: Tensor, tile_mask: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """Mean of valid tiles' values per cell, summed in float32; padding never contributes.

    Args:
        values: `[b, n, d]`.
        cells: `[b, n]` long cell of each tile.
        tile_mask: `[b, n]` bool.
        num_cells: G.

    Returns:
        `(means [b, G, d] in values' dtype, 0 for empty cells; counts [b, G] float32)`.
    """
    b, n, d = values.shape
    flat_cells = (torch.arange(b, device=cells.device)[:, None] * num_cells + cells)[tile_mask]
    sums = torch.zeros(b * num_cells, d, dtype=torch.float32, device=values.device)
    sums.index_add_(0, flat_cells, values[tile_mask].float())
    counts = torch.zeros(b * num_cells, dtype=torch.float32, device=values.device)
    counts.index_add_(0, flat_cells, torch.ones_like(flat_cells, dtype=torch.float32))
    means = sums / counts.clamp_min(1)[:, None]
    return means.view(b, num_cells, d).to(values.dtype), counts.view(b, num_cells)
